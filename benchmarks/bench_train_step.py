"""One StoryMem LoRA training step on one Wan2.2-A14B expert: peak GPU memory and step time.

Full size (defaults): the A14B expert config (40 layers, 40 heads x 128, ffn 13824, text 4096), random bf16
weights built on the GPU directly, the rank-128 adapter (fp32 LoRA weights, AdamW), gradient checkpointing,
480x832x81 (21 latent frames of 60x104) plus 10 memory frames, MI2V conditioning, the trainer's own loss
function (memory condition + memory rope + rectified-flow loss) under bf16 autocast.

    python benchmarks/bench_train_step.py                                  # GPU, full size
    python benchmarks/bench_train_step.py --memory-frames 3 --height 720 --width 1280
    python benchmarks/bench_train_step.py --device cpu --tiny              # smoke test
    python benchmarks/bench_train_step.py --device cpu --layers 1 --heads 2 --head-dim 16 --ffn 64 \
        --text-dim 32 --height 32 --width 32 --num-frames 9 --memory-frames 2 --rank 4
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import WanTransformer3DModel
from diffusers.training_utils import cast_training_params

from storymem.lora import StoryMemLoraConfig, add_storymem_adapter
from storymem.rope import install_memory_rope
from storymem.training.loss import flow_matching_loss


def step_flops(cfg: dict, tokens: int, text_tokens: int, checkpointing: bool) -> float:
    """Matmul FLOPs of one step: forward, backward (2x forward), and the checkpointed blocks' recompute."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    per_layer = (8 * tokens * d * d + 4 * tokens * tokens * d + 4 * tokens * d * d + 4 * text_tokens * d * d
                 + 4 * tokens * text_tokens * d + 4 * tokens * d * cfg["ffn_dim"])
    forward = per_layer * cfg["num_layers"]
    return forward * (4 if checkpointing else 3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny model and size (smoke test)")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=13824)
    ap.add_argument("--text-dim", type=int, default=4096)
    ap.add_argument("--freq-dim", type=int, default=256)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--num-frames", type=int, default=81)
    ap.add_argument("--memory-frames", type=int, default=10)
    ap.add_argument("--context-frames", type=int, choices=[0, 1, 5], default=1, help="0 M2V, 1 MI2V, 5 MM2V")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.tiny:
        args.layers, args.heads, args.head_dim, args.ffn, args.text_dim, args.freq_dim = 1, 2, 16, 64, 32, 32
        args.height, args.width, args.num_frames, args.memory_frames, args.rank = 32, 32, 9, 2, 4
        args.text_tokens = 16

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim,
               in_channels=36, out_channels=16, text_dim=args.text_dim, freq_dim=args.freq_dim, ffn_dim=args.ffn,
               num_layers=args.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
               image_dim=None)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # random weights created in bf16, on the GPU, with no host copy
    with torch.device(device):
        model = WanTransformer3DModel(**cfg)
    torch.set_default_dtype(previous)
    model.requires_grad_(False)
    install_memory_rope(model)
    lora = StoryMemLoraConfig(rank=args.rank, alpha=float(args.rank))
    add_storymem_adapter(model, lora)
    model.to(device)
    if not args.no_gradient_checkpointing:
        model.enable_gradient_checkpointing()
    cast_training_params(model, dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30

    f = (args.num_frames - 1) // 4 + 1
    h, w, fm = args.height // 8, args.width // 8, args.memory_frames
    batch = {
        "latents": torch.randn(1, 16, f, h, w, device=device, dtype=dtype),
        "memory_latents": torch.randn(1, 16, fm, h, w, device=device, dtype=dtype),
        "video_condition": torch.randn(1, 16, f, h, w, device=device, dtype=dtype),
        "prompt_embeds": torch.randn(1, args.text_tokens, args.text_dim, device=device, dtype=dtype),
        "num_context_frames": args.context_frames,
        "num_frames": args.num_frames,
    }
    tokens = (fm + f) * (h // 2) * (w // 2)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = flow_matching_loss(model, batch, expert="high", weight_dtype=dtype)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    print(f"device={device} dtype={dtype} layers={args.layers} heads={args.heads}x{args.head_dim} ffn={args.ffn} "
          f"rank={args.rank} size={args.height}x{args.width}x{args.num_frames} memory={fm} tokens={tokens} "
          f"checkpointing={not args.no_gradient_checkpointing}")
    print(f"weights {weights_gib:.2f} GiB, trainable {sum(p.numel() for p in params) / 1e6:.1f}M LoRA parameters")
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    flops = step_flops(cfg, tokens, args.text_tokens, not args.no_gradient_checkpointing)
    result = {"step_seconds": median, "steps": times, "tokens": tokens, "memory_frames": fm,
              "tflops_per_s": flops / median / 1e12, "loss": float(loss)}
    if cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    print(f"step {median:.3f} s (median of {len(times)}), {result['tflops_per_s']:.0f} TFLOP/s matmul"
          + (f", peak {result['peak_gib']:.1f} GiB allocated / {result['peak_reserved_gib']:.1f} GiB reserved"
             if cuda else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
