"""Speed building blocks on the tiny model: presets (scheduler, steps, guidance: forwards counted), prompts
encoded up front (bit for bit), compile without recompiles across memory counts, low-VRAM placement, model
release and keyframe-model placement, and the refusal of impossible flag combinations."""

import numpy as np
import pytest
import torch

from storymem.acceleration import (PRESETS, LowVramConfig, WanEulerScheduler, check_speed_options,
                                   compile_experts, compile_stats, enable_low_vram, encode_story_prompts,
                                   keyframe_models_on, release_models, release_text_encoder, resolve_preset)


def count_forwards(pipe):
    calls = []
    for name in ("transformer", "transformer_2"):
        getattr(pipe, name).register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
    return calls


def run(pipe, **kwargs):
    kwargs.setdefault("prompt", "a red circle walks")
    kwargs.setdefault("negative_prompt", "")
    return pipe(num_frames=5, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).frames


def test_lightning_preset_sets_scheduler_steps_guidance_and_boundary(tiny_pipe):
    calls = count_forwards(tiny_pipe)
    kwargs = resolve_preset("lightning").apply(tiny_pipe)
    assert kwargs == {"num_inference_steps": 4, "guidance_scale": 1.0, "guidance_scale_2": 1.0}
    assert isinstance(tiny_pipe.scheduler, WanEulerScheduler) and tiny_pipe.scheduler.config.shift == 5.0
    assert tiny_pipe.config.boundary_ratio == 0.9
    run(tiny_pipe, **kwargs)
    # One forward per step (guidance 1: no unconditional pass); t = 1000, 937.5 >= 900 on the high-noise
    # expert, 833.3, 625 on the low-noise one.
    assert calls == ["transformer", "transformer", "transformer_2", "transformer_2"]
    torch.testing.assert_close(tiny_pipe.scheduler.timesteps, torch.tensor([1000.0, 937.5, 833.3333, 625.0]))


def test_release_preset_and_overrides(tiny_pipe):
    calls = count_forwards(tiny_pipe)
    preset = resolve_preset("release", steps=3, shift=None, boundary_ratio=0.5)
    assert (preset.steps, preset.shift, preset.boundary_ratio, preset.guidance) == (3, 4.0, 0.5, 3.5)
    assert PRESETS["release"].steps == 40  # the table itself is untouched
    kwargs = preset.apply(tiny_pipe)
    assert type(tiny_pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert tiny_pipe.scheduler.config.flow_shift == 4.0 and tiny_pipe.config.boundary_ratio == 0.5
    run(tiny_pipe, **kwargs)
    assert len(calls) == 2 * 3  # classifier-free guidance: two forwards per step
    t2v = preset.call_kwargs("t2v")
    assert t2v == {"num_inference_steps": 40, "guidance_scale": 4.0, "guidance_scale_2": 3.0}
    assert preset.override(t2v_sampler="euler").scheduler("t2v").config.shift == 12.0


@pytest.mark.parametrize("overrides,message", [
    (dict(guidance=1.0, guidance_2=3.5), r"--guidance-2 3\.5 needs --guidance > 1"),
    (dict(t2v_steps=0), r"--t2v-steps must be an integer >= 1"),
    (dict(sampler="dpm"), r"--sampler 'dpm': expected one of unipc, euler"),
    (dict(shift=-1.0), r"--shift must be > 0"),
    (dict(boundary_ratio=1.5), r"--boundary-ratio must lie in \[0, 1\]"),
    (dict(flow="x"), r"unknown sampling settings \['flow'\]"),
])
def test_bad_preset_values_are_refused_by_flag(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_preset("lightning", **overrides)


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match=r"--preset 'turbo': expected one of release, lightning"):
        resolve_preset("turbo")


@torch.no_grad()
def test_prompts_encoded_up_front_equal_per_shot_encoding(tiny_pipe):
    prompts = ["a red circle walks", "a blue square jumps", "a red circle walks"]
    encoder_calls = []
    tiny_pipe.text_encoder.register_forward_pre_hook(lambda *a: encoder_calls.append(1))
    embeddings = encode_story_prompts(tiny_pipe, prompts, negative_prompt="", guidance=True)
    assert len(encoder_calls) == 3  # two distinct prompts and the negative one, each once
    for prompt, emb in zip(prompts, embeddings):
        positive, negative = tiny_pipe.encode_prompt(prompt=prompt, negative_prompt="",
                                                     do_classifier_free_guidance=True, max_sequence_length=512)
        assert torch.equal(emb.prompt_embeds, positive) and torch.equal(emb.negative_prompt_embeds, negative)
    kwargs = resolve_preset("release", steps=2).apply(tiny_pipe)
    from_text = run(tiny_pipe, **kwargs)
    encoder = release_text_encoder(tiny_pipe)  # the pipeline runs on without its text encoder
    assert tiny_pipe.text_encoder is None and encoder is not None
    from_embeddings = run(tiny_pipe, prompt=None, negative_prompt=None, **embeddings[0].call_kwargs(), **kwargs)
    assert torch.equal(from_text, from_embeddings)
    with pytest.raises(ValueError, match="no text encoder"):
        encode_story_prompts(tiny_pipe, prompts)


def test_prompts_without_guidance_skip_the_negative_prompt(tiny_pipe):
    embeddings = encode_story_prompts(tiny_pipe, ["a red circle"], guidance=False)
    assert embeddings[0].negative_prompt_embeds is None
    assert set(embeddings[0].call_kwargs()) == {"prompt_embeds"}


def test_compiled_experts_do_not_recompile_when_the_memory_count_changes(tiny_pipe, request):
    from torch.fx.experimental import _config as fx_config

    # Restored afterwards (monkeypatch would delete it: torch's config module keeps it outside __dict__).
    saved = fx_config.use_duck_shape
    request.addfinalizer(lambda: setattr(fx_config, "use_duck_shape", saved))
    torch._dynamo.reset()
    kwargs = resolve_preset("release", steps=2, guidance=1.0, guidance_2=1.0).apply(tiny_pipe)
    embeddings = encode_story_prompts(tiny_pipe, ["a red circle walks"], guidance=False)[0].call_kwargs()
    def shot(memory_count):
        rng = np.random.RandomState(memory_count)
        memory = [rng.randint(0, 256, (48, 32, 3), dtype=np.uint8) for _ in range(memory_count)]
        return tiny_pipe(**embeddings, memory_images=memory, num_frames=5, height=48, width=32, output_type="latent",
                         generator=torch.Generator().manual_seed(0), **kwargs).frames

    eager = shot(1)
    assert compile_experts(tiny_pipe, backend="eager") == ["transformer", "transformer_2"]
    start = compile_stats()
    torch.testing.assert_close(shot(1), eager)  # warm-up: the blocks compile here (once, dynamic shapes)
    warm = compile_stats()
    assert (warm - start).graphs >= 1 and (warm - start).seconds > 0
    for memory_count in (2, 3, 5):
        shot(memory_count)
    assert (compile_stats() - warm).graphs == 0


def test_low_vram_placement_runs_from_encoded_prompts(tiny_pipe):
    embeddings = encode_story_prompts(tiny_pipe, ["a red circle walks"], negative_prompt="")
    kwargs = resolve_preset("release", steps=2).apply(tiny_pipe)
    reference = run(tiny_pipe, **kwargs)
    # On the CPU only the mechanics can be checked (the checks refuse --low-vram without CUDA).
    done = enable_low_vram(tiny_pipe, "cpu", LowVramConfig(use_stream=False))
    assert done["experts"] == ["transformer", "transformer_2"] and done["vae_tiling"]
    assert tiny_pipe.text_encoder is None and tiny_pipe.vae.use_tiling
    assert tiny_pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    out = run(tiny_pipe, prompt=None, negative_prompt=None, **embeddings[0].call_kwargs(), **kwargs)
    assert torch.isfinite(out).all()
    assert (out - reference).norm() / reference.norm() < 0.2  # fp8 storage rounds the weights, nothing more


def test_release_models_drops_experts():
    from storymem import StoryMemPipeline
    from storymem.builtin.tiny import build_tiny_components

    pipe = StoryMemPipeline(**build_tiny_components(seed=0))
    assert release_models(pipe) == ["transformer", "transformer_2"]
    assert pipe.transformer is None and pipe.transformer_2 is None
    assert release_models(pipe) == []


class _Embedder:
    def __init__(self):
        self._model = torch.nn.Linear(2, 2)


class _LazyScorer:
    def __init__(self):
        self.model = None

    def score(self):
        self.model = torch.nn.Linear(2, 2)  # built on first use, like HPSv3Scorer


def test_keyframe_models_visit_the_device_only_inside_the_block():
    class Selector:
        embedder, scorer = _Embedder(), _LazyScorer()

    selector = Selector()
    with keyframe_models_on(selector, device="cpu", offload_device="meta"):
        assert selector.embedder._model.weight.device.type == "cpu"
        selector.scorer.score()
    assert selector.embedder._model.weight.device.type == "meta"
    assert selector.scorer.model.weight.device.type == "meta"


IMPOSSIBLE = [
    (dict(device="cpu", low_vram=True), r"--low-vram .* needs a CUDA device; --device is cpu"),
    (dict(device="cuda", low_vram=True, offload="model"), r"--low-vram with --offload model"),
    (dict(device="cuda", low_vram=True, parallel="ulysses"), r"--low-vram with --parallel ulysses"),
    (dict(device="cuda", low_vram=True, compile=True), r"--compile with --low-vram"),
    (dict(device="cuda", compile=True, offload="sequential"), r"--compile with --offload sequential"),
    (dict(device="cuda", fuse=True, needs_adapter_off="--first-shot base"), r"--fuse with --first-shot base"),
    (dict(device="cuda", t2v_distill_lora="x"), r"--t2v-distill-lora needs --t2v-model"),
    (dict(device="cuda", preset="turbo"), r"--preset 'turbo'"),
]


@pytest.mark.parametrize("flags,message", IMPOSSIBLE, ids=[m.split(" ")[0] + str(i) for i, (_, m) in
                                                          enumerate(IMPOSSIBLE)])
def test_impossible_flag_combinations_are_refused_by_name(flags, message):
    with pytest.raises(ValueError, match=message):
        check_speed_options(**flags)


def test_possible_combinations_pass_with_warnings():
    assert check_speed_options(device="cuda", preset="lightning", distill_lora="d", fuse=True, compile=True) == []
    assert check_speed_options(device="cuda", low_vram=True, preset="lightning", distill_lora="d") == []
    warnings = check_speed_options(device="cpu", preset="lightning")
    assert len(warnings) == 1 and "--preset lightning without --distill-lora" in warnings[0]


def test_speed_options_parse_into_the_dataclass():
    import argparse

    from storymem.acceleration import SpeedOptions
    from storymem.arguments import add_arguments, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser, SpeedOptions)
    options = from_args(SpeedOptions, parser.parse_args([]))
    assert (options.preset, options.fuse, options.compile, options.low_vram) == ("release", True, False, False)
    options = from_args(SpeedOptions, parser.parse_args(
        ["--preset", "lightning", "--distill-lora", "lora/", "--distill-lora-scale", "0.9", "--no-fuse",
         "--distill-lora-skip", "image", "--low-vram"]))
    assert (options.preset, options.distill_lora, options.distill_lora_scale, options.fuse) == \
        ("lightning", "lora/", 0.9, False)
    assert options.distill_lora_skip == ["image"] and options.low_vram
    with pytest.raises(SystemExit):
        parser.parse_args(["--preset", "turbo"])
