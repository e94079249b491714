"""What a new user can break in a render, and what they get instead: --force over any render, --from-shot that
never mixes two stories, settings recorded per shot, adapter files checked before any model loads, shots that
decode to nothing stopped by name, one render per folder, unwritable folders found first, weights that must be
downloaded named offline, a contact-sheet font for any text, strict option ranges and shot identifiers, normal
file modes, and every bad input one line."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from storymem import builtin, render
from storymem.locking import FolderLock, FolderLockError, read_lock_holder
from storymem.pipeline import StoryMemPipeline
from storymem.render import main
from storymem.render import models as render_models
from storymem.render import outputs as render_outputs
from storymem.render.cli import build_parser, options_from_args
from storymem.video import read_video

STORY = {"story_name": "two scenes", "story_overview": "a red circle, then a blue square",
         "scenes": [{"scene_num": 1, "video_prompts": ["a red circle in a green meadow",
                                                        "the red circle walks to the tree"], "cut": [True, False]},
                    {"scene_num": 2, "video_prompts": ["a blue square in a gray city at night"], "cut": [True]}]}
FAST = ["--base", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--steps", "1", "--no-progress",
        "--device", "cpu"]


def _write(path, data):
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _args(story, out, *extra):
    return ["--story", str(story), "--out", str(out), *FAST, *extra]


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def _must_not_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the inputs were checked")


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)
    monkeypatch.setattr(builtin, "load_builtin_pipeline", _must_not_load)


def _one_error_line(err: str, *fragments):
    """The error of ``err`` (stderr): one line, the last, starting with "error:" (progress logs may precede it)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One finished 3-shot render of STORY, made under umask 027 (tests that change it work on a copy)."""
    tmp = tmp_path_factory.mktemp("rendered")
    story = _write(tmp / "story.json", STORY)
    out = tmp / "out"
    mask = os.umask(0o027)
    try:
        assert main(_args(story, out)) == 0
    finally:
        os.umask(mask)
    return story, out


def _copy(rendered, tmp_path):
    story, out = rendered
    shutil.copytree(out, tmp_path / "out")
    return story, tmp_path / "out"


def _variant(tmp_path, name, change):
    """STORY with one change (a function of a deep copy), written to tmp_path/name."""
    data = json.loads(json.dumps(STORY))
    change(data)
    return _write(tmp_path / name, data)


# ---------------------------------------------------------------------------------------------- --force (3)
def test_force_over_a_longer_story_starts_over(rendered, tmp_path):
    _, out = _copy(rendered, tmp_path)
    shorter = _write(tmp_path / "short.json", {"prompts": ["a green star", "a yellow moon"]})
    assert main(_args(shorter, out, "--force")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["prompt"] for s in manifest["shots"]] == ["a green star", "a yellow moon"] and manifest["finished"]
    # Nothing of the longer story stays behind to be mistaken for this one's.
    assert sorted(p.name for p in (out / "shots").iterdir()) == ["01_01.mp4", "01_02.mp4"]
    assert not (out / "keyframes" / "02_01").exists() and not (out / "memory" / "after_02_01").exists()
    frames = sum(len(read_video(out / s["file"])[0]) for s in manifest["shots"])
    assert len(read_video(out / "story.mp4")[0]) == frames
    # Over a manifest that cannot be read at all, too.
    (out / "manifest.json").write_text("{ not json")
    assert main(_args(shorter, out, "--force", "--seed", "2")) == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 2


# ---------------------------------------------------------------------------------------------- --from-shot (4)
def test_from_shot_never_keeps_another_storys_shots(rendered, tmp_path, no_model, capsys):
    _, out = _copy(rendered, tmp_path)
    before = _snapshot(out)
    first = _variant(tmp_path, "first.json", lambda d: d["scenes"][0]["video_prompts"].__setitem__(0, "a cat"))
    assert main(_args(first, out, "--from-shot", "2")) == 2
    line = _one_error_line(capsys.readouterr().err, "--from-shot 2", "shot 1", "mix two stories", "--force")
    assert "--from-shot K" not in line  # nothing of this folder can be kept
    second = _variant(tmp_path, "second.json", lambda d: d["scenes"][0]["cut"].__setitem__(1, True))
    assert main(_args(second, out, "--from-shot", "3")) == 2
    _one_error_line(capsys.readouterr().err, "shot 2", "cut false -> true", "--from-shot K (K <= 2)")
    assert _snapshot(out) == before
    # From the first differing shot on is fine: shot 1 is the same in both stories.
    story, options = options_from_args(build_parser().parse_args(_args(second, out, "--from-shot", "2")))
    assert render.prepare(story, options).start == 1


def test_a_changed_story_is_refused_without_recommending_a_mix(rendered, tmp_path, no_model, capsys):
    _, out = _copy(rendered, tmp_path)
    first = _variant(tmp_path, "first.json", lambda d: d["scenes"][0]["video_prompts"].__setitem__(0, "a cat"))
    assert main(_args(first, out)) == 2
    line = _one_error_line(capsys.readouterr().err, "story: shot 1: prompt", "--force")
    assert "--from-shot" not in line
    later = _variant(tmp_path, "later.json", lambda d: d["scenes"][1]["video_prompts"].__setitem__(0, "a cat"))
    assert main(_args(later, out)) == 2
    _one_error_line(capsys.readouterr().err, "story: shot 3: prompt", "--from-shot K (K <= 3)")


def test_settings_are_recorded_per_shot(rendered, tmp_path, monkeypatch, capsys):
    story, out = _copy(rendered, tmp_path)
    assert main(_args(story, out, "--from-shot", "3", "--seed", "5")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["settings"]["seed"] for s in manifest["shots"]] == [0, 0, 5]
    assert [s["seed"] for s in manifest["shots"]] == [0, 1, 7] and manifest["settings"]["seed"] == 5
    assert all(s["settings"]["steps"] == 1 for s in manifest["shots"])
    # A rerun is compared with the last finished shot's record: the latest settings resume, the first ones differ.
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)
    assert main(_args(story, out, "--seed", "5")) == 0
    assert main(_args(story, out)) == 2
    _one_error_line(capsys.readouterr().err, "seed: 5 -> 0")


# ---------------------------------------------------------------------------------------------- adapters (5)
@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A rank-4 storymem adapter for the tiny base, with non-zero B (it changes the output)."""
    from storymem.lora import StoryMemLoraConfig, add_storymem_adapter, save_storymem_lora

    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    pipe = builtin.load_builtin_pipeline("tiny")
    config = StoryMemLoraConfig(rank=4, alpha=4.0, conditioning="m2v")
    generator = torch.Generator().manual_seed(0)
    for model in (pipe.transformer, pipe.transformer_2):
        add_storymem_adapter(model, config)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=generator) * 0.1
    save_storymem_lora(folder, {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}, config)
    return folder


KEY_A = "transformer.blocks.0.attn1.to_q.lora_A.weight"
KEY_B = "transformer.blocks.0.attn1.to_q.lora_B.weight"


def _edit_tensors(change):
    def edit(folder):
        path = folder / "high_noise.safetensors"
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path, metadata=metadata)
        return path.name
    return edit


def _truncate(folder):
    path = folder / "low_noise.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path.name


def _config_rank(folder):
    path = folder / "storymem_adapter.json"
    _write(path, dict(json.loads(path.read_text()), rank=8))
    return "high_noise.safetensors"


def _published(values, truncate=False):
    """A published-format folder (.pth, peft keys on the original WanModel) from the adapter's tensors."""
    def make(folder):
        from storymem.lora import ORIGINAL_TO_DIFFUSERS

        back = {v: k for k, v in ORIGINAL_TO_DIFFUSERS.items()}
        for expert, stem in (("high_noise", "backbone_high_noise"), ("low_noise", "backbone_low_noise")):
            tensors = load_file(folder / f"{expert}.safetensors")
            renamed = {}
            for key, value in tensors.items():
                _, _, block, rest = key.split(".", 3)
                module, which = rest.rsplit(".lora_", 1)
                renamed[f"base_model.model.blocks.{block}.{back[module]}.lora_{which}"] = values(key, value)
            torch.save(renamed, folder / f"{stem}.pth")
            (folder / f"{expert}.safetensors").unlink()
        (folder / "storymem_adapter.json").unlink()
        if truncate:
            path = folder / "backbone_low_noise.pth"
            path.write_bytes(path.read_bytes()[:-200])
        return "backbone_low_noise.pth" if truncate else "backbone_high_noise.pth"
    return make


def _nan_at(key):
    def values(name, value):
        if name == key:
            value = value.clone()
            value[0, 0] = float("nan")
        return value
    return values


BROKEN_ADAPTERS = {
    "NaN value": (_edit_tensors(lambda t: t[KEY_B].__setitem__((0, 0), float("nan"))), "values are not finite"),
    "infinite value": (_edit_tensors(lambda t: t[KEY_A].__setitem__((1, 2), float("inf"))), "values are not finite"),
    "integer dtype": (_edit_tensors(lambda t: t.__setitem__(KEY_A, t[KEY_A].to(torch.int32))),
                      "not a floating point type"),
    "truncated file": (_truncate, "damaged or truncated"),
    "rank of one layer": (_edit_tensors(lambda t: t.__setitem__(KEY_A, t[KEY_A][:3])), "disagree on the rank"),
    "features of one layer": (_edit_tensors(lambda t: t.__setitem__(KEY_B, torch.zeros(25, 4))),
                              "maps 24 -> 25 features; the base model's layer maps 24 -> 24"),
    "missing B": (_edit_tensors(lambda t: t.pop(KEY_B)), "lora_B is missing"),
    "unknown key": (_edit_tensors(lambda t: t.__setitem__("transformer.blocks.0.attn1.to_q.lora_C.weight",
                                                          torch.zeros(4, 24))), "unexpected key"),
    "block beyond the base": (_edit_tensors(lambda t: t.update(
        {k.replace("blocks.1.", "blocks.2."): v.clone() for k, v in t.items() if "blocks.1." in k})),
        "block 2, but the base model has 2 blocks"),
    "rank against the config": (_config_rank, "rank 4, but storymem_adapter.json says 8"),
    "published .pth with NaN": (_published(_nan_at(KEY_B)), "values are not finite"),
    "truncated published .pth": (_published(lambda k, v: v, truncate=True), "damaged or truncated"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_ADAPTERS))
def test_broken_adapter_is_refused_before_any_model_loads(case, adapter, rendered, tmp_path, no_model, capsys):
    story, out = _copy(rendered, tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    corrupt, expected = BROKEN_ADAPTERS[case]
    file_name = corrupt(broken)
    before = _snapshot(out)
    # Even with --force a good render is not touched: nothing loads and nothing is written.
    assert main(_args(story, out, "--lora", str(broken), "--force")) == 2
    _one_error_line(capsys.readouterr().err, f"--lora {broken}", file_name, expected)
    assert _snapshot(out) == before


def test_loading_refuses_non_finite_weights(adapter, tmp_path):
    from storymem.lora import AdapterError

    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    BROKEN_ADAPTERS["NaN value"][0](broken)
    pipe = builtin.load_builtin_pipeline("tiny")
    with pytest.raises(AdapterError, match=f"high_noise.safetensors: {KEY_B}: 1 of 96 values are not finite"):
        pipe.load_storymem_lora(broken)
    assert not getattr(pipe.transformer, "peft_config", None)  # nothing was loaded into the model


BROKEN_DECODES = {
    "NaN": lambda f: np.full_like(f, np.nan),
    "infinity": lambda f: np.where(np.arange(f.size).reshape(f.shape) == 7, np.inf, f),
    "black": np.zeros_like,
    "one grey": lambda f: np.full_like(f, 0.5),
}


@pytest.mark.parametrize("case", sorted(BROKEN_DECODES))
def test_a_shot_that_decodes_to_nothing_stops_the_render(case, tmp_path, monkeypatch, capsys):
    original = StoryMemPipeline.__call__
    calls = []

    def broken_second_shot(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            out.frames = np.stack([BROKEN_DECODES[case](np.asarray(out.frames[0]))])
        return out

    monkeypatch.setattr(StoryMemPipeline, "__call__", broken_second_shot)
    story, out = _write(tmp_path / "s.json", STORY), tmp_path / "out"
    assert main(_args(story, out)) == 2
    _one_error_line(capsys.readouterr().err, "shot 2 (01_02, MI2V)", "nothing of this shot was written")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["stem"] for s in manifest["shots"]] == ["01_01"] and not manifest["finished"]
    assert not (out / "shots" / "01_02.mp4").exists() and not (out / "keyframes" / "01_02").exists()
    assert not (out / "memory" / "after_01_02").exists()


# ---------------------------------------------------------------------------------------------- one writer (6)
def test_a_folder_in_use_is_refused_at_once(rendered, tmp_path, no_model, capsys):
    story, out = _copy(rendered, tmp_path)
    with FolderLock(out, owner="storymem studio", purpose="rendering 'x'"):
        before = _snapshot(out)
        assert main(_args(story, out, "--from-shot", "2")) == 2
        _one_error_line(capsys.readouterr().err, f"{out} is in use by storymem studio (pid {os.getpid()}",
                        "rendering 'x'")
        assert _snapshot(out) == before


def test_a_second_render_into_a_working_folder_stops_at_once(tmp_path, monkeypatch, capsys):
    """Two renders into one folder, the second with --force: the second stops, the first finishes untouched."""
    story, out = _write(tmp_path / "s.json", STORY), tmp_path / "out"
    original = StoryMemPipeline.__call__
    seen = []

    def second_render_meanwhile(self, *args, **kwargs):
        if not seen:
            holder = read_lock_holder(out)
            seen.append(holder)
            with pytest.raises(FolderLockError):
                FolderLock(out).acquire()
            seen.append(main(_args(story, out, "--force", "--seed", "3")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StoryMemPipeline, "__call__", second_render_meanwhile)
    assert main(_args(story, out)) == 0
    holder, code = seen
    assert holder["owner"] == "storymem render" and holder["pid"] == os.getpid() and code == 2
    assert "is in use by storymem render" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] and manifest["settings"]["seed"] == 0
    assert not (out / ".storymem.lock").exists()  # given back
    FolderLock(out).acquire().release()


def test_a_caller_that_holds_the_lock_renders_under_it(tmp_path):
    story = _write(tmp_path / "s.json", {"prompts": ["a red circle"]})
    options = render.RenderOptions(out_dir=tmp_path / "out", base="tiny", height=32, width=32, frames=5, steps=1,
                                   device="cpu", progress=False)
    with FolderLock(tmp_path / "out", owner="storymem studio") as lock:
        manifest = render.render_story(story, options, lock=lock)
        assert manifest["finished"] and lock.held
    with pytest.raises(render.RenderError, match="is in use by storymem studio"):
        with FolderLock(tmp_path / "out", owner="storymem studio"):
            render.render_story(story, dataclasses.replace(options, force=True))


def test_an_unwritable_folder_is_found_before_any_model_loads(rendered, tmp_path, monkeypatch, no_model, capsys):
    story, out = _copy(rendered, tmp_path)
    before = _snapshot(out)
    locked = out / "keyframes" / "01_02"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if os.fspath(path) == str(locked)
                        else real_access(path, mode))
    assert main(_args(story, out, "--from-shot", "2")) == 2
    _one_error_line(capsys.readouterr().err, f"{locked}: folder is not writable")
    assert _snapshot(out) == before  # the manifest was not cut back


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_found_before_any_model_loads(rendered, tmp_path, no_model, capsys):
    story, out = _copy(rendered, tmp_path)
    (out / "samples" / "01_02").chmod(0o555)
    try:
        assert main(_args(story, out, "--from-shot", "2")) == 2
        _one_error_line(capsys.readouterr().err, "samples/01_02: folder is not writable")
    finally:
        (out / "samples" / "01_02").chmod(0o755)


def test_a_failed_write_is_one_line(tmp_path, monkeypatch, capsys):
    story, out = _write(tmp_path / "s.json", STORY), tmp_path / "out"
    original = render_outputs.write_shot_files

    def full_disk(out_dir, stem, *args, **kwargs):
        if stem == "01_02":
            raise OSError(28, "No space left on device", str(out_dir / "shots" / "01_02.mp4"))
        return original(out_dir, stem, *args, **kwargs)

    monkeypatch.setattr(render_outputs, "write_shot_files", full_disk)
    assert main(_args(story, out)) == 1
    _one_error_line(capsys.readouterr().err, "01_02.mp4: No space left on device", "rerun the same command")
    assert [s["stem"] for s in json.loads((out / "manifest.json").read_text())["shots"]] == ["01_01"]


def test_a_base_that_does_not_load_is_one_line_and_leaves_no_folder(tmp_path, capsys):
    story, out = _write(tmp_path / "s.json", STORY), tmp_path / "out"
    (tmp_path / "not_a_model").mkdir()
    args = ["--story", str(story), "--out", str(out), "--base", str(tmp_path / "not_a_model"), "--device", "cpu",
            "--embedder", "pixel", "--aesthetic", "none", "--no-progress"]
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err, f"--base {tmp_path / 'not_a_model'}: cannot load it")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- offline (7)
@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE on, and an empty Hugging Face cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


def test_offline_render_names_every_download(offline, tmp_path, capsys):
    story, out = _write(tmp_path / "s.json", STORY), tmp_path / "out"
    assert main(["--story", str(story), "--out", str(out), "--device", "cpu"]) == 2
    line = _one_error_line(capsys.readouterr().err, "HF_HUB_OFFLINE", "--base Wan-AI/Wan2.2-I2V-A14B-Diffusers",
                           "--embedder", "--aesthetic hpsv3",
                           "huggingface-cli download Wan-AI/Wan2.2-I2V-A14B-Diffusers",
                           "timm/vit_base_patch32_clip_224.openai", "MizzenAI/HPSv3", "Qwen/Qwen2-VL-7B-Instruct",
                           "HF_HUB_OFFLINE=1 runs without a network")
    assert "config.json" not in line and not out.exists()


def test_unreachable_hub_names_the_weights_not_a_config_file(monkeypatch, tmp_path):
    from diffusers import AutoencoderKLWan
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")  # online, but the download fails
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))

    def unreachable(name, *args, **kwargs):
        raise OSError(f"{name} does not appear to have a file named config.json.")

    monkeypatch.setattr(AutoencoderKLWan, "from_pretrained", unreachable)
    options = render.RenderOptions(device="cpu").resolved()
    with pytest.raises(render.RenderError) as caught:
        render_models.load_pipeline(options)
    message = str(caught.value)
    assert message.startswith("--base Wan-AI/Wan2.2-I2V-A14B-Diffusers: the weights")
    assert "the hub cannot be reached" in message and "huggingface-cli download" in message
    assert "config.json" not in message


def test_open_clip_and_hpsv3_name_their_weights_offline(offline, monkeypatch):
    import open_clip

    from storymem.hub import MissingWeightsError
    from storymem.memory import OpenCLIPEmbedder
    from storymem.memory.hpsv3 import HPSv3Scorer

    with pytest.raises(MissingWeightsError, match="open_clip ViT-B-32:openai: the weights "
                                                  "\\(timm/vit_base_patch32_clip_224.openai\\)"):
        OpenCLIPEmbedder("ViT-B-32", "openai", device="cpu").load()  # storymem prepare --embedder clip
    with pytest.raises(MissingWeightsError, match="HPSv3: the weights \\(MizzenAI/HPSv3, Qwen/Qwen2-VL-7B-Instruct\\)"):
        HPSv3Scorer(device="cpu").load()
    # Without HF_HUB_OFFLINE the download is tried; its failure is reported the same way.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': connection refused")

    monkeypatch.setattr(open_clip, "create_model", no_network)
    with pytest.raises(MissingWeightsError, match="the hub cannot be reached"):
        OpenCLIPEmbedder("ViT-L-14", "openai", device="cpu").load()


def test_offline_eval_names_its_encoder_weights(offline, rendered, capsys):
    from storymem import evaluation

    _, out = rendered
    assert evaluation.main([str(out), "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "open_clip ViT-L-14:openai: the weights (timm/vit_large_patch14_clip_224.openai)" in err
    assert "huggingface-cli download" in err and not (out / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------- font (9)
def test_contact_sheet_font_draws_dashes_accents_and_cjk():
    from storymem.render import report

    assert report.FONT_PATH.is_file() and report.FONT_PATH.parent.parent == __import__("pathlib").Path(
        render.__file__).parent  # inside the package, not a system path
    font = report._font(14)
    notdef = np.asarray(font.getmask("\ue000"))  # a private-use code point: the font's empty box
    for char in "—éüñç中文한あЖΩ":
        mask = np.asarray(font.getmask(char))
        assert mask.any(), char
        assert mask.shape != notdef.shape or not np.array_equal(mask, notdef), f"{char!r} draws as the empty box"
    setup = (__import__("pathlib").Path(render.__file__).parents[2] / "setup.cfg").read_text()
    assert "render/fonts/*.otf" in setup and "render/fonts/OFL.txt" in setup


# ---------------------------------------------------------------------------------------------- options (classes)
def _prepare(tmp_path, **change):
    from storymem.story import load_story

    story = load_story(_write(tmp_path / "s.json", STORY))
    options = render.RenderOptions(out_dir=tmp_path / "out", base="tiny", device="cpu", height=32, width=32,
                                   frames=5, steps=1, progress=False)
    return render.prepare(story, dataclasses.replace(options, **change))


NAN, INF = float("nan"), float("inf")
BAD_OPTIONS = [
    # (field, value, what the error says)
    *[("height", v, "--height") for v in (0, -16, 8, 40, 16.0, True, 2048)],  # 2048: 128 patches > tiny's 64
    *[("width", v, "--width") for v in (0, -32, 24, 4096)],
    *[("area", v, "--area") for v in (0, -1, 255, 256.5)],
    *[("frames", v, "--frames") for v in (0, 1, -3, 6, 5.0, 1001)],  # 1001 frames: 251 latent > 64
    *[("fps", v, "--fps") for v in (0, -16, 10 ** 6, 16.5)],
    *[("steps", v, "--steps") for v in (0, -1, 10 ** 6, NAN)],
    *[("seed", v, "--seed") for v in (-1, 2 ** 64, 1.5)],
    *[("guidance", v, "--guidance") for v in (0.0, 0.5, -1.0, NAN, INF, "3")],
    *[("guidance_2", v, "--guidance-2") for v in (0.0, NAN, -INF)],
    *[("memory_guidance", v, "--memory-guidance") for v in (-0.5, NAN, INF)],
    *[("shift", v, "--shift") for v in (0.0, -3.0, NAN, INF)],
    *[("t2v_shift", v, "--t2v-shift") for v in (0.0, NAN)],
    *[("t2v_guidance", v, "--t2v-guidance") for v in (0.0, NAN)],
    *[("t2v_guidance_2", v, "--t2v-guidance-2") for v in (0.5, INF)],
    *[("lora_scale", v, "--lora-scale") for v in (-1.0, NAN, INF)],
    *[("max_memory", v, "--max-memory") for v in (0, -1, 13, 10 ** 6)],  # 13 * 5 >= tiny's 64 positions
    *[("sink", v, "--sink") for v in (-1, 11)],
    *[("keyframe_threshold", v, "--keyframe-threshold") for v in (1.5, -2.0, NAN)],
    *[("memory_min_relevance", v, "--memory-min-relevance") for v in (-0.1, 1.5, NAN)],
    *[("memory_relative_relevance", v, "--memory-relative-relevance") for v in (-0.1, 2.0, INF)],
    *[(name, "", f"--{name.replace('_', '-')}") for name in ("base", "lora", "t2v_model", "device",
                                                             "attention_backend", "embedder", "hpsv3_checkpoint",
                                                             "hpsv3_base")],
    ("from_shot", "", "--from-shot"),
    ("embedder", "ViT-B-32:", "--embedder"),
    ("device", "cuda:7", "--device"),
    ("dtype", "float8", "--dtype"),
]


@pytest.mark.parametrize("field, value, flag", BAD_OPTIONS, ids=[f"{f}={v!r}" for f, v, _ in BAD_OPTIONS])
def test_every_option_is_checked_for_its_real_range(field, value, flag, tmp_path, no_model):
    with pytest.raises(render.RenderError) as caught:
        _prepare(tmp_path, **{field: value})
    assert str(caught.value).startswith(flag) and "\n" not in str(caught.value), str(caught.value)
    assert not (tmp_path / "out").exists()


def test_ranges_that_depend_on_the_memory_layout(tmp_path, no_model):
    # Contiguous memory sits beside the shot: 60 memory + 5 latent frames exceed tiny's 64 positions...
    with pytest.raises(render.RenderError, match="--max-memory 60 with --frames 17: 60 memory \\+ 5 shot latent"):
        _prepare(tmp_path, memory_rope="contiguous", max_memory=60, frames=17)
    # ... negative memory RoPE spaces them 5 apart: 12 fit, 13 do not.
    assert _prepare(tmp_path, max_memory=12, sink=3).start == 0
    # Without memory the memory size does not matter; an area whose size does not fit names the area.
    assert _prepare(tmp_path, max_memory=50, memory_source="none").start == 0
    with pytest.raises(render.RenderError, match="--area 4194304: a height of [0-9]+: [0-9]+ patches do not fit"):
        _prepare(tmp_path, height=None, width=None, area=2048 * 2048)


FROM_SHOT = {"2x": "2x", "02_1": "02_1", "0": "0", "-1": "-1", "+2": "+2", "space": " 2", "trailing": "2 ",
             "arabic digit": "\u0663", "underscore number": "1_0", "stem plus": "01_01x", "leading zero": "02",
             "too far": "4", "no such stem": "03_01"}


@pytest.mark.parametrize("case", sorted(FROM_SHOT))
def test_shot_identifiers_are_parsed_strictly(case, rendered, tmp_path, no_model, capsys):
    story, out = _copy(rendered, tmp_path)
    assert main(_args(story, out, "--from-shot", FROM_SHOT[case])) == 2
    _one_error_line(capsys.readouterr().err, "--from-shot")


def test_shot_numbers_are_not_read_loosely():
    """int() would read "1_0" as 10, " 2" and "+2" as 2 and "\u0663" (Arabic-Indic three) as 3."""
    from storymem.render.plan import _resolve_from_shot
    from storymem.story import Story

    story = Story.from_prompts([f"shot {i}" for i in range(25)])
    for value in ("1_0", "02_1", " 2", "2 ", "+2", "\u0663", "02", "2.0", "1e1"):
        with pytest.raises(render.RenderError, match="--from-shot"):
            _resolve_from_shot(value, story)
    assert [_resolve_from_shot(v, story) for v in ("1", "25", "01_10", 7)] == [0, 24, 9, 6]


def test_shot_identifiers_that_are_accepted(rendered, tmp_path, no_model):
    story, out = _copy(rendered, tmp_path)
    for value, start in (("1", 0), ("3", 2), ("01_02", 1), ("02_01", 2)):
        story_obj, options = options_from_args(build_parser().parse_args(_args(story, out, "--from-shot", value)))
        assert render.prepare(story_obj, options).start == start


BAD_COMMAND_LINES = {
    "not a number": (["--steps", "many"], "argument --steps: invalid int value"),
    "zero steps": (["--steps", "0"], "--steps 0"),
    "zero fps": (["--fps", "0"], "--fps 0"),
    "negative seed": (["--seed", "-1"], "--seed -1"),
    "nan guidance": (["--guidance", "nan"], "--guidance nan"),
    "guidance below 1": (["--guidance", "0.5"], "--guidance 0.5"),
    "frames beyond the rope table": (["--frames", "401"], "--frames 401: 101 latent frames do not fit"),
    "empty base": (["--base", ""], "--base ''"),
    "unknown flag": (["--colour", "red"], "unrecognized arguments: --colour red"),
    "bad choice": (["--memory-source", "sometimes"], "argument --memory-source: invalid choice"),
    "unknown story field": (["--story-field"], "unknown field 'video_prompt'; did you mean 'video_prompts'?"),
}


@pytest.mark.parametrize("case", sorted(BAD_COMMAND_LINES))
def test_every_bad_command_line_is_one_line(case, tmp_path, no_model, capsys):
    extra, expected = BAD_COMMAND_LINES[case]
    story = _write(tmp_path / "s.json", STORY)
    if extra == ["--story-field"]:  # this story instead of the good one (two stories would be a batch)
        story, extra = _write(tmp_path / "typo.json", {"scenes": [
            {"scene_num": 1, "video_prompt": ["a red circle"], "cut": [True]}]}), []
    assert main(_args(story, tmp_path / "out", *extra)) == 2
    _one_error_line(capsys.readouterr().err, expected)
    assert not (tmp_path / "out").exists()


def test_a_user_error_never_prints_a_traceback(tmp_path):
    """The console script end to end: one line on stderr, exit code 2."""
    story = _write(tmp_path / "s.json", STORY)
    root = str(__import__("pathlib").Path(render.__file__).parents[2])  # this checkout, not an installed copy
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    for extra in (["--frames", "6"], ["--from-shot", "02_1"], []):  # [] : the default base, offline
        done = subprocess.run([sys.executable, "-m", "storymem", "render", "--story", str(story), "--out",
                               str(tmp_path / "out"), "--device", "cpu", *extra], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 2, done.stderr
        _one_error_line(done.stderr)
    assert not (tmp_path / "out").exists()


def test_outputs_have_the_users_file_modes(rendered):
    _, out = rendered  # rendered under umask 027
    for path in [out, *out.rglob("*")]:
        expected = 0o750 if path.is_dir() else 0o640
        assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode & 0o777))


def test_atomic_writes_follow_the_umask(tmp_path):
    from storymem.atomic import atomic_folder, atomic_write_bytes

    for mask in (0o022, 0o077, 0o002):
        old = os.umask(mask)
        try:
            path = atomic_write_bytes(tmp_path / f"f{mask:o}.bin", b"x")
            with atomic_folder(tmp_path / f"d{mask:o}") as folder:
                (folder / "a.txt").write_text("a")
        finally:
            os.umask(old)
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask
        assert (tmp_path / f"d{mask:o}").stat().st_mode & 0o777 == 0o777 & ~mask


# ---------------------------------------------------------------------------------------------- cosmetics
def test_render_help_names_each_default_once_and_every_flag_has_help():
    parser = build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 10, action.dest
        assert action.help.count("(default") <= 1, action.dest
    helps = {a.dest: a.help for a in parser._actions}
    assert "frame rate" in helps["fps"] and "seed" in helps["seed"]


def test_no_progress_hides_the_loading_bars(tmp_path, capfd):
    from storymem.builtin.tiny import build_tiny_components

    StoryMemPipeline(**build_tiny_components(seed=0)).save_pretrained(tmp_path / "base")
    capfd.readouterr()
    story = _write(tmp_path / "s.json", {"prompts": ["a red circle"]})
    common = ["--story", str(story), "--base", str(tmp_path / "base"), "--height", "32", "--width", "32",
              "--frames", "5", "--steps", "1", "--device", "cpu", "--embedder", "pixel", "--aesthetic", "none",
              "--shift", "3.0"]
    assert main([*common, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    quiet = capfd.readouterr().err
    assert "Loading" not in quiet and "it/s" not in quiet and "%|" not in quiet, quiet
    assert main([*common, "--out", str(tmp_path / "bars")]) == 0
    assert "Loading pipeline components" in capfd.readouterr().err  # the bars the flag hides
    # The built-in model's folder too (the demo).
    assert main(["--demo", "--out", str(tmp_path / "demo"), "--frames", "5", "--height", "32", "--width", "32",
                 "--steps", "1", "--no-progress"]) == 0
    quiet = capfd.readouterr().err
    assert "Loading" not in quiet and "it/s" not in quiet, quiet
