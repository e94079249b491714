"""One full-size story shot: StoryMemPipeline with memory frames, random weights at the real sizes.

Components (all random, built directly in their dtype on the target device, never in fp32 on the CPU):
both Wan2.2-I2V-A14B experts (40 layers, 40 heads x 128, ffn 13824, in 36, out 16, text_dim 4096) in bf16 with
diffusers' fp32 modules kept in fp32, a UMT5-XXL-sized encoder (d_model 4096, 24 layers, d_ff 10240, 64 heads,
vocab 256384) in bf16, and the Wan2.1 VAE (AutoencoderKLWan defaults) in fp32 as diffusers' Wan examples run it.
Both experts in bf16 take 2 x ~28.6 GB, the encoder ~11.4 GB.

For each --offload mode: one shot of 480x832x81 with 3 memory frames, 40 steps x 2 (CFG) forwards: wall time,
peak GPU memory, time inside the transformer forwards (CUDA events on forward hooks) and the share outside
them (text encoding, VAE encode/decode, scheduler, offload transfers).

    python benchmarks/bench_shot.py                          # H100/H200: --offload none and model
    python benchmarks/bench_shot.py --offload model --steps 10
    python benchmarks/bench_shot.py --tiny --device cpu      # smoke test: tiny components, tiny size
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np
import torch


A14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, image_dim=None)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
TINY_TRANSFORMER = dict(A14B, num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=64, num_layers=2,
                        freq_dim=32, rope_max_seq_len=64)
TINY_UMT5 = dict(UMT5_XXL, vocab_size=256384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])


def _build(cls, device, dtype, **kwargs):
    """Instantiate ``cls(**kwargs)`` with its parameters created directly on ``device`` in ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(**kwargs)
    finally:
        torch.set_default_dtype(previous)


def build_transformer(cfg, device, dtype):
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    model = _build(WanTransformer3DModel, device, dtype, **cfg).eval().requires_grad_(False)
    # As from_pretrained(torch_dtype=bf16) leaves them: rope tables built in full precision, and the modules
    # diffusers keeps in fp32 (time embedder, modulation tables, norms) in fp32.
    with torch.device(device):
        model.rope = WanRotaryPosEmbed(cfg["attention_head_dim"], cfg["patch_size"], cfg["rope_max_seq_len"])
    for name, module in model.named_modules():
        if any(part in model._keep_in_fp32_modules for part in name.split(".")):
            module.float()
    for name, param in model.named_parameters():
        if any(part in model._keep_in_fp32_modules for part in name.split(".")):
            param.data = param.data.float()
    return model


def build_pipeline(tiny: bool, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from storymem import StoryMemPipeline
    from storymem.builtin.tiny import build_tokenizer

    torch.manual_seed(0)
    t_cfg = TINY_TRANSFORMER if tiny else A14B
    high = build_transformer(t_cfg, device, dtype)
    low = build_transformer(t_cfg, device, dtype)
    text_encoder = _build(UMT5EncoderModel, device, dtype, config=UMT5Config(**(TINY_UMT5 if tiny else UMT5_XXL)))
    text_encoder.eval().requires_grad_(False)
    vae = _build(AutoencoderKLWan, device, torch.float32, **(TINY_VAE if tiny else {})).eval().requires_grad_(False)
    # The real UMT5 tokenizer cannot be downloaded here; any tokenizer does, the text is padded to 512 tokens.
    tokenizer = build_tokenizer()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=4.0,
                                        num_train_timesteps=1000)
    pipe = StoryMemPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                            transformer=high, transformer_2=low, boundary_ratio=0.9)
    return pipe


class ForwardTimer:
    """Time spent inside the experts' forwards: CUDA events (or perf_counter on CPU) on forward hooks."""

    def __init__(self, models, device):
        self.cuda = torch.device(device).type == "cuda"
        self.pairs, self.cpu_total, self.calls = [], 0.0, 0
        self.handles = []
        for model in models:
            self.handles.append(model.register_forward_pre_hook(self._start))
            self.handles.append(model.register_forward_hook(self._stop))

    def _start(self, module, args):
        self.calls += 1
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.pairs.append([start, None])
        else:
            self._t0 = time.perf_counter()

    def _stop(self, module, args, output):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pairs[-1][1] = end
        else:
            self.cpu_total += time.perf_counter() - self._t0

    def total_s(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.pairs) / 1000.0
        return self.cpu_total

    def reset(self):
        self.pairs, self.cpu_total, self.calls = [], 0.0, 0

    def remove(self):
        for h in self.handles:
            h.remove()


def run_shot(pipe, args, device, memory, seed=0):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = pipe(prompt="the same red circle walks across the desert at night", memory_images=memory,
               height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
               guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out.frames


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--offload", nargs="+", default=["none", "model"], choices=["none", "model", "sequential"])
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--memory-frames", type=int, default=3)
    ap.add_argument("--warmup-steps", type=int, default=2, help="a short untimed shot first (0: none)")
    ap.add_argument("--tiny", action="store_true", help="tiny components (smoke test); sizes default to 32x32x9, "
                                                       "2 steps")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.tiny:
        args.height, args.width, args.frames = min(args.height, 32), min(args.width, 32), min(args.frames, 9)
        args.steps = min(args.steps, 2)
    device = args.device
    on_cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32

    t0 = time.perf_counter()
    pipe = build_pipeline(args.tiny, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - t0
    params = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("transformer", "transformer_2", "text_encoder", "vae")}
    print(f"built in {build_s:.1f} s on {device} ({dtype}): " +
          ", ".join(f"{k} {v / 1e9:.2f}B" for k, v in params.items()))
    rng = np.random.RandomState(0)
    memory = [rng.randint(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(args.memory_frames)]
    timer = ForwardTimer([pipe.transformer, pipe.transformer_2], device)

    results = []
    for mode in args.offload:
        if mode != "none" and not on_cuda:
            print(f"--offload {mode}: skipped (needs an accelerator)")
            continue
        pipe.remove_all_hooks()
        if mode == "none":
            pipe.to(device)
        elif mode == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
        try:
            if args.warmup_steps:
                steps, args.steps = args.steps, args.warmup_steps
                run_shot(pipe, args, device, memory)
                args.steps = steps
            timer.reset()
            if on_cuda:
                torch.cuda.reset_peak_memory_stats()
            wall, frames = run_shot(pipe, args, device, memory)
        except torch.OutOfMemoryError as err:
            print(f"--offload {mode}: out of GPU memory ({str(err).splitlines()[0]})")
            results.append(dict(offload=mode, oom=True))
            pipe.remove_all_hooks()
            gc.collect()
            torch.cuda.empty_cache()
            continue
        inside = timer.total_s()
        row = dict(offload=mode, wall_s=wall, transformer_s=inside, outside_s=wall - inside,
                   outside_share=(wall - inside) / wall, forwards=timer.calls,
                   per_forward_s=inside / max(1, timer.calls), frames=list(frames.shape),
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
                   finite=bool(np.isfinite(frames).all()))
        results.append(row)
        print(f"--offload {mode:10s} shot {wall:8.1f} s | transformer {inside:8.1f} s ({timer.calls} forwards, "
              f"{row['per_forward_s']:.3f} s each) | outside {wall - inside:6.1f} s "
              f"({100 * row['outside_share']:.1f}%)" + (f" | peak {row['peak_gib']:.1f} GiB" if on_cuda else ""))
    timer.remove()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=str(torch.cuda.get_device_name() if on_cuda else device), tiny=args.tiny,
                           size=[args.height, args.width, args.frames], steps=args.steps,
                           memory_frames=args.memory_frames, params=params, build_s=build_s, results=results),
                      fh, indent=2)


if __name__ == "__main__":
    main()
