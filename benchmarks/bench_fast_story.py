"""Fast stories: the release's sampling vs a distilled few-step LoRA, regional compilation and low-VRAM placement,
side by side in one run, on random weights at Wan2.2-I2V-A14B size (components from bench_shot.py).

Rows, each one shot of HxWxF with --memory-frames random memory images:

* release            - 40 steps, guidance 3.5 on both experts (2 forwards a step), UniPC shift 4, the StoryMem
                       adapter (rank 128, rsLoRA) unfused as the render path keeps it today. Measured at
                       --release-steps steps and extrapolated to 40 (both printed): per-step cost is constant.
* lightning          - 4 steps, guidance 1/1 (1 forward a step), Euler shift 5 on Wan's grid, boundary 0.9, with a
                       random rank-64 distill LoRA in lightx2v's file format (written to disk, validated, loaded by
                       storymem.distill) beside the StoryMem adapter, both fused (fused output checked).
* lightning+compile  - the same, each expert's block compiled (dynamic shapes); compile time, then a sweep of one
                       forward per memory count (--sweep-memory, at --sweep-frames) counting recompiles.
* lightning+low-VRAM - prompts encoded up front and the text encoder released, experts in fp8 storage with
                       block-level group offload on CUDA streams, tiled VAE.
* story              - 3 shots in low-VRAM mode, keyframes picked after each (CLIP ViT-B/32 with random weights when
                       open_clip is installed, else pixel embeddings; HPSv3's network - Qwen2-VL-7B size + reward
                       head - with random weights as the scorer, aesthetic bar off so random scores pass), the
                       keyframe models on the GPU only while they select, memory from the bank.

Per row: s/shot, s/forward, share outside the transformer, and per phase (text, vae_encode, denoise, vae_decode,
keyframes) seconds, peak allocated / reserved GiB and host RAM peak GiB. Random weights say nothing about quality.

    python benchmarks/bench_fast_story.py --json out.json          # one H200: all rows, ~6-8 min
    python benchmarks/bench_fast_story.py --tiny --device cpu      # smoke test: tiny components, < 1 min
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shot import ForwardTimer, _build, build_pipeline  # noqa: E402

from storymem.acceleration import (LowVramConfig, compile_experts, compile_stats, enable_low_vram,  # noqa: E402
                                   encode_story_prompts, free_accelerator_memory, keyframe_models_on, resolve_preset)
from storymem.distill import (expert_configs_from_pipeline, fuse_loras, load_distill_lora,  # noqa: E402
                              prepare_distill_lora, set_lora_scales)

GIB = 2**30
PROMPTS = ["the same red circle walks across the desert at night", "the red circle meets a blue square by a tree",
           "the red circle and the blue square walk into the city"]
QWEN2_VL_7B = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=3584, mlp_ratio=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2))
TINY_QWEN2_VL = dict(
    text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=152064, max_position_embeddings=4096,
                     rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}),
    vision_config=dict(depth=1, embed_dim=16, num_heads=2, hidden_size=32, mlp_ratio=2, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2))


# ---------------------------------------------------------------------------------------------- measuring
class HostMemory:
    """Peak resident host memory since the last reset, sampled every 20 ms (the process peak if psutil lacks)."""

    def __init__(self):
        try:
            import psutil

            self.process = psutil.Process()
        except ImportError:
            self.process = None
        self.peak, self._stop = 0, False
        if self.process is not None:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self._stop:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def take_peak(self) -> float:
        if self.process is None:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        peak, self.peak = max(self.peak, self.process.memory_info().rss), 0
        return peak / GIB


class PhaseMeter:
    """Wall time, peak allocated/reserved GPU memory and host RAM peak per phase of a shot. Phases switch when
    the text encoder, the VAE's encode/decode or an expert is entered (hooks installed by :meth:`attach`)."""

    def __init__(self, device, host: HostMemory):
        self.cuda = torch.device(device).type == "cuda"
        self.host, self.phases, self.current, self.t0 = host, {}, None, 0.0

    def switch(self, name):
        if name == self.current:
            return
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.current is not None:
            row = self.phases.setdefault(self.current, dict(s=0.0, peak_allocated_gib=0.0, peak_reserved_gib=0.0,
                                                            host_peak_gib=0.0))
            row["s"] += now - self.t0
            if self.cuda:
                row["peak_allocated_gib"] = max(row["peak_allocated_gib"], torch.cuda.max_memory_allocated() / GIB)
                row["peak_reserved_gib"] = max(row["peak_reserved_gib"], torch.cuda.max_memory_reserved() / GIB)
            row["host_peak_gib"] = max(row["host_peak_gib"], self.host.take_peak())
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.host.take_peak()
        self.current, self.t0 = name, now

    def take(self) -> dict:
        self.switch(None)
        phases, self.phases = self.phases, {}
        return {k: {n: round(v, 3) for n, v in row.items()} for k, row in phases.items()}

    def attach(self, pipe):
        """Phase switches on the pipeline's components (kept for the pipeline's lifetime)."""
        for name in ("transformer", "transformer_2"):
            model = getattr(pipe, name, None)
            if model is not None:
                model.register_forward_pre_hook(lambda *a: self.switch("denoise"))
        if pipe.text_encoder is not None:
            pipe.text_encoder.register_forward_pre_hook(lambda *a: self.switch("text"))
        vae = pipe.vae
        for method, phase in (("encode", "vae_encode"), ("decode", "vae_decode")):
            original = getattr(vae, method)

            def wrapped(*args, _original=original, _phase=phase, **kwargs):
                self.switch(_phase)
                return _original(*args, **kwargs)

            setattr(vae, method, wrapped)


def measure_shot(pipe, meter, timer, kwargs, memory, args, label, seed=0):
    """One shot; returns (row, uint8 frames)."""
    meter.take()  # drop what ran since the last shot (probe forwards, sweeps)
    timer.reset()
    meter.switch("setup")
    t0 = time.perf_counter()
    out = pipe(memory_images=memory, height=args.height, width=args.width, num_frames=args.frames,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs)
    meter.switch(None)
    wall = time.perf_counter() - t0
    inside = timer.total_s()
    phases = meter.take()
    phases.pop("setup", None)
    frames = np.round(np.clip(np.asarray(out.frames[0]), 0, 1) * 255).astype(np.uint8)
    row = dict(row=label, s_per_shot=round(wall, 3), forwards=timer.calls,
               s_per_forward=round(inside / max(1, timer.calls), 4), transformer_s=round(inside, 3),
               outside_share=round((wall - inside) / wall, 4), memory_frames=len(memory), phases=phases,
               host_ram_process_peak_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2),
               finite=bool(np.isfinite(np.asarray(out.frames[0])).all()))
    return row, frames


def print_row(row):
    phases = " | ".join(f"{k} {v['s']:.1f}s {v['peak_allocated_gib']:.1f}/{v['peak_reserved_gib']:.1f} GiB "
                        f"host {v['host_peak_gib']:.1f}" for k, v in row["phases"].items())
    print(f"{row['row']:22s} {row['s_per_shot']:8.1f} s/shot  {row['forwards']:3d} fwd x {row['s_per_forward']:.3f} s"
          f"  outside {100 * row['outside_share']:5.1f}%  [{phases}]", flush=True)


# ---------------------------------------------------------------------------------------------- models
def lightx2v_files(folder, configs, rank, device, seed=0):
    """A random distill LoRA written as lightx2v does: one safetensors per expert, original Wan module names,
    lora_down / lora_up / alpha on every attention and ffn layer of every block."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device).manual_seed(seed)
    for expert, filename in (("transformer", "high_noise_model.safetensors"),
                             ("transformer_2", "low_noise_model.safetensors")):
        cfg = configs[expert]
        dim, ffn = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"]
        shapes = {f"{kind}_attn.{p}": (dim, dim) for kind in ("self", "cross") for p in "qkvo"}
        shapes.update({"ffn.0": (ffn, dim), "ffn.2": (dim, ffn)})
        sd = {}
        for i in range(cfg["num_layers"]):
            for module, (out_f, in_f) in shapes.items():
                key = f"diffusion_model.blocks.{i}.{module}"
                sd[f"{key}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g, device=device)
                                                 / in_f**0.5).to(torch.bfloat16).cpu()
                sd[f"{key}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g, device=device)
                                               * 1e-3).to(torch.bfloat16).cpu()
                sd[f"{key}.alpha"] = torch.tensor(float(rank))
        save_file(sd, str(folder / filename))
    return folder


def add_random_storymem_adapter(pipe, rank):
    from storymem.lora import StoryMemLoraConfig, add_storymem_adapter

    config = StoryMemLoraConfig(rank=rank, alpha=float(rank), dropout=0.0)
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name)
        add_storymem_adapter(model, config)
        model.eval()
        with torch.no_grad():
            for param_name, p in model.named_parameters():
                if "lora_B" in param_name:
                    p.normal_(0, 1e-3)


class RandomHPSv3Scorer:
    """HPSv3's network (Qwen2-VL + reward head, storymem.memory.hpsv3.HPSv3RewardModel) at the given size with
    random weights, fed as HPSv3 feeds it: the frame at 448x448 (256 * 28 * 28 pixels: 1024 patches, 256 merged
    image tokens), ~420 tokens of instruction around it, the reward token last; one frame per call."""

    def __init__(self, config: dict, device, text_tokens: int = 420, side: int = 448):
        from transformers import Qwen2VLConfig

        from storymem.memory.hpsv3 import HPSv3RewardModel

        self.config = Qwen2VLConfig(**config)
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        self.model = _build(HPSv3RewardModel, device, dtype, config=self.config).eval().requires_grad_(False)
        self.model.rm_head.float()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.text_tokens, self.side, self.calls = text_tokens, side, 0
        self.reward_id = self.config.text_config.vocab_size - 1

    @torch.no_grad()
    def score(self, images, prompts=None):
        device = next(self.model.parameters()).device
        dtype = next(self.model.model.visual.parameters()).dtype
        scores = []
        for image in images:
            self.calls += 1
            x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 255.0
            x = torch.nn.functional.interpolate(x, size=(self.side, self.side), mode="bicubic")[0]
            g = self.side // 14
            # Qwen2-VL's patch layout: two identical time steps, 2x2 merge blocks, (C, T, 14, 14) per patch.
            x = torch.stack([x, x]).reshape(1, 2, 3, g // 2, 2, 14, g // 2, 2, 14)
            pixels = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(g * g, 3 * 2 * 14 * 14)
            gen = torch.Generator().manual_seed(self.calls)
            half = self.text_tokens // 2
            ids = torch.cat([torch.randint(0, 151000, (half,), generator=gen),
                             torch.tensor([self.config.vision_start_token_id]),
                             torch.full((g * g // 4,), self.config.image_token_id),
                             torch.tensor([self.config.vision_start_token_id + 1]),
                             torch.randint(0, 151000, (self.text_tokens - half,), generator=gen),
                             torch.tensor([self.reward_id])])[None]
            out = self.model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                             pixel_values=pixels.to(device, dtype),
                             image_grid_thw=torch.tensor([[1, g, g]], device=device),
                             reward_token_id=self.reward_id)
            scores.append(float(out[0, 0]))
        return scores


def build_selector(args, device):
    from storymem.memory import KeyframeSelector, PixelEmbedder

    try:
        from storymem.memory import OpenCLIPEmbedder

        embedder = OpenCLIPEmbedder("ViT-B-32", pretrained=None, device=device).load()
        embedder_name = "open_clip ViT-B-32 (random weights)"
    except Exception as e:  # open_clip missing: the embedder is the small part of the keyframe phase
        embedder, embedder_name = PixelEmbedder(), f"pixel embeddings (open_clip unavailable: {e.__class__.__name__})"
    scorer = RandomHPSv3Scorer(TINY_QWEN2_VL if args.tiny else QWEN2_VL_7B, device)
    for model in (getattr(embedder, "_model", None), scorer.model):
        if model is not None:
            model.to("cpu")
    free_accelerator_memory()
    # The aesthetic bar is off (random scores); the scorer still scores every frame the release would ask about.
    return KeyframeSelector(embedder=embedder, scorer=scorer, aesthetic_threshold=-1e9), embedder_name, scorer.params


def uncompile(pipe):
    for name in ("transformer", "transformer_2"):
        for module in getattr(pipe, name).modules():
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = None
    torch._dynamo.reset()


@torch.no_grad()
def recompile_sweep(model, counts, args, device):
    """One forward per memory count at --sweep-frames; returns the graphs compiled during the sweep."""
    from storymem.rope import memory_rope

    f = (args.sweep_frames - 1) // 4 + 1
    h, w = args.height // 8, args.width // 8
    dtype = torch.bfloat16 if args.cuda else torch.float32
    text = torch.randn(1, 512, model.config.text_dim, device=device, dtype=dtype)
    before = compile_stats()
    times = {}
    for fm in counts:
        x = torch.randn(1, model.config.in_channels, fm + f, h, w, device=device, dtype=text.dtype)
        if args.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with memory_rope(model, fm):
            model(hidden_states=x, timestep=torch.tensor([500.0], device=device), encoder_hidden_states=text,
                  return_dict=False)
        if args.cuda:
            torch.cuda.synchronize()
        times[fm] = round(time.perf_counter() - t0, 3)
    return (compile_stats() - before).graphs, times


# ---------------------------------------------------------------------------------------------- rows
def run(args):
    device = args.device
    args.cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if args.cuda else torch.float32
    host = HostMemory()
    report = dict(device=torch.cuda.get_device_name() if args.cuda else device, tiny=args.tiny,
                  size=[args.height, args.width, args.frames], memory_frames=args.memory_frames, rows=[])
    t0 = time.perf_counter()
    pipe = build_pipeline(args.tiny, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    add_random_storymem_adapter(pipe, args.storymem_rank)
    selector, embedder_name, scorer_params = build_selector(args, device) if "story" in args.rows else (None, None, 0)
    report["build_s"] = round(time.perf_counter() - t0, 1)
    report["keyframe_models"] = dict(embedder=embedder_name, scorer_params_b=round(scorer_params / 1e9, 2))
    print(f"built in {report['build_s']} s on {report['device']}; keyframes: {embedder_name}, HPSv3-sized scorer "
          f"{scorer_params / 1e9:.2f}B", flush=True)
    meter, timer = PhaseMeter(device, host), ForwardTimer([pipe.transformer, pipe.transformer_2], device)
    meter.attach(pipe)
    rng = np.random.RandomState(0)
    memory = [rng.randint(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(args.memory_frames)]
    prompt = dict(prompt=PROMPTS[0], negative_prompt=None)
    rows = report["rows"]

    # Warm-up (kernel selection, allocator), untimed: one release step at full size.
    release = resolve_preset("release", steps=args.release_steps)
    kwargs = release.apply(pipe)
    measure_shot(pipe, meter, timer, {**prompt, **kwargs, "num_inference_steps": 1}, memory, args, "warm-up")

    if "release" in args.rows:
        row, _ = measure_shot(pipe, meter, timer, dict(prompt, **kwargs), memory, args, "release")
        per_step = row["transformer_s"] / args.release_steps
        row["measured_steps"] = args.release_steps
        row["extrapolated_s_per_shot"] = round(row["s_per_shot"] + per_step * (40 - args.release_steps), 1)
        rows.append(row)
        print_row(row)
        print(f"{'':22s} extrapolated to 40 steps x 2 forwards: {row['extrapolated_s_per_shot']:.1f} s/shot",
              flush=True)

    # Lightning: a distill LoRA in lightx2v's format beside the StoryMem adapter, fused.
    lightning = resolve_preset("lightning")
    kwargs = lightning.apply(pipe)
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        folder = lightx2v_files(Path(tmp) / "lightning", expert_configs_from_pipeline(pipe), args.distill_rank, device)
        t2 = time.perf_counter()
        lora = prepare_distill_lora(folder, expert_configs_from_pipeline(pipe))
        t3 = time.perf_counter()
        load_distill_lora(pipe, lora)
        set_lora_scales(pipe, {"storymem": 1.0, "distill": 1.0})
        t4 = time.perf_counter()
    del lora
    # Unfused cost per forward: two steps are enough (one forward each).
    unfused_row, _ = measure_shot(pipe, meter, timer, {**prompt, **kwargs, "num_inference_steps": 2}, memory, args,
                                  "lightning unfused")
    t5 = time.perf_counter()
    fuse = fuse_loras(pipe)
    lora_info = dict(write_s=round(t2 - t1, 1), validate_s=round(t3 - t2, 1), load_s=round(t4 - t3, 1),
                     fuse_s=round(time.perf_counter() - t5, 1), fuse_relative_error=fuse.relative_error,
                     unfused_s_per_forward=unfused_row["s_per_forward"])
    print(f"distill LoRA rank {args.distill_rank}: written {lora_info['write_s']} s, validated "
          f"{lora_info['validate_s']} s, loaded {lora_info['load_s']} s, fused {lora_info['fuse_s']} s (relative "
          f"difference {', '.join(f'{v:.2%}' for v in fuse.relative_error.values())}); unfused "
          f"{unfused_row['s_per_forward']:.3f} s/forward", flush=True)
    row, _ = measure_shot(pipe, meter, timer, dict(prompt, **kwargs), memory, args, "lightning")
    row["lora"] = lora_info
    rows.append(row)
    print_row(row)

    if "compile" in args.rows:
        uncompiled = row["s_per_forward"]
        compile_experts(pipe, backend=args.compile_backend, mode=args.compile_mode)
        before = compile_stats()
        first, _ = measure_shot(pipe, meter, timer, dict(prompt, **kwargs), memory, args, "compile warm-up")
        compiled = compile_stats() - before
        row, _ = measure_shot(pipe, meter, timer, dict(prompt, **kwargs), memory, args, "lightning+compile")
        recompiles, sweep_times = recompile_sweep(pipe.transformer, args.sweep_memory, args, device)
        row.update(compile_s=round(compiled.seconds, 1), graphs=compiled.graphs, first_shot_s=first["s_per_shot"],
                   speedup_per_forward=round(uncompiled / row["s_per_forward"], 3),
                   sweep=dict(memory_counts=args.sweep_memory, frames=args.sweep_frames, recompiles=recompiles,
                              s_per_forward=sweep_times))
        rows.append(row)
        print_row(row)
        print(f"{'':22s} compiled in {compiled.seconds:.1f} s ({compiled.graphs} graphs; first shot "
              f"{first['s_per_shot']:.1f} s); {row['speedup_per_forward']:.3f}x per forward; memory counts "
              f"{args.sweep_memory[0]}..{args.sweep_memory[-1]}: {recompiles} recompiles", flush=True)
        uncompile(pipe)

    if "low-vram" in args.rows or "story" in args.rows:
        low_vram_rows(pipe, meter, timer, memory, kwargs, selector, args, report)

    report["goals"] = goals(report)
    for name, (value, ok) in report["goals"].items():
        print(f"goal {name}: {value} -> {'met' if ok else 'NOT met'}")
    return report


def low_vram_rows(pipe, meter, timer, memory, kwargs, selector, args, report):
    from storymem.memory import MemoryBank

    rows = report["rows"]
    device = args.device
    meter.take()
    meter.switch("prompts_up_front")
    embeddings = encode_story_prompts(pipe, PROMPTS, guidance=kwargs["guidance_scale"] > 1)
    meter.switch("placement")
    # On the CPU (smoke test) only the mechanics run: no fp8, offload without streams.
    config = LowVramConfig() if args.cuda else LowVramConfig(use_stream=False)
    enable_low_vram(pipe, device, config)
    setup = meter.take()
    print(f"low-VRAM setup: prompts encoded up front in {setup['prompts_up_front']['s']:.1f} s, placement "
          f"{setup['placement']['s']:.1f} s", flush=True)
    if "low-vram" in args.rows:
        row, _ = measure_shot(pipe, meter, timer, dict(embeddings[0].call_kwargs(), **kwargs), memory, args,
                              "lightning+low-VRAM")
        row["setup"] = setup
        rows.append(row)
        print_row(row)
    if "story" not in args.rows:
        return
    bank, story = MemoryBank(max_memory=10, sink=3), []
    for index, emb in enumerate(embeddings):
        shot_memory = [e.frame for e in bank.entries()]
        row, frames = measure_shot(pipe, meter, timer, dict(emb.call_kwargs(), **kwargs), shot_memory, args,
                                   f"story shot {index + 1}", seed=index)
        meter.switch("keyframes")
        with keyframe_models_on(selector, device):
            selection = selector.extract(frames, memory=bank.history_embeddings(selector.embedder))
        keyframes = meter.take()
        bank.add(frames[selection.indices], shot=index, embeddings=selection.embeddings,
                 frame_indices=selection.indices)
        row["phases"].update(keyframes)
        row["keyframes"] = dict(indices=selection.indices, scorer_calls=selection.stats.score_calls,
                                embedded_images=selection.stats.embedded_images)
        story.append(row)
        print_row(row)
    report["story"] = story


def goals(report) -> dict:
    rows = {r["row"]: r for r in report["rows"]}
    out = {}
    light = rows.get("lightning")
    if light:
        out["lightning shot <= 25 s"] = (light["s_per_shot"], light["s_per_shot"] <= 25)
    if light and "release" in rows:
        ratio = rows["release"]["extrapolated_s_per_shot"] / light["s_per_shot"]
        out["lightning >= 12x faster than release (40 steps)"] = (round(ratio, 1), ratio >= 12)
    if "lightning+compile" in rows:
        c = rows["lightning+compile"]
        out["compiled forward >= 1.15x eager"] = (c["speedup_per_forward"], c["speedup_per_forward"] >= 1.15)
        out["no recompile across memory counts"] = (c["sweep"]["recompiles"], c["sweep"]["recompiles"] == 0)
    story = report.get("story") or []
    low = [r for r in story] + ([rows["lightning+low-VRAM"]] if "lightning+low-VRAM" in rows else [])
    if low and report["device"] != "cpu":
        worst = max(p["peak_reserved_gib"] for r in low for p in r["phases"].values())
        out["low-VRAM peak reserved <= 22 GiB in every phase"] = (round(worst, 2), worst <= 22)
        slowest = max(r["s_per_shot"] for r in low)
        out["low-VRAM lightning shot <= 45 s"] = (slowest, slowest <= 45)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--memory-frames", type=int, default=3)
    ap.add_argument("--rows", nargs="+", default=["release", "compile", "low-vram", "story"],
                    choices=["release", "compile", "low-vram", "story"], help="rows besides lightning (always run)")
    ap.add_argument("--release-steps", type=int, default=4, help="release steps measured (extrapolated to 40)")
    ap.add_argument("--distill-rank", type=int, default=64)
    ap.add_argument("--storymem-rank", type=int, default=128)
    ap.add_argument("--sweep-memory", type=int, nargs="+", default=list(range(1, 11)))
    ap.add_argument("--sweep-frames", type=int, default=21, help="frames of the recompile sweep's forwards")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; eager "
                                                             "with --tiny)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--tiny", action="store_true", help="tiny components at 32x32x9 (smoke test)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.tiny:
        args.height, args.width, args.frames = min(args.height, 32), min(args.width, 32), min(args.frames, 9)
        args.sweep_frames = min(args.sweep_frames, 5)
        args.sweep_memory = [m for m in args.sweep_memory if m <= 3] or [1]
        args.distill_rank, args.storymem_rank = min(args.distill_rank, 4), min(args.storymem_rank, 4)
        args.release_steps = min(args.release_steps, 2)
        args.compile_backend = args.compile_backend or "eager"
    t0 = time.perf_counter()
    report = run(args)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"total {report['wall_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    gc.collect()


if __name__ == "__main__":
    main()
