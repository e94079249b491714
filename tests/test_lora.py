"""Adapters: the published StoryMem layout, exact rsLoRA scaling, the memory RoPE the published weights load with,
storymem round trips, strict errors."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from storymem import StoryMemPipeline
from storymem.lora import ORIGINAL_TO_DIFFUSERS, AdapterError, StoryMemLoraConfig, save_storymem_lora
from storymem.builtin.tiny import build_tiny_components

RANK = 128


def _published_state_dict(transformer, rank=RANK, seed=0, scale=0.02):
    """Random weights in the published key layout (peft on the original WanModel)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, block in enumerate(transformer.blocks):
        for original, ours in ORIGINAL_TO_DIFFUSERS.items():
            lin = block.get_submodule(ours)
            sd[f"base_model.model.blocks.{i}.{original}.lora_A.weight"] = torch.randn(rank, lin.in_features,
                                                                                   generator=g) * scale
            sd[f"base_model.model.blocks.{i}.{original}.lora_B.weight"] = torch.randn(lin.out_features, rank,
                                                                                   generator=g) * scale
    return sd


def _write_published(folder, pipe, fmt_high=".pth", fmt_low=".safetensors", variant="Wan2.2-MI2V-A14B", **kw):
    variant = folder / variant
    variant.mkdir(parents=True)
    sds = {}
    for expert, stem, fmt, seed in (("transformer", "backbone_high_noise", fmt_high, 0),
                                    ("transformer_2", "backbone_low_noise", fmt_low, 1)):
        sd = _published_state_dict(getattr(pipe, expert), seed=seed, **kw)
        if fmt == ".pth":
            torch.save(sd, variant / f"{stem}.pth")
        else:
            save_file(sd, str(variant / f"{stem}.safetensors"))
        sds[expert] = sd
    return sds


def _pipe():
    pipe = StoryMemPipeline(**build_tiny_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_published_weights_load_with_rslora_scale(tmp_path):
    pipe = _pipe()
    before = {e: {n: p.detach().clone() for n, p in getattr(pipe, e).named_parameters()}
              for e in ("transformer", "transformer_2")}
    sds = _write_published(tmp_path, pipe)
    config = pipe.load_storymem_lora(tmp_path)  # finds the single variant folder
    assert config.source == "published" and config.memory_rope == "negative" and config.conditioning == "mi2v"
    assert pipe.memory_rope == "negative" and pipe.memory_rope_stride == 5
    assert math.isclose(config.scaling, 128 / math.sqrt(128)) and round(config.scaling, 4) == 11.3137

    for expert, prefix in (("transformer", "blocks.1"), ("transformer_2", "blocks.0")):
        model = getattr(pipe, expert)
        for original, ours in (("self_attn.q", "attn1.to_q"), ("cross_attn.o", "attn2.to_out.0"),
                               ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2")):
            layer = model.get_submodule(f"{prefix}.{ours}")
            assert not layer.training, "adapter dropout must stay off at inference"
            base_w = before[expert][f"{prefix}.{ours}.weight"]
            a = sds[expert][f"base_model.model.{prefix}.{original}.lora_A.weight"]
            b = sds[expert][f"base_model.model.{prefix}.{original}.lora_B.weight"]
            # Effective weight change, measured through the layer: W' - W = (alpha / sqrt(r)) * B @ A.
            eye = torch.eye(layer.base_layer.in_features)
            with torch.no_grad():
                delta = (layer(eye) - torch.nn.functional.linear(eye, base_w, layer.base_layer.bias)).T
            torch.testing.assert_close(delta, 11.313708498984761 * (b @ a), rtol=1e-4, atol=1e-5)


def test_storymem_adapter_round_trip_and_diffusers_loader(tmp_path):
    pipe = _pipe()
    _write_published(tmp_path / "pub", pipe)
    config = pipe.load_storymem_lora(tmp_path / "pub", subfolder="Wan2.2-MI2V-A14B")
    save_storymem_lora(tmp_path / "ours", {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2},
                       config)
    saved = json.loads((tmp_path / "ours" / "storymem_adapter.json").read_text())
    assert saved["rank"] == RANK and saved["use_rslora"] and saved["memory_rope"] == "negative"

    kwargs = dict(prompt="a blue square", memory_images=[torch.rand(3, 32, 32)], height=32, width=32, num_frames=9,
                  num_inference_steps=2, output_type="latent")
    reference = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames

    again = _pipe()
    base = again(generator=torch.Generator().manual_seed(0), **kwargs).frames
    again.load_storymem_lora(tmp_path / "ours")
    assert again.memory_rope == "negative"
    reloaded = again(generator=torch.Generator().manual_seed(0), **kwargs).frames
    torch.testing.assert_close(reloaded, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, reference)

    # diffusers' own loader reads the saved files, with the same (rsLoRA) scaling.
    plain = _pipe()
    plain.load_lora_weights(tmp_path / "ours", weight_name="high_noise.safetensors", adapter_name="m")
    plain.load_lora_weights(tmp_path / "ours", weight_name="low_noise.safetensors", adapter_name="m",
                            load_into_transformer_2=True)
    for expert in ("transformer", "transformer_2"):
        layer = getattr(plain, expert).blocks[0].attn1.to_q
        assert math.isclose(layer.scaling["m"], 128 / math.sqrt(128))
    plain.transformer.eval(), plain.transformer_2.eval()
    torch.testing.assert_close(plain(generator=torch.Generator().manual_seed(0), **kwargs).frames, reference,
                               rtol=1e-5, atol=1e-5)


def test_unknown_keys_are_named(tmp_path):
    pipe = _pipe()
    sds = _write_published(tmp_path, pipe)
    sd = dict(sds["transformer"])
    sd["base_model.model.blocks.0.self_attn.norm_q.lora_A.weight"] = torch.zeros(RANK, 24)
    torch.save(sd, tmp_path / "Wan2.2-MI2V-A14B" / "backbone_high_noise.pth")
    with pytest.raises(AdapterError, match="unexpected keys.*self_attn.norm_q"):
        pipe.load_storymem_lora(tmp_path)
    assert not hasattr(pipe.transformer, "peft_config"), "nothing may be loaded when validation fails"


def test_missing_keys_are_named(tmp_path):
    pipe = _pipe()
    sds = _write_published(tmp_path, pipe)
    sd = {k: v for k, v in sds["transformer_2"].items() if "blocks.1.ffn.2" not in k}
    save_file(sd, str(tmp_path / "Wan2.2-MI2V-A14B" / "backbone_low_noise.safetensors"))
    with pytest.raises(AdapterError, match="missing keys.*blocks.1.ffn.net.2"):
        pipe.load_storymem_lora(tmp_path)


def test_other_rank_is_refused(tmp_path):
    pipe = _pipe()
    _write_published(tmp_path / "pub", pipe, rank=8)
    config = pipe.load_storymem_lora(tmp_path / "pub")
    assert config.rank == 8
    save_storymem_lora(tmp_path / "ours", {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2},
                       config)
    data = json.loads((tmp_path / "ours" / "storymem_adapter.json").read_text())
    data["rank"] = 128  # config says 128, tensors are rank 8
    (tmp_path / "ours" / "storymem_adapter.json").write_text(json.dumps(data))
    with pytest.raises(AdapterError, match="wrong shape \\(rank 128\\)"):
        _pipe().load_storymem_lora(tmp_path / "ours")


def test_bad_adapter_folders(tmp_path):
    pipe = _pipe()
    with pytest.raises(AdapterError, match="not found"):
        pipe.load_storymem_lora(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="backbone_high_noise"):
        pipe.load_storymem_lora(tmp_path / "empty")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "storymem_adapter.json").write_text('{"rank": 4, "colour": "red"}')
    with pytest.raises(AdapterError, match="unknown adapter config fields \\['colour'\\]"):
        pipe.load_storymem_lora(tmp_path / "cfg")
    both = tmp_path / "both"
    (both / "Wan2.2-MI2V-A14B").mkdir(parents=True)
    (both / "Wan2.2-MM2V-A14B").mkdir(parents=True)
    with pytest.raises(AdapterError, match="several published variants"):
        pipe.load_storymem_lora(both)
    pickled = tmp_path / "pickle" / "Wan2.2-MM2V-A14B"
    pickled.mkdir(parents=True)
    torch.save({"weights": object()}, pickled / "backbone_high_noise.pth")
    with pytest.raises(AdapterError, match="weights_only=True"):
        pipe.load_storymem_lora(pickled)


def test_config_files_in_repo_parse():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "lora_configs"
    configs = {p.name: StoryMemLoraConfig.from_file(p) for p in folder.glob("*.json")}
    assert configs["published_mi2v.json"].memory_rope == "negative"
    assert configs["published_mi2v.json"] == StoryMemLoraConfig.published()
    main = configs["mi2v_rank128.json"]
    assert (main.rank, main.alpha, main.use_rslora, main.memory_rope, main.memory_rope_stride) == (
        128, 128.0, True, "negative", 5)
    peft_config = main.to_peft_config()
    assert peft_config.use_rslora and peft_config.r == 128 and "ffn.net.0.proj" in peft_config.target_modules


def test_missing_local_paths_never_reach_a_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("hub contacted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    pipe = _pipe()
    for path in ("runs/x/adapter", "./adapter", str(tmp_path / "adapter")):
        with pytest.raises(AdapterError, match="adapter folder not found"):
            pipe.load_storymem_lora(path)


def test_hub_failures_name_the_repository(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(AdapterError, match="org/storymem-adapter: not a local folder.*offline"):
        _pipe().load_storymem_lora("org/storymem-adapter")


# ---------------------------------------------------------------------------------------------- memory RoPE

FM, F_LATENT = 2, 3  # two memory images, a 9-frame shot (3 latent frames)


def _time_table(head_dim, positions, theta=10000.0):
    """cos / sin of the time part of Wan's 3D RoPE at the given time positions, from the formula itself: the time
    axis gets ``head_dim - 4 * (head_dim // 6)`` channels, pair k rotating at ``theta ** (-2k / t_dim)``, each
    value repeated for the two channels of its pair."""
    t_dim = head_dim - 4 * (head_dim // 6)
    freqs = theta ** (-torch.arange(0, t_dim, 2, dtype=torch.float64) / t_dim)
    angles = torch.tensor(positions, dtype=torch.float64)[:, None] * freqs[None]
    return angles.cos().repeat_interleave(2, 1).float(), angles.sin().repeat_interleave(2, 1).float()


def _render_capturing_rope(pipe, **call_kwargs):
    """Render a shot with two memory images; return its latents and, for every transformer forward, the time
    part of the rope's (cos, sin) for each latent frame."""
    captured = []

    def hook(module, args, output):
        cos, sin = output
        _, _, frames, height, width = args[0].shape
        grid = (frames, height // module.patch_size[1], width // module.patch_size[2], cos.shape[-1])
        captured.append((module, cos.reshape(grid)[:, 0, 0], sin.reshape(grid)[:, 0, 0]))

    handles = [m.rope.register_forward_hook(hook) for m in (pipe.transformer, pipe.transformer_2)]
    try:
        memory = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(j)) for j in range(FM)]
        latents = pipe("a blue square", memory_images=memory, height=32, width=32, num_frames=9,
                       num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                       output_type="latent", **call_kwargs).frames
    finally:
        for handle in handles:
            handle.remove()
    return latents, captured


def _assert_time_positions(pipe, captured, positions):
    head_dim = pipe.transformer.config.attention_head_dim
    expected_cos, expected_sin = _time_table(head_dim, positions)
    t_dim = expected_cos.shape[1]
    # 2 steps, one forward each (no CFG): the high- then the low-noise expert.
    assert [module for module, _, _ in captured] == [pipe.transformer.rope, pipe.transformer_2.rope]
    for _, cos, sin in captured:
        assert cos.shape[0] == FM + F_LATENT
        torch.testing.assert_close(cos[:, :t_dim], expected_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin[:, :t_dim], expected_sin, rtol=0, atol=1e-6)


NEGATIVE = [-(FM - j) * 5 for j in range(FM)] + list(range(F_LATENT))  # [-10, -5, 0, 1, 2]
CONTIGUOUS = list(range(FM + F_LATENT))  # [0, 1, 2, 3, 4]


def test_published_adapter_renders_memory_at_negative_positions(tmp_path):
    pipe = _pipe()
    _write_published(tmp_path, pipe, fmt_high=".safetensors", variant="Wan2.2-MM2V-A14B", rank=4)
    config = pipe.load_storymem_lora(tmp_path)
    assert (config.source, config.conditioning, config.memory_rope, config.memory_rope_stride) == (
        "published", "mm2v", "negative", 5)
    latents, captured = _render_capturing_rope(pipe)
    assert latents.shape == (1, 16, F_LATENT, 4, 4)
    _assert_time_positions(pipe, captured, NEGATIVE)
    # The check can tell the two placements apart.
    with pytest.raises(AssertionError):
        _assert_time_positions(pipe, captured, CONTIGUOUS)


def test_contiguous_override_reproduces_the_first_release(tmp_path):
    _write_published(tmp_path, _pipe(), rank=4)
    negative = _pipe()
    negative.load_storymem_lora(tmp_path)
    reference, _ = _render_capturing_rope(negative)

    # The adapter override: the whole pipeline uses the first release's positions.
    overridden = _pipe()
    config = overridden.load_storymem_lora(tmp_path, memory_rope="contiguous")
    assert config.memory_rope == overridden.memory_rope == "contiguous"
    by_adapter, captured = _render_capturing_rope(overridden)
    _assert_time_positions(overridden, captured, CONTIGUOUS)

    # The pipeline argument: one call with the first release's positions, the adapter's default unchanged.
    by_call, captured = _render_capturing_rope(negative, memory_rope="contiguous")
    _assert_time_positions(negative, captured, CONTIGUOUS)
    assert negative.memory_rope == "negative"
    assert torch.equal(by_call, by_adapter)
    assert not torch.allclose(by_call, reference)

    with pytest.raises(AdapterError, match="memory_rope must be one of"):
        _pipe().load_storymem_lora(tmp_path, memory_rope="sideways")
