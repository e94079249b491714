"""The `storymem` command and the render command line: dispatch, usage, a parser generated from the option
fields, and how --demo and the built-in models fill the automatic options."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from storymem import cli
from storymem.arguments import cli_fields
from storymem.builtin import BUILTIN_SAMPLING, DEMO_STORY
from storymem.defaults import FLOW_SHIFT, FRAMES, STEPS, WAN_I2V_BASE
from storymem.render import RenderOptions
from storymem.render import cli as render_cli

ROOT = Path(__file__).resolve().parents[1]


def test_no_command_prints_usage_and_exits_2(capsys):
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: storymem {render,demo,prepare,train,eval,studio}")
    assert cli.main(["paint"]) == 2
    assert "unknown command 'paint'" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in ("render", "demo", "prepare", "train", "eval", "studio"))


def test_python_m_storymem_is_the_same_command():
    result = subprocess.run([sys.executable, "-m", "storymem"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("usage: storymem")
    result = subprocess.run([sys.executable, "infer_story.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--memory-rope" in result.stdout


def test_render_and_demo_dispatch_to_the_render_command(monkeypatch):
    calls = []

    def fake_main(argv):
        calls.append(argv)
        return 7

    monkeypatch.setattr(render_cli, "main", fake_main)
    assert cli.main(["render", "--story", "s.json"]) == 7
    assert cli.main(["demo", "--out", "d"]) == 7
    assert calls == [["--story", "s.json"], ["--demo", "--out", "d"]]


def test_render_help_exits_0(capsys):
    assert render_cli.main(["--help"]) == 0
    assert "--memory-rope" in capsys.readouterr().out
    assert render_cli.main(["--frames", "many"]) == 2  # argparse's own error


def test_help_text_comes_from_the_fields():
    parser = render_cli.build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    fields = {f.name: f for f in cli_fields(RenderOptions)}
    assert set(fields) <= set(actions)  # every option field is a flag
    for name, action in actions.items():
        assert action.help and action.help.count("(default") <= 1, (name, action.help)
    assert actions["fps"].help == fields["fps"].metadata["help"] + " (default: 16)"
    assert actions["seed"].help == fields["seed"].metadata["help"] + " (default: 0)"
    assert actions["out_dir"].option_strings == ["--out"]
    help_text = parser.format_help()
    assert "--progress, --no-progress" in help_text and "output and resume:" in help_text


def _options(*argv):
    return render_cli.options_from_args(render_cli.build_parser().parse_args(list(argv)))


def test_demo_and_builtin_defaults(tmp_path):
    story, options = _options("--demo")
    assert Path(story.path) == DEMO_STORY
    assert (options.base, options.lora, options.device, options.out_dir) == ("toy", "toy", "cpu",
                                                                             Path("storymem_demo"))
    resolved = options.resolved()
    for key in ("frames", "steps", "shift", "embedder", "aesthetic", "negative_prompt", "height", "width"):
        assert getattr(resolved, key) == BUILTIN_SAMPLING[key], key
    assert resolved.dtype == "float32" and resolved.resolved() == resolved  # idempotent

    story_file = tmp_path / "tale.json"
    story_file.write_text('{"prompts": ["a red circle"]}')
    _, options = _options("--story", str(story_file))
    assert options.base is None and options.out_dir == Path("outputs") / "tale"
    resolved = options.resolved()
    assert (resolved.base, resolved.frames, resolved.steps, resolved.shift) == (WAN_I2V_BASE, FRAMES, STEPS,
                                                                                FLOW_SHIFT)
    assert resolved.negative_prompt is None and resolved.height is None  # Wan's prompt; size from the image
    assert resolved.guidance_2 == resolved.guidance
    # Given values win over the automatic ones.
    _, options = _options("--story", str(story_file), "--base", "tiny", "--frames", "9", "--area", "1024")
    resolved = options.resolved()
    assert resolved.frames == 9 and resolved.steps == BUILTIN_SAMPLING["steps"] and resolved.height is None


@pytest.mark.parametrize("argv, expected", [
    (["--demo", "--base", "org/model"], "--demo renders with the small world's built-in model"),
    (["--demo", "--story", "s.json"], "pass --story or --demo, not both"),
    ([], "no story"),
])
def test_story_choice_errors(argv, expected, capsys):
    assert render_cli.main(argv) == 2
    assert expected in capsys.readouterr().err


def test_programmatic_options_resolve_like_the_command_line():
    options = RenderOptions(base="tiny", device="cpu")
    assert options.frames is None and options.resolved().frames == BUILTIN_SAMPLING["frames"]
    assert dataclasses.replace(options, frames=9).resolved().frames == 9
    with pytest.raises(render_cli.RenderError, match="--dtype"):
        RenderOptions(dtype="float8").resolved()
    with pytest.raises(render_cli.RenderError, match="--device 'gpu0'"):
        RenderOptions(device="gpu0").resolved()
