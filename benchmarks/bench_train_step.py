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

# No `from __future__ import annotations`: the options' types are read from the class itself, which also works
# when the file is run with runpy (as the tests do), where the module's globals are gone by then.
import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import WanTransformer3DModel
from diffusers.training_utils import cast_training_params

from storymem.arguments import add_arguments, from_args, option
from storymem.defaults import MOTION_FRAMES
from storymem.devices import resolve_device, resolve_dtype_name, torch_dtype
from storymem.lora import StoryMemLoraConfig, add_storymem_adapter
from storymem.rope import install_memory_rope
from storymem.training.loss import flow_matching_loss


@dataclass
class BenchOptions:
    device: Optional[str] = option(None, help="device (default: cuda when a GPU is present, else cpu)")
    tiny: bool = option(False, help="tiny model and size (smoke test)")
    layers: int = option(40, group="model", help="transformer blocks")
    heads: int = option(40, group="model", help="attention heads")
    head_dim: int = option(128, group="model", help="channels per head")
    ffn: int = option(13824, group="model", help="feed-forward width")
    text_dim: int = option(4096, group="model", help="text embedding width")
    freq_dim: int = option(256, group="model", help="timestep embedding width")
    rank: int = option(128, group="model", help="LoRA rank")
    height: int = option(480, group="sample", help="frame height")
    width: int = option(832, group="sample", help="frame width")
    num_frames: int = option(81, group="sample", help="frames of the target clip")
    memory_frames: int = option(10, group="sample", help="memory frames")
    context_frames: int = option(1, choices=(0, 1, MOTION_FRAMES), group="sample",
                                 help="0 M2V, 1 MI2V, 5 MM2V")
    text_tokens: int = option(512, group="sample", help="text tokens")
    gradient_checkpointing: bool = option(True, group="run", help="recompute activations (default: on)")
    steps: int = option(3, group="run", help="timed steps")
    warmup: int = option(1, group="run", help="untimed steps first")
    json: Optional[str] = option(None, group="run", help="also write the results here")


# --tiny: a one-block model at 32x32x9 (seconds on the CPU).
TINY = dict(layers=1, heads=2, head_dim=16, ffn=64, text_dim=32, freq_dim=32, height=32, width=32, num_frames=9,
            memory_frames=2, rank=4, text_tokens=16)


def step_flops(cfg: dict, tokens: int, text_tokens: int, checkpointing: bool) -> float:
    """Matmul FLOPs of one step: forward, backward (2x forward), and the checkpointed blocks' recompute."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    per_layer = (8 * tokens * d * d + 4 * tokens * tokens * d + 4 * tokens * d * d + 4 * text_tokens * d * d
                 + 4 * tokens * text_tokens * d + 4 * tokens * d * cfg["ffn_dim"])
    forward = per_layer * cfg["num_layers"]
    return forward * (4 if checkpointing else 3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, BenchOptions)
    args = from_args(BenchOptions, parser.parse_args(argv))
    if args.tiny:
        args = dataclasses.replace(args, **TINY)

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    dtype = torch_dtype(resolve_dtype_name("auto", device))
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
    if args.gradient_checkpointing:
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
          f"checkpointing={args.gradient_checkpointing}")
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
    flops = step_flops(cfg, tokens, args.text_tokens, args.gradient_checkpointing)
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
