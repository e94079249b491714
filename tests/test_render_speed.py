"""`storymem render`'s speed and memory options on the tiny model: the lightning preset reaches the pipeline
(forwards counted, scheduler, guidance), a lightx2v-format distill LoRA loads beside the StoryMem adapter and
each scale counts, fused output matches unfused, bad LoRA files and impossible flags are refused before any
model loads, --low-vram renders from prompts encoded up front, --compile reports its compile time, and a
changed setting is refused on resume by name."""

import dataclasses
import hashlib
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_distill import lightx2v_state_dict, write_pair

from storymem import render
from storymem.acceleration import SpeedOptions, WanEulerScheduler
from storymem.pipeline import StoryMemPipeline
from storymem.render import main
from storymem.render import models as render_models
from storymem.render import speed as render_speed
from storymem.render.cli import build_parser
from storymem.story import load_story

FAST = ["--base", "tiny", "--height", "32", "--width", "32", "--frames", "5", "--no-progress", "--device", "cpu"]
TWO_SHOTS = {"prompts": ["a red circle in a meadow", "a blue square in the city"]}


def _story(folder, data=TWO_SHOTS, name="story.json"):
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def _must_not_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the inputs were checked")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A StoryMem adapter (random, non-zero) and a lightx2v-format distill LoRA pair for the tiny model."""
    from storymem.builtin.tiny import build_tiny_components
    from storymem.lora import StoryMemLoraConfig, add_storymem_adapter, save_storymem_lora

    folder = tmp_path_factory.mktemp("assets")
    components = build_tiny_components(seed=0)
    configs = {e: dict(components[e].config) for e in ("transformer", "transformer_2")}
    config = StoryMemLoraConfig(rank=4, alpha=4.0, dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    for expert in ("transformer", "transformer_2"):
        add_storymem_adapter(components[expert], config)
        for name, param in components[expert].named_parameters():
            if "lora_B" in name:  # peft starts B at zero, an adapter that changes nothing
                param.data = torch.randn(param.shape, generator=generator) * 0.3
    save_storymem_lora(folder / "adapter", {e: components[e] for e in configs}, config)
    write_pair(folder / "lightning", configs)
    return {"adapter": folder / "adapter", "distill": folder / "lightning", "configs": configs, "root": folder}


def _lightning(assets, *extra):
    return [*FAST, "--lora", str(assets["adapter"]), "--preset", "lightning", "--distill-lora",
            str(assets["distill"]), *extra]


def _render(tmp_path, name, args, spy, story=None):
    spy.clear()
    story = story or _story(tmp_path)
    assert main(["--story", str(story), "--out", str(tmp_path / name), *args]) == 0
    return [c["frames"] for c in spy], json.loads((tmp_path / name / "manifest.json").read_text())


@pytest.fixture
def forwards(monkeypatch):
    """(expert model, timestep) of every transformer forward inside a pipeline call (not the fuse check's)."""
    from diffusers import WanTransformer3DModel

    calls, state = [], {"in_call": False}
    forward, call = WanTransformer3DModel.forward, StoryMemPipeline.__call__

    def counted_forward(self, *args, **kwargs):
        if state["in_call"]:
            calls.append((self, float(kwargs["timestep"].flatten()[0])))
        return forward(self, *args, **kwargs)

    def flagged_call(self, *args, **kwargs):
        state["in_call"] = True
        try:
            return call(self, *args, **kwargs)
        finally:
            state["in_call"] = False

    monkeypatch.setattr(WanTransformer3DModel, "forward", counted_forward)
    monkeypatch.setattr(StoryMemPipeline, "__call__", flagged_call)
    return calls


# ---------------------------------------------------------------------------------------------- lightning
def test_lightning_preset_and_distill_lora_reach_the_pipeline(assets, tmp_path, forwards):
    options = render.RenderOptions(out_dir=tmp_path / "out", base="tiny", lora=str(assets["adapter"]),
                                   preset="lightning", distill_lora=str(assets["distill"]), height=32, width=32,
                                   frames=5, device="cpu", progress=False)
    renderer = render.StoryRenderer(render.prepare(load_story(_story(tmp_path)), options))
    manifest = renderer.run()
    pipe = renderer.pipe
    assert isinstance(pipe.scheduler, WanEulerScheduler) and pipe.scheduler.config.shift == 5.0
    assert pipe.config.boundary_ratio == 0.9
    # 4 steps at guidance 1: one forward a step; t = 1000, 937.5 on the high-noise expert, 833.3, 625 on the low.
    high, low = pipe.transformer, pipe.transformer_2
    for shot in range(2):
        experts = [m for m, _ in forwards[4 * shot: 4 * shot + 4]]
        assert experts == [high, high, low, low]
        np.testing.assert_allclose([t for _, t in forwards[4 * shot: 4 * shot + 4]], [1000, 937.5, 833.33, 625],
                                   atol=0.01)
    assert len(forwards) == 8

    settings = manifest["settings"]
    assert (settings["preset"], settings["steps"], settings["guidance"], settings["guidance_2"], settings["shift"],
            settings["sampler"], settings["boundary_ratio"], settings["fuse"]) == \
        ("lightning", 4, 1.0, 1.0, 5.0, "euler", 0.9, True)
    distill = settings["distill_lora"]
    assert distill["scale"] == 1.0 and distill["skip"] == [] and settings["t2v_distill_lora"] is None
    high_file = assets["distill"] / "high_noise_model.safetensors"
    assert distill["files"]["transformer"]["sha256"] == hashlib.sha256(high_file.read_bytes()).hexdigest()
    stage = manifest["runtime"]["speed"]["stages"]["i2v"]
    assert stage["fused"]["adapters"] == {"transformer": ["distill", "storymem"],
                                          "transformer_2": ["distill", "storymem"]}
    assert stage["distill_lora"]["ranks"]["transformer"] == [3, 64] and stage["scales"] == {"storymem": 1.0,
                                                                                            "distill": 1.0}
    assert manifest["runtime"]["speed"]["preset"]["name"] == "lightning"
    assert "compile_s" not in manifest["timings"]


def test_each_scale_counts_and_fused_matches_unfused(assets, tmp_path, spy):
    story = _story(tmp_path, {"prompts": ["a red circle"]})
    runs = {name: _render(tmp_path, name, _lightning(assets, *extra), spy, story)[0][0]
            for name, extra in (("fused", []), ("unfused", ["--no-fuse"]),
                                ("distill_half", ["--distill-lora-scale", "0.5"]),
                                ("storymem_up", ["--lora-scale", "1.2"]))}
    def apart(a, b):
        return np.abs(runs[a].astype(int) - runs[b].astype(int)).mean()

    assert np.abs(runs["fused"].astype(int) - runs["unfused"].astype(int)).max() <= 2  # merging rounds
    for a, b in (("fused", "distill_half"), ("fused", "storymem_up"), ("distill_half", "storymem_up")):
        assert apart(a, b) > 5 * apart("fused", "unfused") + 0.1, (a, b, apart(a, b), apart("fused", "unfused"))
    settings = json.loads((tmp_path / "unfused" / "manifest.json").read_text())["settings"]
    assert settings["fuse"] is False
    assert json.loads((tmp_path / "distill_half" / "manifest.json").read_text())["settings"]["distill_lora"][
        "scale"] == 0.5


def test_first_shot_base_keeps_the_distill_lora_on(assets, tmp_path, spy):
    """Shot 1 of --first-shot base: the StoryMem adapter off, the distill LoRA on (adapters left unfused)."""
    base_first, manifest = _render(tmp_path, "base_first", _lightning(assets, "--first-shot", "base"), spy)
    assert manifest["settings"]["fuse"] is False and [s["mode"] for s in manifest["shots"]] == ["base", "m2v"]
    distill_only, _ = _render(tmp_path, "distill_only", [*FAST, "--preset", "lightning", "--distill-lora",
                                                         str(assets["distill"]), "--no-fuse"], spy)
    np.testing.assert_array_equal(base_first[0], distill_only[0])
    assert not np.array_equal(base_first[1], distill_only[1])  # shot 2: the adapter is on again


def test_shared_pipeline_must_match_the_adapter_settings(assets, tmp_path, spy, monkeypatch):
    options = render.RenderOptions(base="tiny", preset="lightning", distill_lora=str(assets["distill"]), height=32,
                                   width=32, frames=5, device="cpu", progress=False)
    pipe = render.load_render_pipeline(options)
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)
    story = load_story(_story(tmp_path, {"prompts": ["a red circle"]}))
    with pytest.raises(render.RenderError, match=r"given pipeline was loaded with other settings \(fuse: true -> "
                                                 r"false\)"):
        render.render_story(story, dataclasses.replace(options, out_dir=tmp_path / "a", fuse=False), pipe=pipe)
    manifest = render.render_story(story, dataclasses.replace(options, out_dir=tmp_path / "b"), pipe=pipe)
    assert manifest["finished"] and spy[-1]["kwargs"]["num_inference_steps"] == 4
    assert manifest["runtime"]["speed"]["pipeline"]["distill_lora"] == str(assets["distill"])


def test_t2v_first_shot_with_its_own_distill_lora(assets, tmp_path, monkeypatch):
    from diffusers import WanPipeline, WanTransformer3DModel

    from storymem.builtin.tiny import build_tiny_components

    components = build_tiny_components(seed=0)
    StoryMemPipeline(**components).save_pretrained(tmp_path / "i2v")
    config = dict(components["transformer"].config, in_channels=16)
    t2v = {k: v for k, v in components.items() if k != "image_encoder"}
    t2v["transformer"] = WanTransformer3DModel.from_config(config)
    t2v["transformer_2"] = WanTransformer3DModel.from_config(config)
    WanPipeline(**t2v).save_pretrained(tmp_path / "t2v")
    write_pair(tmp_path / "t2v_lightning", {e: dict(t2v[e].config) for e in ("transformer", "transformer_2")})
    calls = []
    original = WanPipeline.__call__

    def recorded(self, *args, **kwargs):
        calls.append((kwargs, type(self.scheduler), self.config.boundary_ratio, self.transformer.peft_config
                      if getattr(self.transformer, "peft_config", None) else None))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(WanPipeline, "__call__", recorded)
    out = tmp_path / "out"
    args = ["--story", str(_story(tmp_path)), "--out", str(out), "--base", str(tmp_path / "i2v"), "--t2v-model",
            str(tmp_path / "t2v"), "--height", "32", "--width", "32", "--frames", "5", "--no-progress", "--device",
            "cpu", "--embedder", "pixel", "--aesthetic", "none", "--preset", "lightning", "--distill-lora",
            str(assets["distill"]), "--t2v-distill-lora", str(tmp_path / "t2v_lightning"),
            "--t2v-distill-lora-scale", "0.8"]
    assert main(args) == 0
    (kwargs, scheduler, boundary, peft), = calls
    assert (kwargs["num_inference_steps"], kwargs["guidance_scale"], kwargs["guidance_scale_2"]) == (4, 1.0, 1.0)
    assert scheduler is WanEulerScheduler and boundary == 0.875 and peft is None  # fused and unloaded
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["mode"] for s in manifest["shots"]] == ["t2v", "m2v"]
    assert manifest["settings"]["t2v"] == {"shift": 5.0, "guidance": 1.0, "guidance_2": 1.0, "steps": 4,
                                           "sampler": "euler", "boundary_ratio": 0.875}
    assert manifest["settings"]["t2v_distill_lora"]["scale"] == 0.8
    stages = manifest["runtime"]["speed"]["stages"]
    assert stages["t2v"]["scales"] == {"distill": 0.8} and stages["t2v"]["fused"]["adapters"]["transformer"] == [
        "distill"]
    assert stages["i2v"]["scales"] == {"distill": 1.0}


# ---------------------------------------------------------------------------------------------- refusals
def _bad_unknown_key(assets, folder):
    sd = lightx2v_state_dict(assets["configs"]["transformer"], seed=1)
    sd["diffusion_model.blocks.0.self_attn.zz.lora_down.weight"] = torch.zeros(3, 24)
    write_pair(folder, assets["configs"], high=sd)
    return r"high_noise_model\.safetensors: 1 keys match no module of transformer: .*self_attn\.zz"


def _bad_shape(assets, folder):
    sd = lightx2v_state_dict(assets["configs"]["transformer_2"], seed=2)
    sd["diffusion_model.blocks.1.self_attn.k.lora_down.weight"] = torch.zeros(3, 1536)
    write_pair(folder, assets["configs"], low=sd)
    return r"low_noise_model\.safetensors: .*blocks\.1\.self_attn\.k\.lora_down\.weight \(3, 1536\)"


def _missing_expert(assets, folder):
    folder.mkdir()
    save_file(lightx2v_state_dict(assets["configs"]["transformer"]), str(folder / "high_noise_model.safetensors"))
    return r"no low-noise file .* for transformer_2; found: \['high_noise_model\.safetensors'\]"


@pytest.mark.parametrize("make", [_bad_unknown_key, _bad_shape, _missing_expert],
                         ids=["unknown key", "wrong shape", "expert file missing"])
def test_bad_distill_lora_is_refused_by_file_and_key_before_loading(assets, tmp_path, monkeypatch, capsys, make):
    message = make(assets, tmp_path / "bad")
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)
    out = tmp_path / "out"
    assert main(["--story", str(_story(tmp_path)), "--out", str(out), *FAST, "--preset", "lightning",
                 "--distill-lora", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: --distill-lora: .*" + message, err), err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("flags,message", [
    (["--low-vram"], r"--low-vram \(fp8 storage, group offload on CUDA streams\) needs a CUDA device; --device is "
                     r"cpu"),
    (["--first-shot", "base", "--fuse", "--lora", "ADAPTER"], r"--fuse with --first-shot base: .* use --no-fuse"),
    (["--t2v-distill-lora", "x"], r"--t2v-distill-lora needs --t2v-model"),
    (["--distill-lora-scale", "0.5"], r"--distill-lora-scale 0\.5: there is no --distill-lora to scale"),
    (["--distill-lora-skip", "image"], r"--distill-lora-skip: there is no --distill-lora"),
    (["--preset", "lightning", "--guidance-2", "3"], r"--guidance-2 3\.0 needs --guidance > 1"),
], ids=["low-vram on cpu", "fuse with base shot", "t2v lora without t2v", "scale without lora", "skip without lora",
        "guidance-2 without cfg"])
def test_impossible_flags_are_refused_before_loading(assets, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)
    flags = [str(assets["adapter"]) if f == "ADAPTER" else f for f in flags]
    assert main(["--story", str(_story(tmp_path)), "--out", str(tmp_path / "out"), *FAST, *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes,message", [
    (dict(compile=True, offload="sequential"), r"--compile with --offload sequential"),
    (dict(compile=True, low_vram=True), r"--compile with --low-vram"),
    (dict(low_vram=True, offload="model"), r"--low-vram with --offload model"),
    (dict(low_vram=True, parallel="ulysses"), r"--low-vram with --parallel ulysses"),
])
def test_impossible_accelerator_combinations_are_refused(changes, message):
    options = render.RenderOptions(base="tiny", device="cuda", **changes).resolved()
    with pytest.raises(render.RenderError, match=message):
        render_speed.check_speed(options)


# ---------------------------------------------------------------------------------------------- low VRAM, compile
def test_low_vram_renders_from_prompts_encoded_up_front(assets, tmp_path, spy, monkeypatch):
    """The --low-vram path on the CPU (its checks refuse a CPU, so the device check is lifted here; fp8 storage
    is left out so the frames can be compared bit for bit): every prompt encoded once, the text encoder released,
    the pipeline called with embeddings, keyframe models placed around each selection."""
    args = [*FAST, "--lora", str(assets["adapter"]), "--steps", "2"]
    normal, normal_manifest = _render(tmp_path, "normal", args, spy)

    encoded, placed, original_config = [], [], render_speed._low_vram_config
    original_encode, original_place = render_speed.encode_story_prompts, render_speed.keyframe_models_on
    monkeypatch.setattr(render_speed, "check_speed_options", lambda **kwargs: [])
    monkeypatch.setattr(render_speed, "_low_vram_config", lambda *a, **k: dataclasses.replace(
        original_config(*a, **k), fp8_storage=False))
    monkeypatch.setattr(render_speed, "encode_story_prompts",
                        lambda pipe, prompts, *a, **k: encoded.append(list(prompts)) or original_encode(
                            pipe, prompts, *a, **k))
    monkeypatch.setattr(render_speed, "keyframe_models_on",
                        lambda selector, device: placed.append(device) or original_place(selector, device))
    low, manifest = _render(tmp_path, "low", [*args, "--low-vram"], spy)
    assert encoded == [TWO_SHOTS["prompts"]] and placed == ["cpu", "cpu"]
    assert all("prompt_embeds" in c["kwargs"] and "prompt" not in c["kwargs"] for c in spy)
    for a, b in zip(normal, low):
        np.testing.assert_array_equal(a, b)
    stage = manifest["runtime"]["speed"]["stages"]["i2v"]
    assert stage["low_vram"]["text_encoder"] == "release" and stage["low_vram"]["experts"] == ["transformer",
                                                                                               "transformer_2"]
    assert manifest["runtime"]["speed"]["low_vram"] is True
    # fp8 storage (left out here) and tiled VAE decoding change the pixels a little: a setting of its own.
    changed = {k for k in manifest["settings"] if manifest["settings"][k] != normal_manifest["settings"][k]}
    assert changed == {"low_vram"} and manifest["settings"]["low_vram"] is True


def test_compile_reports_its_time_and_no_recompiles(assets, tmp_path, spy, monkeypatch, request):
    from torch.fx.experimental import _config as fx_config

    from storymem.acceleration import compile_experts

    saved = fx_config.use_duck_shape  # compile_experts changes it process-wide: restored afterwards
    request.addfinalizer(lambda: setattr(fx_config, "use_duck_shape", saved))
    torch._dynamo.reset()
    # The eager backend: the same graph capture without a C++ compiler on the test machine.
    monkeypatch.setattr(render_speed, "compile_experts", lambda pipe: compile_experts(pipe, backend="eager"))
    frames, manifest = _render(tmp_path, "compiled", [*FAST, "--steps", "2", "--compile"], spy)
    eager, eager_manifest = _render(tmp_path, "eager", [*FAST, "--steps", "2"], spy)
    for a, b in zip(frames, eager):
        np.testing.assert_array_equal(a, b)
    assert manifest["settings"] == eager_manifest["settings"]  # a runtime choice: a render resumes either way
    timings = manifest["timings"]
    assert timings["compile_s"] > 0 and timings["recompiles"] == 0  # shot 2 has memory: a longer sequence
    assert manifest["runtime"]["speed"]["compiled"]["i2v"]["graphs"] >= 1
    assert manifest["runtime"]["speed"]["stages"]["i2v"]["compiled"] == ["transformer", "transformer_2"]


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.filterwarnings("ignore:--distill-lora with --preset release")
def test_changed_speed_settings_are_refused_on_resume(assets, tmp_path, spy, monkeypatch, capsys):
    story = _story(tmp_path)
    out = tmp_path / "out"
    _render(tmp_path, "out", _lightning(assets), spy, story)
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)

    def refused(*flags):
        assert main(["--story", str(story), "--out", str(out), *flags]) == 2
        return capsys.readouterr().err

    err = refused(*_lightning(assets)[:-4], "--distill-lora", str(assets["distill"]))  # release preset
    assert 'preset: "lightning" -> "release"' in err and "steps: 4 -> 8" in err and 'sampler: "euler" -> "unipc"' \
        in err
    assert "distill_lora:" in refused(*_lightning(assets, "--distill-lora-scale", "0.9"))
    assert "fuse: true -> false" in refused(*_lightning(assets, "--no-fuse"))
    assert "boundary_ratio: 0.9 -> 0.8" in refused(*_lightning(assets, "--boundary-ratio", "0.8"))
    assert main(["--story", str(story), "--out", str(out), *_lightning(assets)]) == 0  # unchanged: nothing to do
    # The same file name with other content is another LoRA.
    changed = assets["root"] / "changed"
    write_pair(changed, assets["configs"], high=lightx2v_state_dict(assets["configs"]["transformer"], seed=7))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["settings"]["distill_lora"]["source"] = str(changed)
    for expert, name in (("transformer", "high"), ("transformer_2", "low")):
        manifest["settings"]["distill_lora"]["files"][expert]["path"] = str((changed / f"{name}_noise_model"
                                                                             f".safetensors").resolve())
    (out / "manifest.json").write_text(json.dumps(manifest))
    err = refused(*_lightning(assets)[:-1], str(changed))
    digest = hashlib.sha256((changed / "high_noise_model.safetensors").read_bytes()).hexdigest()
    assert "distill_lora:" in err and err.count(digest) == 1  # the new content, not the recorded one


def test_renders_from_before_the_speed_settings_resume(assets, tmp_path, spy, monkeypatch, capsys):
    story = _story(tmp_path)
    args = [*FAST, "--steps", "1", "--lora", str(assets["adapter"])]
    _render(tmp_path, "out", [*args, "--no-fuse"], spy, story)
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("preset", "sampler", "boundary_ratio", "distill_lora", "t2v_distill_lora", "fuse", "low_vram"):
        del manifest["settings"][key]  # as storymem wrote it before these settings existed
    manifest["shots"] = manifest["shots"][:1]
    (out / "manifest.json").write_text(json.dumps(manifest))
    load_pipeline = render_models.load_pipeline
    monkeypatch.setattr(render_models, "load_pipeline", _must_not_load)
    assert main(["--story", str(story), "--out", str(out), *args]) == 2
    assert "fuse: false -> true" in capsys.readouterr().err  # those renders were unfused
    monkeypatch.setattr(render_models, "load_pipeline", load_pipeline)
    spy.clear()
    assert main(["--story", str(story), "--out", str(out), *args, "--no-fuse"]) == 0
    assert len(spy) == 1  # shot 2 only
    assert json.loads((out / "manifest.json").read_text())["settings"]["preset"] == "release"


# ---------------------------------------------------------------------------------------------- help
def test_help_lists_each_speed_flag_once_with_its_help():
    text = build_parser().format_help()
    assert text.count("speed and memory:") == 1
    for flag in ("--preset", "--sampler", "--boundary-ratio", "--distill-lora", "--distill-lora-scale",
                 "--distill-lora-skip", "--t2v-distill-lora", "--t2v-distill-lora-scale", "--fuse, --no-fuse",
                 "--compile", "--low-vram"):
        assert len(re.findall(rf"^  {re.escape(flag)}(?![\w-])", text, flags=re.M)) == 1, flag
    fields = {f.name: f for f in dataclasses.fields(render.RenderOptions)}
    for speed_field in dataclasses.fields(SpeedOptions):  # the help lives on SpeedOptions' fields
        assert fields[speed_field.name].metadata["help"].startswith(speed_field.metadata["help"])
    args = build_parser().parse_args(["--demo"])
    assert args.fuse is None and build_parser().parse_args(["--demo", "--no-fuse"]).fuse is False
