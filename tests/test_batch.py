"""Batch renders: several stories into sub-folders of one folder, shared between processes (torchrun, gloo on the
CPU), each story resumable on its own, broken and failing stories named and skipped; then the benchmark table
over the batch."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from storymem.locking import FolderLock
from storymem.render import batch as render_batch
from storymem.render import main
from storymem.render import models as render_models
from storymem.render.batch import BatchLayout, find_story_files, load_batch_stories
from storymem.render.options import RenderError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--base", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--steps", "1", "--device", "cpu"]
PROMPTS = {
    "a": ["a red circle in a green meadow", "the red circle rolls to a tree"],
    "b": ["a blue square in a gray city", "the blue square waits at night", "the blue square at dawn"],
    "c": ["a yellow star over the sea", "the yellow star sets"],
}


def _write_story(folder: Path, name: str, prompts: list[str]) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"story_name": f"story {name}", "story_overview": f"{prompts[0]}, and then more",
                                "scenes": [{"scene_num": 1, "video_prompts": prompts,
                                            "cut": [True] + [False] * (len(prompts) - 1)}]}))
    return path


def _stories(folder: Path, broken: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, prompts in PROMPTS.items():
        _write_story(folder, name, prompts)
    if broken:  # the first shot cannot continue a previous one
        (folder / "broken.json").write_text(json.dumps({"scenes": [{"scene_num": 1, "video_prompts": ["x"],
                                                                    "cut": [False]}]}))
    return folder


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _shot_counts(layout: BatchLayout) -> Counter:
    return Counter((e["story"], e["shot"]) for e in layout.events() if e["event"] == "shot")


# ---------------------------------------------------------------------------------------------- inputs
def test_story_files_and_broken_scripts(tmp_path):
    folder = _stories(tmp_path / "stories")
    (folder / "README.md").write_text("not a story")
    files = find_story_files([folder])
    assert [f.name for f in files] == ["a.json", "b.json", "broken.json", "c.json"]
    stories = load_batch_stories(files)
    broken = [s for s in stories if s.story is None]
    assert [s.name for s in broken] == ["broken"] and "'cut' is false" in broken[0].error
    assert [s.num_shots for s in stories if s.story is not None] == [2, 3, 2]
    # The same file twice is one story; two files with one stem would share a sub-folder.
    assert find_story_files([folder / "a.json", folder / "a.json"]) == [folder / "a.json"]
    (tmp_path / "other").mkdir()
    _write_story(tmp_path / "other", "a", ["a green tree"])
    with pytest.raises(RenderError, match=r"a.json and .*a.json would both render into the sub-folder 'a'"):
        find_story_files([folder, tmp_path / "other" / "a.json"])
    with pytest.raises(RenderError, match="--story .*nowhere: not found"):
        find_story_files([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RenderError, match="holds no story scripts"):
        find_story_files([tmp_path / "empty"])


# ST-Bench's scripts, read where they are (beside the checkout); the test skips without them.
ST_BENCH = next((p for p in (ROOT.parent / "shared" / "st-bench", ROOT.parents[1] / "shared" / "st-bench")
                 if p.is_dir()), None)


@pytest.mark.skipif(ST_BENCH is None, reason="ST-Bench scripts not available")
def test_st_bench_folder_is_one_batch():
    stories = load_batch_stories(find_story_files([ST_BENCH]))
    assert len(stories) == 30 and all(s.story is not None for s in stories)  # README.md is not a script
    assert sum(s.num_shots for s in stories) == 300


@pytest.mark.parametrize("extra, expected", [
    (["--from-shot", "2"], "--from-shot applies to one story"),
    (["--cp-degree", "2"], "--cp-degree 2: groups split shots with context parallelism"),
    (["--parallel", "ulysses"], "--parallel ulysses: run under torchrun"),
    (["--frames", "6"], "--frames 6: must be of the form 4n+1"),
])
def test_batch_flag_errors(tmp_path, capsys, extra, expected):
    folder = _stories(tmp_path / "stories", broken=False)
    assert main(["--story", str(folder), "--out", str(tmp_path / "out"), *FAST, *extra]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_batch_out_must_not_be_one_story_render(tmp_path, capsys):
    folder = _stories(tmp_path / "stories", broken=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text("{}")
    assert main(["--story", str(folder / "a.json"), str(folder / "c.json"), "--out", str(tmp_path / "out"),
                 *FAST]) == 2
    assert "holds the render of one story (manifest.json)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- one process
def test_one_process_skips_held_and_failing_stories_then_resumes(tmp_path, monkeypatch, capsys):
    folder = _stories(tmp_path / "stories")
    out = tmp_path / "batch"
    layout = BatchLayout(out)
    original = render_batch.StoryRenderer._render_shot

    def failing(self, shot, *args, **kwargs):
        if self.story.name == "story c" and shot.index == 1:
            raise RuntimeError("boom")
        return original(self, shot, *args, **kwargs)

    monkeypatch.setattr(render_batch.StoryRenderer, "_render_shot", failing)
    # Another process holds story b: it is skipped, not waited for.
    with FolderLock(layout.state, owner="another render", purpose="story b", name="b.lock"):
        assert main(["--story", str(folder), "--out", str(out), "--no-progress", *FAST]) == 1
    err = capsys.readouterr().err
    assert "error: story 'broken' is skipped: " in err and "'cut' is false" in err
    assert "b: skipped, in use by another render" in err
    assert "error: story 'c' failed: RuntimeError: boom" in err
    record = json.loads((out / "batch.json").read_text())
    states = {s["name"]: s for s in record["stories"]}
    assert {name: s["status"] for name, s in states.items()} == {
        "a": "finished", "b": "pending", "broken": "invalid", "c": "failed"}
    assert states["c"]["error"] == "RuntimeError: boom" and states["c"]["shots_done"] == 1
    assert record["summary"] == {"stories": 4, "finished": 1, "failed": 1, "invalid": 1, "incomplete": 0,
                                 "interrupted": 0, "pending": 1, "shots_done": 3, "shots_total": 7}
    assert record["settings"]["steps"] == 1 and record["seeds"]["seed"] == 0
    assert record["hardware"]["world_size"] == 1 and record["versions"]["torch"]
    assert "invalid     broken" in err and "failed      c: RuntimeError: boom" in err

    # Rerun without the failure: b renders, c continues from its finished shot, a is left alone.
    monkeypatch.setattr(render_batch.StoryRenderer, "_render_shot", original)
    a_video = out / "a" / "shots" / "01_01.mp4"
    before = a_video.stat().st_mtime_ns
    assert main(["--story", *(str(folder / f"{n}.json") for n in "abc"), "--out", str(out), "--no-progress",
                 *FAST]) == 0
    assert a_video.stat().st_mtime_ns == before
    claims = [(e["story"], e["start"]) for e in layout.events() if e["event"] == "claimed"]
    assert claims == [("a", 0), ("c", 0), ("b", 0), ("c", 1)]
    assert set(_shot_counts(layout).values()) == {1} and len(_shot_counts(layout)) == 7
    record = json.loads((out / "batch.json").read_text())
    assert [s["status"] for s in record["stories"]] == ["finished"] * 3 and len(record["launches"]) == 2

    # Everything finished: a rerun loads no model.
    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded for a finished batch")

    monkeypatch.setattr(render_models, "load_render_pipeline", no_models)
    abc = [str(folder / f"{n}.json") for n in "abc"]
    assert main(["--story", *abc, "--out", str(out), "--no-progress", *FAST]) == 0
    # Other settings: every story's folder refuses them, by name, before any model loads.
    capsys.readouterr()
    assert main(["--story", *abc, "--out", str(out), "--no-progress", *FAST, "--seed", "5"]) == 1
    err = capsys.readouterr().err
    record = json.loads((out / "batch.json").read_text())
    assert [s["status"] for s in record["stories"]] == ["failed"] * 3
    assert all("was rendered with other settings" in s["error"] and "seed: 0 -> 5" in s["error"]
               for s in record["stories"])
    assert "failed      a: " in err and "failed      c: " in err


# ---------------------------------------------------------------------------------------------- two processes
DIE_IN_STORY = """
import os, sys
from storymem.render import renderer

original = renderer.StoryRenderer._render_shot

def dying(self, shot, *args, **kwargs):
    if self.story.name == os.environ["DIE_IN_STORY"] and shot.index == 1:
        os._exit(9)  # killed: no cleanup, the lock file stays behind
    return original(self, shot, *args, **kwargs)

renderer.StoryRenderer._render_shot = dying
from storymem.render.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def two_process_batch(tmp_path_factory):
    """A batch whose render was killed in story b, then finished by two processes (torchrun, gloo)."""
    tmp = tmp_path_factory.mktemp("two")
    folder = _stories(tmp / "stories")
    out = tmp / "batch"
    args = ["--story", str(folder), "--out", str(out), "--no-progress", *FAST]
    helper = tmp / "die_in_story.py"
    helper.write_text(DIE_IN_STORY)
    killed = subprocess.run([sys.executable, str(helper), *args], cwd=ROOT, env=dict(_env(), DIE_IN_STORY="story b"),
                            capture_output=True, text=True, timeout=300)
    layout = BatchLayout(out)
    after_kill = {"rc": killed.returncode, "events": layout.events(), "stale_lock": (layout.state / "b.lock").exists(),
                  "b_shot_1": json.loads((out / "b" / "manifest.json").read_text())["shots"][0],
                  "b_video_mtime": (out / "b" / "shots" / "01_01.mp4").stat().st_mtime_ns}
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "storymem", "render", *args], cwd=ROOT, env=_env(), capture_output=True,
                             text=True, timeout=300)
    return out, after_kill, resumed


def test_two_processes_render_every_story_once_and_resume_a_killed_one(two_process_batch):
    out, after_kill, resumed = two_process_batch
    layout = BatchLayout(out)
    # The first render was killed in b's second shot: a finished, b has one shot, c was not started.
    assert after_kill["rc"] == 9 and after_kill["stale_lock"]
    assert [(e["event"], e["story"]) for e in after_kill["events"] if e["event"] != "shot"] == [
        ("claimed", "a"), ("finished", "a"), ("claimed", "b")]
    # The rerun by two processes: b resumes at shot 2 despite the lock file its killed renderer left, c renders,
    # a is left alone; the broken script is named, and the exit code says the batch is not complete.
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    assert "error: story 'broken' is skipped:" in resumed.stderr
    rerun = layout.events()[len(after_kill["events"]):]
    claims = [(e["story"], e["start"]) for e in rerun if e["event"] == "claimed"]
    assert sorted(claims) == [("b", 1), ("c", 0)]
    assert {e["rank"] for e in rerun} <= {0, 1}
    assert Counter(e["story"] for e in layout.events() if e["event"] == "finished") == {"a": 1, "b": 1, "c": 1}
    # Every shot of every story was rendered exactly once, over both runs.
    counts = _shot_counts(layout)
    assert len(counts) == 7 and set(counts.values()) == {1}
    manifest_b = json.loads((out / "b" / "manifest.json").read_text())
    assert manifest_b["finished"] and manifest_b["shots"][0] == after_kill["b_shot_1"]
    assert (out / "b" / "shots" / "01_01.mp4").stat().st_mtime_ns == after_kill["b_video_mtime"]
    record = json.loads((out / "batch.json").read_text())
    states = {s["name"]: s for s in record["stories"]}
    assert [states[n]["status"] for n in "abc"] == ["finished"] * 3 and states["broken"]["status"] == "invalid"
    assert record["launch"]["world_size"] == 2 and record["hardware"]["world_size"] == 2
    assert sorted(p["rank"] for p in record["hardware"]["processes"]) == [0, 1]
    assert states["b"]["rendered_by"]["rank"] in (0, 1)


@pytest.fixture
def tiny_clip(tmp_path):
    import open_clip

    config = {"embed_dim": 16, "quick_gelu": True,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}
    path = tmp_path / "storymem-batch-tiny-clip.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return path.stem


def test_benchmark_over_the_batch(two_process_batch, tiny_clip, tmp_path, monkeypatch, capsys):
    import torch

    from storymem import evaluation
    from storymem.evaluation import cli as eval_cli

    out, _, _ = two_process_batch
    head = tmp_path / "head.pth"
    torch.save(torch.nn.Linear(16, 1).state_dict(), head)
    argv = [str(out), "--clip-model", tiny_clip, "--clip-pretrained", "none", "--aesthetic-head", str(head),
            "--aesthetic-clip-model", tiny_clip, "--aesthetic-clip-pretrained", "none", "--device", "cpu",
            "--frames", "2", "--quiet", "--output", str(tmp_path / "bench.json")]
    torch.manual_seed(0)
    options = eval_cli.parse_options(argv)
    encoder = eval_cli.build_encoder(options)
    aesthetic = eval_cli.build_aesthetic(options, encoder)
    loads = []
    monkeypatch.setattr(eval_cli, "build_encoder", lambda o: loads.append("encoder") or encoder)
    monkeypatch.setattr(eval_cli, "build_aesthetic", lambda o, e: loads.append("aesthetic") or aesthetic)
    assert evaluation.main(argv) == 0
    assert loads == ["encoder", "aesthetic"]  # once for the whole batch
    printed = capsys.readouterr().out
    table = json.loads((tmp_path / "bench.json").read_text())
    assert [row["name"] for row in table["stories"]] == ["a", "b", "c"]
    assert table["missing"][0]["name"] == "broken" and "broken story script" in table["missing"][0]["reason"]
    # The means are the per-story figures, each story scored again here on its own, averaged.
    config = options.config()
    per_story = [evaluation.evaluate(evaluation.collect_shots(out / n), encoder, aesthetic, config)["metrics"]
                 for n in "abc"]
    for key in evaluation.benchmark.METRIC_KEYS:
        assert table["mean"][key] == pytest.approx(np.mean([m[key] for m in per_story]), abs=1e-6), key
        assert isinstance(table["mean"][key], float)
    assert table["produced_by"]["render"]["settings"]["steps"] == 1
    assert table["produced_by"]["render"]["hardware"]["world_size"] == 2
    assert table["produced_by"]["eval"]["settings"]["frames_per_shot"] == 2
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG" and (out / "a" / "metrics.json").is_file()
    assert "mean" in printed and "missing: broken" in printed


GROUPS_ON_THE_CPU = """
import sys
from storymem.render import batch_world, parallel

# Context parallelism needs CUDA GPUs; here each group of two processes renders its story on the CPU over gloo,
# both computing every shot, so the groups' claims, sharing and leader-only writes run as they do on GPUs.
batch_world.check_cp_degree = lambda parallel_, cp_degree, world, local_world: cp_degree
parallel.enable_context_parallel = lambda pipe, *args, **kwargs: pipe
from storymem.render.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_groups_of_processes_each_render_their_own_stories(tmp_path):
    folder = _stories(tmp_path / "stories", broken=False)
    out = tmp_path / "batch"
    helper = tmp_path / "groups_on_the_cpu.py"
    helper.write_text(GROUPS_ON_THE_CPU)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                             str(helper), "--story", str(folder / "a.json"), str(folder / "c.json"), "--out", str(out),
                             "--no-progress", *FAST,
                             "--parallel", "ulysses", "--cp-degree", "2"], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    layout = BatchLayout(out)
    events = layout.events()
    # Only the groups' leaders (ranks 0 and 2) claim and write; each story once, each shot once.
    assert {e["rank"] for e in events} <= {0, 2}
    assert sorted(e["story"] for e in events if e["event"] == "claimed") == ["a", "c"]
    assert {(e["rank"], e["group"]) for e in events} <= {(0, 0), (2, 1)}
    counts = _shot_counts(layout)
    assert len(counts) == 4 and set(counts.values()) == {1}
    record = json.loads((out / "batch.json").read_text())
    assert record["launch"] == dict(record["launch"], world_size=4, parallel="ulysses", cp_degree=2, groups=2)
    assert [s["status"] for s in record["stories"]] == ["finished"] * 2
    manifest = json.loads((out / "c" / "manifest.json").read_text())
    assert manifest["runtime"]["world_size"] == 2 and manifest["runtime"]["parallel"] == "ulysses"
