"""Distill LoRAs: lightx2v-format files written here load next to a storymem adapter into both experts, each
scale changes the output, fusing matches unfused output, and bad files are refused by file and key before any
model loads."""

import json

import pytest
import torch
from safetensors.torch import save_file

from storymem.lora_fusion import LoraFusionError
from storymem.distill import (DistillLoraError, DistillLoraFiles, fuse_loras, load_distill_lora,
                              loaded_lora_modules, prepare_distill_lora, read_expert_configs, resolve_distill_lora,
                              set_lora_scales, validate_distill_lora)

ATTN = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
        "cross_attn.o"]


def lightx2v_state_dict(config, rank=3, seed=0, alpha=None, prefix="diffusion_model."):
    """A Wan2.2-Lightning-style LoRA for an expert of ``config``: lora_down/lora_up/alpha on every attention and
    ffn layer, a diff_b bias on one, zeroed norm diffs and a full head diff (as the '1022' releases carry)."""
    g = torch.Generator().manual_seed(seed)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    ffn, out = config["ffn_dim"], config["out_channels"] * 4
    shapes = {m: (dim, dim) for m in ATTN}
    shapes.update({"ffn.0": (ffn, dim), "ffn.2": (dim, ffn)})
    sd = {}
    for i in range(config["num_layers"]):
        for module, (o, n) in shapes.items():
            key = f"{prefix}blocks.{i}.{module}"
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, n, generator=g) * 0.2
            sd[f"{key}.lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.2
            sd[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
        sd[f"{prefix}blocks.{i}.ffn.2.diff_b"] = torch.randn(dim, generator=g) * 0.01
        sd[f"{prefix}blocks.{i}.norm3.diff"] = torch.zeros(dim)
        sd[f"{prefix}blocks.{i}.self_attn.norm_q.diff"] = torch.zeros(dim)
    sd[f"{prefix}head.head.diff"] = torch.randn(out, dim, generator=g) * 0.01
    sd[f"{prefix}head.head.diff_b"] = torch.randn(out, generator=g) * 0.01
    return sd


def write_pair(folder, configs, high=None, low=None, **kwargs):
    folder.mkdir(parents=True, exist_ok=True)
    high = high if high is not None else lightx2v_state_dict(configs["transformer"], seed=1, **kwargs)
    low = low if low is not None else lightx2v_state_dict(configs["transformer_2"], seed=2, **kwargs)
    save_file(high, str(folder / "high_noise_model.safetensors"))
    save_file(low, str(folder / "low_noise_model.safetensors"))
    return folder


@pytest.fixture
def configs(tiny_components):
    return {e: dict(tiny_components[e].config) for e in ("transformer", "transformer_2")}


@pytest.fixture
def base_folder(tmp_path, configs):
    """The experts' configs as a diffusers folder holds them: nothing but JSON."""
    folder = tmp_path / "base"
    index = {"_class_name": "WanImageToVideoPipeline"}
    for expert, config in configs.items():
        (folder / expert).mkdir(parents=True)
        (folder / expert / "config.json").write_text(json.dumps(config))
        index[expert] = ["diffusers", "WanTransformer3DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def storymem_pipe(tiny_pipe, tmp_path):
    """The tiny pipeline with a storymem adapter (rank 4, random non-zero weights) in both experts."""
    from storymem import StoryMemPipeline
    from storymem.builtin.tiny import build_tiny_components
    from storymem.lora import StoryMemLoraConfig, add_storymem_adapter, save_storymem_lora

    config = StoryMemLoraConfig(rank=4, alpha=4.0, dropout=0.0)
    source = build_tiny_components(seed=0)
    with torch.no_grad():
        for expert in ("transformer", "transformer_2"):
            add_storymem_adapter(source[expert], config)
            for name, p in source[expert].named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    save_storymem_lora(tmp_path / "storymem", {e: source[e] for e in ("transformer", "transformer_2")}, config)
    tiny_pipe.load_storymem_lora(tmp_path / "storymem")
    assert isinstance(tiny_pipe, StoryMemPipeline)
    return tiny_pipe


def shot(pipe):
    """Two steps (t=1000 high-noise expert, t=800 low-noise expert), no CFG: latents of a 5-frame shot."""
    return pipe(prompt="a red circle walks", negative_prompt="", num_frames=5, height=32, width=32,
                num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                generator=torch.Generator().manual_seed(0)).frames


def test_lightx2v_files_load_next_to_storymem_adapter_and_each_scale_counts(storymem_pipe, tmp_path, configs):
    pipe = storymem_pipe
    lora = prepare_distill_lora(write_pair(tmp_path / "lightning", configs), configs)
    assert lora.ranks == {"transformer": [3, 64], "transformer_2": [3, 64]}  # 64: the full head diff
    assert len(lora.ignored["transformer"]) == 2 * configs["transformer"]["num_layers"]  # the zeroed norm diffs
    storymem_only = shot(pipe)
    load_distill_lora(pipe, lora)
    for expert in ("transformer", "transformer_2"):
        model = getattr(pipe, expert)
        assert set(model.peft_config) == {"storymem", "distill"}
        assert loaded_lora_modules(model, "distill") == lora.modules[expert]
        assert "proj_out" in lora.modules[expert] and len(loaded_lora_modules(model, "storymem")) == 20
    both = shot(pipe)
    set_lora_scales(pipe, {"storymem": 1.2, "distill": 1.0})
    storymem_up = shot(pipe)
    set_lora_scales(pipe, {"storymem": 1.0, "distill": 0.5})
    distill_half = shot(pipe)
    set_lora_scales(pipe, {"storymem": 1.0, "distill": {"transformer": 1.0, "transformer_2": 0.0}})
    distill_low_off = shot(pipe)
    set_lora_scales(pipe, {"storymem": 1.0})
    distill_off = shot(pipe)
    set_lora_scales(pipe, {})
    nothing = shot(pipe)
    results = [storymem_only, both, storymem_up, distill_half, distill_low_off, nothing]
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            assert not torch.allclose(results[i], results[j], atol=1e-5), (i, j)
    torch.testing.assert_close(distill_off, storymem_only)  # switching it off restores the storymem-only shot
    set_lora_scales(pipe, {"storymem": 1.0, "distill": 1.0})
    torch.testing.assert_close(shot(pipe), both)  # ... and on again


@pytest.mark.parametrize("device", [None, "cpu"], ids=["model probe", "layer by layer"])
def test_fused_output_matches_unfused(storymem_pipe, tmp_path, configs, device):
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = storymem_pipe
    load_distill_lora(pipe, prepare_distill_lora(write_pair(tmp_path / "l", configs), configs))
    set_lora_scales(pipe, {"storymem": 1.1, "distill": 0.8})
    unfused = shot(pipe)
    report = fuse_loras(pipe, device=device)
    assert report.adapters == {"transformer": ["distill", "storymem"], "transformer_2": ["distill", "storymem"]}
    assert all(0 <= e < 1e-4 for e in report.relative_error.values()) and len(report.relative_error) == 2
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.transformer.modules())  # layers merged and gone
    torch.testing.assert_close(shot(pipe), unfused, rtol=1e-4, atol=1e-5)


def test_fuse_check_failure_leaves_adapters_unfused(storymem_pipe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = storymem_pipe
    before = shot(pipe)
    for device in (None, "cpu"):
        with pytest.raises(LoraFusionError, match="transformer: fused output differs"):
            fuse_loras(pipe, tolerance=0.0, device=device)  # float32 merging still rounds: zero tolerance fails
    layers = [m for m in pipe.transformer.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and not any(m.merged for m in layers)
    torch.testing.assert_close(shot(pipe), before)


def test_validation_needs_configs_only_and_reads_diffusers_naming(base_folder, tmp_path, configs):
    read = read_expert_configs(str(base_folder))
    assert read == json.loads(json.dumps(configs))  # (tuples come back as lists)
    diffusers_keys = {"transformer.blocks.1.attn1.to_q.lora_A.weight": torch.randn(2, 24),
                      "transformer.blocks.1.attn1.to_q.lora_B.weight": torch.randn(24, 2)}
    write_pair(tmp_path / "d", configs, high=diffusers_keys, low=lightx2v_state_dict(configs["transformer_2"]))
    lora = prepare_distill_lora(tmp_path / "d", read)
    assert lora.modules["transformer"] == ["blocks.1.attn1.to_q"]
    assert set(lora.state_dicts["transformer"]) == {"diffusion_model.blocks.1.self_attn.q.lora_down.weight",
                                                    "diffusion_model.blocks.1.self_attn.q.lora_up.weight"}


def _variant(configs, change):
    sd = lightx2v_state_dict(configs["transformer"], seed=1)
    change(sd)
    return sd


BAD_FILES = [
    ("unknown module", lambda sd: sd.update({"diffusion_model.blocks.0.self_attn.zz.lora_down.weight":
                                             torch.zeros(3, 24)}),
     r"1 keys match no module of transformer: diffusion_model\.blocks\.0\.self_attn\.zz"),
    ("block past num_layers", lambda sd: sd.update({"diffusion_model.blocks.2.ffn.0.lora_down.weight":
                                                    torch.zeros(3, 24)}),
     r"match no module of transformer: diffusion_model\.blocks\.2\.ffn\.0"),
    ("image cross-attention", lambda sd: sd.update({"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight":
                                                    torch.zeros(3, 24)}),
     r"1 keys of image cross-attention, which transformer does not have .*cross_attn\.k_img.*skip 'image'"),
    ("another model's width", lambda sd: sd.update({"diffusion_model.blocks.1.self_attn.k.lora_down.weight":
                                                    torch.zeros(3, 1536)}),
     r"do not fit transformer.*blocks\.1\.self_attn\.k\.lora_down\.weight \(3, 1536\) \(expected \(rank, 24\)\)"),
    ("half a LoRA", lambda sd: sd.pop("diffusion_model.blocks.0.ffn.0.lora_up.weight"),
     r"blocks\.0\.ffn\.0\.lora_down\.weight \(its up half is missing\)"),
    ("non-zero norm diff", lambda sd: sd["diffusion_model.blocks.1.norm3.diff"].fill_(0.5),
     r"blocks\.1\.norm3\.diff \(non-zero, and diffusers' Wan loader would not apply it; skip 'unapplied'"),
    ("non-finite", lambda sd: sd["diffusion_model.blocks.0.self_attn.v.lora_up.weight"].__setitem__(0, float("nan")),
     r"non-finite values in diffusion_model\.blocks\.0\.self_attn\.v\.lora_up\.weight"),
    ("two ranks in a pair", lambda sd: sd.update({"diffusion_model.blocks.0.ffn.2.lora_up.weight": torch.zeros(24, 5)}),
     r"lora_up\.weight rank 5 != .*lora_down\.weight rank 3"),
    ("non-scalar alpha", lambda sd: sd.update({"diffusion_model.blocks.0.ffn.2.alpha": torch.ones(2)}),
     r"ffn\.2\.alpha \(2,\) \(expected a scalar\)"),
    ("another format", lambda sd: sd.update({"lora_unet_blocks_0_ffn_0.lora_down.weight": torch.zeros(3, 24)}),
     r"match no module.*lora_unet_blocks_0_ffn_0"),
]


@pytest.mark.parametrize("what,change,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_are_refused_by_file_and_key(base_folder, tmp_path, configs, what, change, message):
    folder = write_pair(tmp_path / "bad", configs, high=_variant(configs, change))
    with pytest.raises(DistillLoraError, match=message) as info:
        prepare_distill_lora(folder, read_expert_configs(str(base_folder)))
    assert "high_noise_model.safetensors" in str(info.value)


def test_missing_or_ambiguous_expert_files_are_refused(tmp_path, configs):
    folder = tmp_path / "one"
    folder.mkdir()
    save_file(lightx2v_state_dict(configs["transformer"]), str(folder / "high_noise_model.safetensors"))
    with pytest.raises(DistillLoraError, match=r"no low-noise file .* for transformer_2; found: "
                                               r"\['high_noise_model.safetensors'\]"):
        resolve_distill_lora(folder)
    with pytest.raises(DistillLoraError, match="one file for a model with 2 experts"):
        resolve_distill_lora(folder / "high_noise_model.safetensors")
    save_file(lightx2v_state_dict(configs["transformer"]), str(folder / "lora_HIGH_fp16.safetensors"))
    save_file(lightx2v_state_dict(configs["transformer"]), str(folder / "lora_low_fp16.safetensors"))
    with pytest.raises(DistillLoraError, match="several high-noise files"):
        resolve_distill_lora(folder)
    with pytest.raises(DistillLoraError, match=r"nowhere\.safetensors: low-noise file of the distill LoRA not found"):
        resolve_distill_lora(f"{folder / 'lora_HIGH_fp16.safetensors'},{tmp_path / 'nowhere.safetensors'}")
    high_only = DistillLoraFiles({"transformer": folder / "high_noise_model.safetensors"}, "high only")
    with pytest.raises(DistillLoraError, match=r"high only: no file for \['transformer_2'\] \(low-noise\)"):
        validate_distill_lora(high_only, configs)
    # A one-expert model needs the high-noise file alone.
    single = prepare_distill_lora(folder / "high_noise_model.safetensors", {"transformer": configs["transformer"]})
    assert list(single.state_dicts) == ["transformer"]


def test_pairs_folders_and_hub_ids_resolve(tmp_path, configs):
    folder = tmp_path / "kijai"
    folder.mkdir()
    for level in ("HIGH", "LOW"):
        save_file(lightx2v_state_dict(configs["transformer"]),
                  str(folder / f"Wan2.2-Lightning_I2V-A14B-4steps-lora_{level}_fp16.safetensors"))
    files = resolve_distill_lora(folder).files
    assert files["transformer"].name.endswith("HIGH_fp16.safetensors")
    assert files["transformer_2"].name.endswith("LOW_fp16.safetensors")
    same = folder / "Wan2.2-Lightning_I2V-A14B-4steps-lora_HIGH_fp16.safetensors"
    pair = resolve_distill_lora(f"{same},{same}").files  # one file loaded into both experts
    assert pair == {"transformer": same, "transformer_2": same}
    with pytest.raises(DistillLoraError, match="lightx2v/no-such-repo"):  # offline in the tests: refused by name
        resolve_distill_lora("lightx2v/no-such-repo")


def test_image_keys_and_unapplied_diffs_are_left_out_only_when_asked(base_folder, tmp_path, configs):
    """Like lightx2v's Wan2.2-I2V '1022' LoRAs: image cross-attention keys the model has no modules for, and
    non-zero modulation diffs diffusers drops. Refused by default; left out, and recorded, on request."""
    def like_1022(seed):
        sd = lightx2v_state_dict(configs["transformer"], seed=seed)
        for i in range(2):
            sd[f"diffusion_model.blocks.{i}.cross_attn.k_img.lora_down.weight"] = torch.randn(3, 24)
            sd[f"diffusion_model.blocks.{i}.cross_attn.k_img.lora_up.weight"] = torch.randn(24, 3)
            sd[f"diffusion_model.blocks.{i}.cross_attn.norm_k_img.diff"] = torch.randn(24)
            sd[f"diffusion_model.blocks.{i}.diff_m"] = torch.randn(1, 6, 24)
        sd["diffusion_model.img_emb.proj.1.lora_down.weight"] = torch.randn(3, 24)
        return sd

    folder = write_pair(tmp_path / "1022", configs, high=like_1022(1), low=like_1022(2))
    configs = read_expert_configs(str(base_folder))
    image_keys = r"7 keys of image cross-attention.*cross_attn\.k_img.* and 1 more; skip 'image'"
    with pytest.raises(DistillLoraError, match=image_keys):
        prepare_distill_lora(folder, configs)
    with pytest.raises(DistillLoraError, match=r"blocks\.0\.diff_m \(non-zero.*skip 'unapplied'"):
        prepare_distill_lora(folder, configs, skip=["image"])
    with pytest.raises(DistillLoraError, match=r"unknown skip categories \['img'\]"):
        prepare_distill_lora(folder, configs, skip=["img"])
    lora = prepare_distill_lora(folder, configs, skip=["image", "unapplied"])
    assert len(lora.skipped["transformer"]) == 9 and "diffusion_model.blocks.1.diff_m" in lora.skipped["transformer"]
    assert lora.summary()["skipped_keys"]["transformer_2"] == lora.skipped["transformer_2"]
    assert not any("_img" in k or "diff_m" in k for k in lora.state_dicts["transformer"])
