"""The built-in models: the small world's shipped weights load, the adapter is the one the pipeline uses, the
demo renders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from storymem import builtin


def test_shipped_weights_are_complete_and_small():
    files = [p for p in builtin.WEIGHTS_DIR.rglob("*") if p.is_file()]
    names = {p.relative_to(builtin.WEIGHTS_DIR).as_posix() for p in files}
    for needed in ("base/model_index.json", "base/transformer/diffusion_pytorch_model.safetensors",
                   "base/vae/diffusion_pytorch_model.safetensors", "base/text_encoder/model.safetensors",
                   "base/tokenizer/tokenizer.json", "adapter/storymem_adapter.json", "adapter/high_noise.safetensors",
                   "info.json"):
        assert needed in names
    assert sum(p.stat().st_size for p in files) <= 20 * 1000 * 1000
    info = builtin.builtin_info()
    assert info["adapter"]["steps"] > 0 and info["base"]["transformer_steps"] > 0
    adapter = json.loads((builtin.ADAPTER_DIR / "storymem_adapter.json").read_text())
    assert adapter["memory_rope"] == "negative" and adapter["experts"] == ["transformer"]
    # The recipe's config is the one the shipped adapter was trained with.
    recipe = json.loads((builtin.WEIGHTS_DIR.parents[2] / "lora_configs" / "toy_m2v.json").read_text())
    keys = ("rank", "alpha", "use_rslora", "target_modules", "memory_rope", "memory_rope_stride", "conditioning")
    assert {k: adapter[k] for k in keys} == {k: recipe[k] for k in keys}


def test_missing_weights_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "BASE_DIR", tmp_path / "base")
    with pytest.raises(builtin.BuiltinWeightsError, match="model_index.json"):
        builtin.load_builtin_pipeline("toy")


def _red_circle(x: int) -> np.ndarray:
    """A frame in the small world's style: a red disc on a sand-coloured ground."""
    yy, xx = np.mgrid[:64, :64]
    frame = np.full((64, 64, 3), (200, 180, 120), dtype=np.uint8)
    frame[(yy - 32) ** 2 + (xx - x) ** 2 < 100] = (220, 30, 30)
    return frame


def _render(pipe, memory=None):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red circle with a hat walks right through the desert", negative_prompt="", height=64,
                width=64, num_frames=5, num_inference_steps=2, guidance_scale=3.5, memory_images=memory,
                generator=torch.Generator().manual_seed(0), output_type="np").frames[0]


def test_base_and_adapter_load_and_the_adapter_uses_memory():
    base = builtin.load_builtin_pipeline("toy")
    assert base.transformer_2 is None and base.transformer.config.num_layers == 8
    assert base.vae_scale_factor_spatial == 4
    memory = [_red_circle(x) for x in (20, 40)]
    plain = _render(base, memory)
    adapted = builtin.load_builtin_pipeline("toy", adapter=True)
    with_memory = _render(adapted, memory)
    assert with_memory.shape == (5, 64, 64, 3) and np.isfinite(with_memory).all()
    assert np.abs(with_memory - plain).mean() > 1e-3  # the adapter is loaded and active
    assert np.abs(with_memory - _render(adapted)).mean() > 1e-3  # and the memory reaches the model


def test_training_base_toy_is_the_shipped_base():
    from storymem.training.models import base_identity, load_expert, resolve_base

    assert resolve_base("toy") == str(builtin.BASE_DIR) and base_identity("toy") == "toy"
    model = load_expert("toy", "transformer", dtype=torch.float32)
    assert model.config.num_layers == 8


def test_demo_renders_with_the_shipped_model(tmp_path):
    from storymem.render import main

    out = tmp_path / "demo"
    assert main(["--demo", "--out", str(out), "--steps", "2", "--frames", "5", "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["base"] == "toy" and manifest["settings"]["lora"] == "toy"
    assert (manifest["settings"]["height"], manifest["settings"]["width"]) == (64, 64)
    assert len(list((out / "shots").glob("*.mp4"))) >= 6 and (out / "contact_sheet.png").is_file()
