"""Story rendering end to end on the tiny model: outputs, manifest, modes, resume, --from-shot, the demo."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from storymem import builtin, render
from storymem.memory import MemoryBank
from storymem.pipeline import WAN_NEGATIVE_PROMPT, StoryMemPipeline
from storymem.render import main
from storymem.render import models as render_models
from storymem.render.cli import build_parser, options_from_args
from storymem.video import read_video

STORY = {
    "story_name": "two scenes",
    "story_overview": "a red circle in the meadow, then a blue square in the city",
    "scenes": [
        {"scene_num": 1, "video_prompts": ["a red circle in a green meadow", "the red circle walks to the tree"],
         "cut": [True, False]},
        {"scene_num": 2, "video_prompts": ["a blue square in a gray city at night"], "cut": [True]},
    ],
}
FAST = ["--base", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--steps", "1", "--no-progress",
        "--device", "cpu"]


def _story(tmp_path, data=STORY, name="story.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _args(story, out, *extra):
    return ["--story", str(story), "--out", str(out), *FAST, *extra]


@pytest.fixture
def count_calls(monkeypatch):
    """Count StoryMemPipeline calls; `fail_at=k` raises KeyboardInterrupt on the k-th call (1-based)."""
    state = {"calls": 0, "fail_at": None}
    original = StoryMemPipeline.__call__

    def counted(self, *args, **kwargs):
        state["calls"] += 1
        if state["fail_at"] == state["calls"]:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StoryMemPipeline, "__call__", counted)
    return state


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """One finished render of STORY (tests that change it work on a copy)."""
    tmp = tmp_path_factory.mktemp("rendered")
    story = _story(tmp)
    out = tmp / "out"
    assert main(_args(story, out)) == 0
    return story, out


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def _copy(rendered, tmp_path):
    story, out = rendered
    shutil.copytree(out, tmp_path / "out")
    return story, tmp_path / "out"


# ---------------------------------------------------------------------------------------------- outputs
def test_outputs_manifest_and_modes(rendered):
    story, out = rendered
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] is True and manifest["num_shots"] == 3
    assert manifest["story"]["story_name"] == "two scenes" and manifest["story"]["path"] == str(story.resolve())
    assert manifest["story"]["scenes"][0]["cut"] == [True, False]
    assert set(manifest["versions"]) >= {"storymem", "torch", "diffusers"}
    assert manifest["settings"]["steps"] == 1 and manifest["settings"]["frames"] == 5

    shots = manifest["shots"]
    assert [s["index"] for s in shots] == [0, 1, 2]
    assert [s["file"] for s in shots] == ["shots/01_01.mp4", "shots/01_02.mp4", "shots/02_01.mp4"]
    assert [s["prompt"] for s in shots] == STORY["scenes"][0]["video_prompts"] + STORY["scenes"][1]["video_prompts"]
    # MI2V exactly where cut is false; seeds = base + global index.
    assert [s["mode"] for s in shots] == ["m2v", "mi2v", "m2v"]
    assert [s["seed"] for s in shots] == [0, 1, 2]

    total = 0
    for s in shots:
        frames, fps = read_video(out / s["file"])
        # MI2V drops the frame that repeats the previous shot's last frame.
        assert frames.shape == ((4 if s["mode"] == "mi2v" else 5), 32, 32, 3) and fps == 16
        assert s["num_frames"] == len(frames)
        total += len(frames)
        for k in s["keyframes"]:
            assert (out / k["file"]).is_file()
        for m in s["memory"]:
            assert m["kind"] == "keyframe" and (out / m["file"]).is_file()
        assert all((out / f).is_file() for f in s["samples"])
        assert (out / s["memory_state"] / "memory_bank.json").is_file()
    story_frames, _ = read_video(out / "story.mp4")
    assert len(story_frames) == total

    # The memory each shot saw is what the bank held after the previous shot (by shot/frame id).
    assert shots[0]["memory"] == []
    for prev, shot in zip(shots, shots[1:]):
        bank = MemoryBank.load(out / prev["memory_state"])
        assert [(m["shot"], m["frame"]) for m in shot["memory"]] == [(e.shot, e.frame_index) for e in bank.entries()]
    first_keys = [(0, k["frame"]) for k in shots[0]["keyframes"]]
    assert [(m["shot"], m["frame"]) for m in shots[1]["memory"]] == first_keys and first_keys

    page = (out / "index.html").read_text()
    assert all(f'src="{s["file"]}"' in page for s in shots) and page.count("<video") == 3
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 100 and sheet.height > 3 * 96


def test_rerun_of_finished_render_loads_no_model(rendered, tmp_path, monkeypatch):
    story, out = _copy(rendered, tmp_path)
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)
    before = {k: v for k, v in _snapshot(out).items() if k.startswith("shots/")}
    assert main(_args(story, out)) == 0
    assert {k: v for k, v in _snapshot(out).items() if k.startswith("shots/")} == before


# ---------------------------------------------------------------------------------------------- resume
def test_interrupted_render_resumes_with_the_same_result(rendered, tmp_path, count_calls, capsys):
    story, reference = rendered
    out = tmp_path / "out"
    count_calls["fail_at"] = 2  # interrupt while generating shot 2
    assert main(_args(story, out)) == 130
    assert "rerun the same command" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shots"]] == [0] and not manifest["finished"]
    assert not (out / "shots" / "01_02.mp4").exists()
    assert not [p for p in out.rglob("*.tmp*")]  # no temporary files left behind
    first_mtime = (out / "shots" / "01_01.mp4").stat().st_mtime_ns

    count_calls["fail_at"], count_calls["calls"] = None, 0
    assert main(_args(story, out)) == 0
    assert count_calls["calls"] == 2  # shots 2 and 3 only
    assert (out / "shots" / "01_01.mp4").stat().st_mtime_ns == first_mtime
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shots"]] == [0, 1, 2] and manifest["finished"]
    # The restored memory gives exactly what the uninterrupted render gave.
    for name in ("01_02", "02_01"):
        np.testing.assert_array_equal(read_video(out / "shots" / f"{name}.mp4")[0],
                                      read_video(reference / "shots" / f"{name}.mp4")[0])


def test_from_shot_rerenders_from_there(rendered, tmp_path, count_calls):
    story, out = _copy(rendered, tmp_path)
    before = _snapshot(out)
    assert main(_args(story, out, "--from-shot", "2")) == 0
    assert count_calls["calls"] == 2
    after = _snapshot(out)
    assert after["shots/01_01.mp4"] == before["shots/01_01.mp4"]
    assert after["shots/01_02.mp4"] != before["shots/01_02.mp4"]
    assert after["shots/02_01.mp4"] != before["shots/02_01.mp4"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["mode"] for s in manifest["shots"]] == ["m2v", "mi2v", "m2v"] and manifest["finished"]

    # A file stem works too, and a changed setting is allowed from there on.
    count_calls["calls"] = 0
    assert main(_args(story, out, "--from-shot", "02_01", "--seed", "5")) == 0
    assert count_calls["calls"] == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["seed"] for s in manifest["shots"]] == [0, 1, 7] and manifest["settings"]["seed"] == 5


def test_changed_settings_are_refused_unless_forced(rendered, tmp_path, monkeypatch, capsys):
    story, out = _copy(rendered, tmp_path)
    before = _snapshot(out)
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)
    assert main(_args(story, out, "--steps", "3")) == 2
    err = capsys.readouterr().err
    assert "steps: 1 -> 3" in err and "--force" in err
    assert _snapshot(out) == before
    # --force starts over (checked without rendering: the plan starts at shot 1 with a fresh memory).
    story_obj, options = options_from_args(build_parser().parse_args(_args(story, out, "--steps", "3", "--force")))
    plan = render.prepare(story_obj, options)
    assert plan.start == 0 and plan.bank is None and _snapshot(out) == before


# ---------------------------------------------------------------------------------------------- bad input
def _must_not_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the inputs were checked")


def _bad_image(tmp_path):
    path = tmp_path / "ref.png"
    path.write_text("not an image")
    return ["--reference-images", str(path)]


BAD = {
    "missing story": (lambda tmp: ["--story", str(tmp / "nope.json")], "nope.json"),
    "invalid json": (lambda tmp: ["--story", str(_write(tmp / "s.json", "{oops"))], "invalid JSON"),
    "cut list length": (lambda tmp: ["--story", str(_write(tmp / "s.json", json.dumps(
        {"scenes": [{"scene_num": 1, "video_prompts": ["a", "b"], "cut": [True]}]})))], "'cut'"),
    "empty prompt": (lambda tmp: ["--story", str(_write(tmp / "s.json", json.dumps(
        {"scenes": [{"scene_num": 1, "video_prompts": ["a red circle", "  "], "cut": [True, True]}]})))],
        "shot 2"),
    "unreadable reference": (_bad_image, "ref.png"),
    "missing first image": (lambda tmp: ["--first-image", str(tmp / "none.png")], "none.png"),
    "unwritable output": (lambda tmp: ["--out", str(_write(tmp / "file", "x") / "out")], "not a folder"),
    "frames not 4n+1": (lambda tmp: ["--frames", "6"], "--frames 6"),
    "size not multiple of 16": (lambda tmp: ["--height", "40"], "--height 40"),
    "two first-shot sources": (lambda tmp: ["--first-image", str(_png(tmp / "a.png"))] + ["--reference-images",
                                                                                         str(_png(tmp / "b.png"))],
                               "only one"),
    "sink above max memory": (lambda tmp: ["--max-memory", "2", "--sink", "3"], "--sink 3"),
    "lora scale without an adapter": (lambda tmp: ["--lora-scale", "0.5"], "no --lora to scale"),
    "negative lora scale": (lambda tmp: ["--lora-scale", "-1"], "--lora-scale -1.0"),
    "from-shot out of range": (lambda tmp: ["--from-shot", "9"], "--from-shot 9"),
}


def _write(path, text):
    path.write_text(text)
    return path


def _png(path, size=(24, 40)):
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_before_any_model_loads(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)
    monkeypatch.setattr(builtin, "load_builtin_pipeline", _must_not_load)
    monkeypatch.setattr(render_models, "load_t2v_pipeline", _must_not_load)
    out = tmp_path / "existing"
    out.mkdir()
    extra, expected = BAD[case]
    extra = extra(tmp_path)
    story = [] if "--story" in extra else ["--story", str(_story(tmp_path))]  # several --story: a batch
    args = [*story, "--out", str(out), *FAST, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and expected in err, err
    assert list(out.iterdir()) == []  # the existing output folder is untouched


def test_bad_flags_leave_a_finished_render_untouched(rendered, tmp_path, monkeypatch):
    story, out = _copy(rendered, tmp_path)
    before = _snapshot(out)
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)
    assert main(_args(story, out, "--frames", "7")) == 2
    assert main(_args(story, out, "--reference-images", str(tmp_path / "missing.png"))) == 2
    assert _snapshot(out) == before


def test_non_render_folder_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"x")
    assert main(_args(_story(tmp_path), out)) == 2
    assert "holds no manifest.json" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"]


# ---------------------------------------------------------------------------------------------- shot 1 sources
def test_reference_images_seed_the_memory(tmp_path):
    refs = [_png(tmp_path / "r0.png"), _png(tmp_path / "r1.png", size=(32, 32))]
    out = tmp_path / "out"
    story = _story(tmp_path, {"prompts": ["a red circle", "a blue square"]}, name="s.json")
    assert main(_args(story, out, "--reference-images", *map(str, refs))) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    first = manifest["shots"][0]
    assert first["mode"] == "m2v"
    assert [(m["kind"], m["file"]) for m in first["memory"]] == [("reference", "references/ref_00.png"),
                                                                  ("reference", "references/ref_01.png")]
    assert all((out / m["file"]).is_file() for m in first["memory"])
    # References stay pinned in the memory of later shots.
    assert [m["kind"] for m in manifest["shots"][1]["memory"]][:2] == ["reference", "reference"]


def test_first_image_is_plain_i2v_and_sets_the_aspect(tmp_path):
    image = _png(tmp_path / "first.png", size=(40, 80))
    out = tmp_path / "out"
    story = _story(tmp_path, {"prompts": ["a red circle", "a blue square"], "cuts": [True, False]}, name="s.json")
    args = ["--story", str(story), "--out", str(out), "--base", "tiny", "--area", str(32 * 64), "--frames", "5",
            "--steps", "1", "--no-progress", "--first-image", str(image)]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["mode"] for s in manifest["shots"]] == ["i2v", "mi2v"]
    assert (manifest["settings"]["height"], manifest["settings"]["width"]) == (32, 64)  # aspect of the image
    assert manifest["shots"][0]["num_frames"] == 5  # the given first frame is kept in plain I2V
    assert manifest["settings"]["first_image"]["sha256"]


def test_mm2v_adapter_continues_with_motion_frames(tmp_path):
    from storymem.lora import StoryMemLoraConfig, add_storymem_adapter, save_storymem_lora

    pipe = builtin.load_builtin_pipeline("tiny")
    config = StoryMemLoraConfig(rank=4, alpha=4.0, memory_rope="contiguous", conditioning="mm2v")
    for model in (pipe.transformer, pipe.transformer_2):
        add_storymem_adapter(model, config)
    save_storymem_lora(tmp_path / "adapter", {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2},
                       config)
    out = tmp_path / "out"
    story = _story(tmp_path, {"prompts": ["a red circle", "the red circle walks"], "cuts": [True, False]},
                   name="s.json")
    args = ["--story", str(story), "--out", str(out), "--base", "tiny", "--height", "32", "--width", "32",
            "--frames", "9", "--steps", "1", "--no-progress", "--lora", str(tmp_path / "adapter")]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["mode"] for s in manifest["shots"]] == ["m2v", "mm2v"]
    assert manifest["shots"][1]["num_frames"] == 9 - 5  # the 5 motion frames are dropped
    assert manifest["runtime"]["memory_rope"] == "contiguous"  # from the adapter's metadata
    assert [s["memory_rope"] for s in manifest["shots"]] == ["contiguous", "contiguous"]
    assert manifest["runtime"]["adapter"]["conditioning"] == "mm2v"


def test_first_shot_base_draws_shot_1_with_the_adapter_off(tmp_path, spy):
    import torch

    from storymem.lora import StoryMemLoraConfig, add_storymem_adapter, save_storymem_lora

    pipe = builtin.load_builtin_pipeline("tiny")
    config = StoryMemLoraConfig(rank=4, alpha=4.0, conditioning="m2v")
    generator = torch.Generator().manual_seed(0)
    for model in (pipe.transformer, pipe.transformer_2):
        add_storymem_adapter(model, config)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, an adapter that changes nothing
                param.data = torch.randn(param.shape, generator=generator) * 0.5
    save_storymem_lora(tmp_path / "adapter", {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2},
                       config)
    story = _story(tmp_path, {"prompts": ["a red circle", "a blue square"]}, name="s.json")
    lora = ["--lora", str(tmp_path / "adapter")]
    runs = {}
    for name, extra in (("base_first", [*lora, "--first-shot", "base"]), ("m2v_first", lora), ("no_adapter", []),
                        ("scale_0", [*lora, "--lora-scale", "0"]), ("scale_half", [*lora, "--lora-scale", "0.5"])):
        spy.clear()
        assert main(_args(story, tmp_path / name, *extra)) == 0
        runs[name] = [c["frames"] for c in spy]
    # --lora-scale weighs the adapter (diffusers' set_adapters): 0 is the base alone, 0.5 neither.
    for shot in range(2):
        np.testing.assert_array_equal(runs["scale_0"][shot], runs["no_adapter"][shot])
        assert not np.array_equal(runs["scale_half"][shot], runs["no_adapter"][shot])
        assert not np.array_equal(runs["scale_half"][shot], runs["m2v_first"][shot])
    assert json.loads((tmp_path / "scale_half" / "manifest.json").read_text())["settings"]["lora_scale"] == 0.5
    assert json.loads((tmp_path / "m2v_first" / "manifest.json").read_text())["settings"]["lora_scale"] == 1.0
    # Shot 1 is the base's own (adapter off); with the default it goes through the adapter.
    np.testing.assert_array_equal(runs["base_first"][0], runs["no_adapter"][0])
    assert not np.array_equal(runs["m2v_first"][0], runs["no_adapter"][0])
    # Shot 2 has the same memory in both runs: only the adapter, on again, tells them apart.
    assert not np.array_equal(runs["base_first"][1], runs["no_adapter"][1])
    manifest = json.loads((tmp_path / "base_first" / "manifest.json").read_text())
    assert [s["mode"] for s in manifest["shots"]] == ["base", "m2v"]
    assert manifest["settings"]["first_shot"] == "base"
    assert json.loads((tmp_path / "m2v_first" / "manifest.json").read_text())["settings"]["first_shot"] == "m2v"
    image = _png(tmp_path / "first.png")
    assert main(_args(story, tmp_path / "both", "--first-shot", "base", "--first-image", str(image))) == 2
    assert not (tmp_path / "both").exists()

def test_saved_base_and_t2v_first_shot(tmp_path):
    """The real loading path: diffusers folders for the I2V base and the T2V model of shot 1."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from storymem.builtin.tiny import build_tiny_components

    components = build_tiny_components(seed=0)
    StoryMemPipeline(**components).save_pretrained(tmp_path / "i2v")
    config = dict(components["transformer"].config)
    config["in_channels"] = 16
    t2v = {k: v for k, v in components.items() if k != "image_encoder"}
    t2v["transformer"] = WanTransformer3DModel.from_config(config)
    t2v["transformer_2"] = WanTransformer3DModel.from_config(config)
    WanPipeline(**t2v).save_pretrained(tmp_path / "t2v")

    out = tmp_path / "out"
    story = _story(tmp_path, {"prompts": ["a red circle", "a blue square"]}, name="s.json")
    args = ["--story", str(story), "--out", str(out), "--base", str(tmp_path / "i2v"), "--t2v-model",
            str(tmp_path / "t2v"), "--height", "32", "--width", "32", "--frames", "5", "--steps", "1",
            "--no-progress", "--device", "cpu", "--embedder", "pixel", "--aesthetic", "none", "--shift", "3.0"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["mode"] for s in manifest["shots"]] == ["t2v", "m2v"]
    assert manifest["shots"][0]["num_frames"] == 5 and manifest["settings"]["t2v"]["shift"] == 12.0
    assert read_video(out / "shots" / "01_01.mp4")[0].shape == (5, 32, 32, 3)


# ---------------------------------------------------------------------------------------------- demo
def test_demo_renders_the_bundled_story(tmp_path):
    from storymem.story import load_story

    story = load_story(builtin.DEMO_STORY)
    assert len(story) >= 6 and not all(s.cut for s in story)
    out = tmp_path / "demo"
    assert main(["--demo", "--out", str(out), "--steps", "1", "--frames", "5", "--height", "32", "--width", "32",
                 "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shots"]) == len(story) and manifest["finished"]
    assert [s["mode"] == "mi2v" for s in manifest["shots"]] == [not s.cut for s in story]
    assert (out / "story.mp4").is_file() and (out / "index.html").is_file()


def test_demo_story_uses_the_toy_vocabulary():
    from storymem.story import load_story
    from storymem.builtin.tiny import TOY_VOCABULARY, caption_words

    story = load_story(builtin.DEMO_STORY)
    words = {w for shot in story for w in caption_words(shot.prompt)} | set(caption_words(story.overview))
    assert words <= set(TOY_VOCABULARY), words - set(TOY_VOCABULARY)
    # A character that returns after an intervening shot without it.
    has_circle = ["red circle" in shot.prompt.lower() for shot in story]
    first_gap = has_circle.index(False)
    assert any(has_circle[first_gap:])


def test_shot_seeds():
    from storymem.story import Story

    story = Story.from_dict(STORY)
    assert [render.shot_seed(s, 10) for s in story] == [10, 11, 12]
    assert [render.shot_seed(s, 10, "scene") for s in story] == [10, 11, 10]


# ---------------------------------------------------------------------------------------------- memory & continuation


FOUR_CUTS = {"prompts": ["a red circle", "a blue square", "a red circle again", "a green star"]}


def test_negative_prompt_reaches_the_pipeline(tmp_path, spy):
    one_shot = _story(tmp_path, {"prompts": ["a red circle"]}, name="one.json")
    # The toy model's default is the empty prompt (its unconditional one), not Wan's.
    assert main(_args(one_shot, tmp_path / "toy")) == 0
    assert [c["kwargs"]["negative_prompt"] for c in spy] == [""]
    story, options = options_from_args(build_parser().parse_args(
        ["--story", str(one_shot), "--base", "org/model", "--negative-prompt", ""]))
    assert options.negative_prompt == "" and options.resolved().negative_prompt == ""  # kept for any base
    story, options = options_from_args(build_parser().parse_args(["--story", str(one_shot), "--base", "org/model"]))
    assert options.negative_prompt is None and options.resolved().negative_prompt is None  # Wan's

    # Programmatic renders resolve the same way: None is Wan's for a real base and the empty prompt for a
    # built-in one; "" is kept. (The tiny pipeline stands in for the real base: nothing is loaded by name.)
    pipe = builtin.load_builtin_pipeline("tiny")
    for name, base, negative, expected in (("wan", "org/model", None, WAN_NEGATIVE_PROMPT),
                                           ("builtin", "tiny", None, ""), ("empty", "org/model", "", "")):
        spy.clear()
        options = render.RenderOptions(out_dir=tmp_path / name, base=base, negative_prompt=negative, height=32,
                                       width=32, frames=5, steps=1, embedder="pixel", aesthetic="none", device="cpu",
                                       progress=False)
        if base == "tiny":
            render.render_story(one_shot, options, pipe=pipe)
        else:  # a real base drawing shot 1 from text alone is told that a T2V model does better
            with pytest.warns(UserWarning, match="--t2v-model"):
                render.render_story(one_shot, options, pipe=pipe)
        assert spy[0]["kwargs"]["negative_prompt"] == expected


def test_memory_source_none_gives_no_memory(tmp_path, spy):
    out = tmp_path / "out"
    story = _story(tmp_path, FOUR_CUTS, name="s.json")
    assert main(_args(story, out, "--memory-source", "none")) == 0
    assert len(spy) == 4
    assert all(not c["kwargs"].get("memory_images") and c["kwargs"].get("memory_latents") is None for c in spy)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["memory_source"] == "none" and manifest["runtime"]["memory_source"] == "none"
    assert all(s["memory"] == [] and s["keyframes"] == [] for s in manifest["shots"])


def test_memory_source_first_frame_keeps_first_frames_through_sink_and_window(tmp_path, spy):
    out = tmp_path / "out"
    story = _story(tmp_path, FOUR_CUTS, name="s.json")
    assert main(_args(story, out, "--memory-source", "first-frame", "--max-memory", "2", "--sink", "1")) == 0
    firsts = [c["frames"][0] for c in spy]
    # Shot 4 sees the sink (shot 1's first frame) and the window (shot 3's), not shot 2's.
    expected = [[], [0], [0, 1], [0, 2]]
    for call, wanted in zip(spy, expected):
        memory = call["kwargs"].get("memory_images", [])
        assert len(memory) == len(wanted)
        for image, shot in zip(memory, wanted):
            np.testing.assert_array_equal(image, firsts[shot])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["keyframes"] for s in manifest["shots"]] == [[{"frame": 0, "file": f"keyframes/{s['stem']}/f000.png"}]
                                                           for s in manifest["shots"]]
    assert [(m["shot"], m["frame"]) for m in manifest["shots"][3]["memory"]] == [(0, 0), (2, 0)]


def test_continuation_none_starts_every_shot_afresh(tmp_path, spy):
    out = tmp_path / "out"
    assert main(_args(_story(tmp_path), out, "--continuation", "none")) == 0
    assert all(c["kwargs"].get("first_frame") is None and c["kwargs"].get("motion_frames") is None for c in spy)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["mode"] for s in manifest["shots"]] == ["m2v", "m2v", "m2v"]
    assert [s["num_frames"] for s in manifest["shots"]] == [5, 5, 5]  # nothing repeats a previous shot
    assert manifest["shots"][1]["memory"]  # the memory is still there
    assert manifest["runtime"]["continuation"] == "none"


def test_changed_memory_source_is_refused(rendered, tmp_path, monkeypatch, capsys):
    story, out = _copy(rendered, tmp_path)
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)
    assert json.loads((out / "manifest.json").read_text())["settings"]["memory_source"] == "keyframes"
    assert main(_args(story, out, "--memory-source", "first-frame")) == 2
    assert 'memory_source: "keyframes" -> "first-frame"' in capsys.readouterr().err
    # Every setting is recorded (with each shot): one missing from the last finished shot's record is a difference,
    # not a default.
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["shots"][-1]["settings"]["memory_source"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(_args(story, out)) == 2
    assert 'memory_source: null -> "keyframes"' in capsys.readouterr().err


def test_several_stories_share_one_pipeline(tmp_path, monkeypatch, spy):
    pipe = builtin.load_builtin_pipeline("tiny")
    assert pipe.memory_rope == "negative"
    options = render.RenderOptions(base="tiny", height=32, width=32, frames=5, steps=1, shift=3.0, embedder="pixel",
                                   aesthetic="none", negative_prompt="", device="cpu", progress=False,
                                   memory_rope="contiguous")
    selector = render.build_selector(options)
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)
    monkeypatch.setattr(render_models, "build_selector", _must_not_load)
    monkeypatch.setattr(builtin, "load_builtin_pipeline", _must_not_load)
    for name, prompts in (("a", ["a red circle", "a blue square"]), ("b", ["a green star"])):
        story = _story(tmp_path, {"prompts": prompts}, name=f"{name}.json")
        manifest = render.render_story(story, dataclasses.replace(options, out_dir=tmp_path / name), pipe=pipe,
                                       selector=selector)
        assert manifest["finished"] and manifest["runtime"]["memory_rope"] == "contiguous"
        assert {s["memory_rope"] for s in manifest["shots"]} == {"contiguous"}
    assert len(spy) == 3 and spy[1]["kwargs"]["memory_rope"] == "contiguous"
    assert pipe.memory_rope == "negative"  # the option went with each call; the pipeline is unchanged
    assert pipe.scheduler.config.flow_shift == 3.0


def test_memory_guidance_reaches_shots_with_memory(tmp_path, spy):
    out = tmp_path / "out"
    story = _story(tmp_path, FOUR_CUTS, name="s.json")
    assert main(_args(story, out, "--memory-guidance", "2.5")) == 0
    # Shot 1 has no memory; every later shot is guided towards its memory.
    assert [c["kwargs"].get("memory_guidance_scale") for c in spy] == [None, 2.5, 2.5, 2.5]
    assert json.loads((out / "manifest.json").read_text())["settings"]["memory_guidance"] == 2.5
    spy.clear()
    assert main(_args(story, tmp_path / "off")) == 0
    assert all("memory_guidance_scale" not in c["kwargs"] for c in spy)
    assert json.loads((tmp_path / "off" / "manifest.json").read_text())["settings"]["memory_guidance"] == 1.0

def test_bad_memory_options_are_render_errors(tmp_path):
    from storymem.story import load_story

    story = load_story(_story(tmp_path))
    for change, expected in ((dict(memory_source="sometimes"), "--memory-source"),
                             (dict(continuation="jump"), "--continuation"),
                             (dict(memory_guidance=-2.0), "--memory-guidance"),
                             (dict(memory_source="none", reference_images=[_png(tmp_path / "r.png")]),
                              "without memory")):
        options = render.RenderOptions(out_dir=tmp_path / "out", base="tiny", device="cpu", **change)
        with pytest.raises(render.RenderError, match=expected):
            render.prepare(story, options)
    assert not (tmp_path / "out").exists()
