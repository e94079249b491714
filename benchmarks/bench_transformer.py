"""Transformer forward with memory frames: storymem's memory-aware call vs diffusers' stock forward.

Full size (defaults): the Wan2.2-I2V-A14B expert config, random bf16 weights, 480x832x81 (21 latent frames,
1560 tokens each) plus 0/3/10 memory frames. Both sides run the same weights on the same token count; the
stock side uses diffusers' own rope (contiguous positions), ours the memory rope (negative positions) plus the
condition concatenation the pipeline does every step. Prints seconds per forward, TFLOP/s and the overhead.

    python benchmarks/bench_transformer.py                      # GPU, full size
    python benchmarks/bench_transformer.py --tiny --device cpu  # smoke test
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from storymem.conditioning import build_memory_condition
from storymem.rope import install_memory_rope, memory_rope

A14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
            text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, image_dim=None)
TINY = dict(A14B, num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=64, num_layers=2, freq_dim=32)


def forward_flops(cfg, tokens, text_tokens):
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    per_layer = (8 * tokens * d * d            # self-attention q, k, v, o
                 + 4 * tokens * tokens * d     # QK^T and AV
                 + 4 * tokens * d * d          # cross-attention q, o
                 + 4 * text_tokens * d * d     # cross-attention k, v on the text
                 + 4 * tokens * text_tokens * d
                 + 4 * tokens * d * cfg["ffn_dim"])
    return per_layer * cfg["num_layers"]


def timed(fn, device, iters):
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny model and size (smoke test)")
    ap.add_argument("--memory", type=int, nargs="+", default=[0, 3, 10])
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = dict(TINY if args.tiny else A14B)
    if args.layers:
        cfg["num_layers"] = args.layers
    if args.tiny:
        args.height, args.width, args.frames = 32, 32, 9
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = WanTransformer3DModel(**cfg).eval()
    torch.set_default_dtype(previous)
    stock_rope = model.rope
    assert isinstance(stock_rope, WanRotaryPosEmbed)
    memory_rope_module = install_memory_rope(model)

    f = (args.frames - 1) // 4 + 1
    h, w = args.height // 8, args.width // 8
    text = torch.randn(1, 512, cfg["text_dim"], device=device, dtype=dtype)
    t = torch.tensor([900.0], device=device)
    results = []
    print(f"device={device} dtype={dtype} layers={cfg['num_layers']} size={args.height}x{args.width}x{args.frames}")
    for fm in args.memory:
        tokens = (fm + f) * (h // 2) * (w // 2)
        latents = torch.randn(1, 16, fm + f, h, w, device=device, dtype=torch.float32)
        cond = build_memory_condition(
            torch.randn(1, 16, fm, h, w, device=device) if fm else None,
            torch.randn(1, 16, f, h, w, device=device), args.frames, 1).tensor
        stock_input = torch.cat([latents, cond], 1).to(dtype)

        def stock():
            model.rope = stock_rope
            with torch.no_grad():
                model(stock_input, t, text, return_dict=False)

        def ours():
            model.rope = memory_rope_module
            with torch.no_grad(), memory_rope(model, fm, "negative"):
                x = torch.cat([latents, cond], dim=1).to(dtype)  # what the pipeline does every step
                model(x, t, text, return_dict=False)

        timed(stock, device, args.warmup)
        timed(ours, device, args.warmup)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        s_times, o_times = [], []
        for _ in range(args.iters):  # interleaved, so drift hits both sides alike
            s_times += timed(stock, device, 1)
            o_times += timed(ours, device, 1)
        s, o = sorted(s_times)[len(s_times) // 2], sorted(o_times)[len(o_times) // 2]
        flops = forward_flops(cfg, tokens, 512)
        row = dict(memory_frames=fm, tokens=tokens, stock_s=s, ours_s=o, overhead_pct=100 * (o / s - 1),
                   stock_tflops=flops / s / 1e12, ours_tflops=flops / o / 1e12,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
        results.append(row)
        print(f"fm={fm:2d} tokens={tokens:6d}  stock {s:.3f} s ({row['stock_tflops']:.0f} TFLOP/s)  "
              f"ours {o:.3f} s ({row['ours_tflops']:.0f} TFLOP/s)  overhead {row['overhead_pct']:+.2f}%"
              + (f"  peak {row['peak_gib']:.1f} GiB" if row["peak_gib"] else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(config=cfg, device=str(device), results=results), fh, indent=2)


if __name__ == "__main__":
    main()
