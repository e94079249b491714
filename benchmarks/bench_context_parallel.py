"""Context parallelism for a StoryMem shot: frames against a 1-GPU run, and the per-step speedup.

Run under torchrun on N GPUs (one process each):

    torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py                  # ulysses
    torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py --parallel ring
    torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py --layers 40 --heads 40 --ffn 13824  # A14B

What it does: every rank builds the same StoryMemPipeline - two mid-sized random Wan experts (default 12 layers,
16 heads x 128, ffn 8192, bf16), the tiny toy VAE and text encoder - with the memory rope installed as the
pipeline does. Rank 0 first renders one shot alone (480x832x81 with 3 memory frames by default, same seed);
then diffusers' context parallelism (`enable_parallelism`, the Wan `_cp_plan`) is switched on and all ranks
render the same shot together. Printed: the time per denoising step (2 transformer forwards with CFG, timed
with CUDA events) for both runs and the speedup, and how far the parallel latents and decoded frames are from
the single-GPU ones (bf16 attention is split differently, so they match to rounding, not bit for bit).

diffusers sets up context parallelism on accelerator devices only (it maps ranks to `torch.accelerator`
devices), so there is no CPU/gloo mode; the script refuses to run without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist


def build_pipeline(args, device):
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from storymem import StoryMemPipeline
    from storymem.builtin.tiny import TinyConfig, build_tiny_components

    components = build_tiny_components(TinyConfig(), seed=0)
    text_dim = components["text_encoder"].config.d_model
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=128, in_channels=36,
               out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=args.ffn, num_layers=args.layers,
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
               image_dim=None)
    experts = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                model = WanTransformer3DModel(**cfg).eval().requires_grad_(False)
        finally:
            torch.set_default_dtype(torch.float32)
        with torch.device(device):
            model.rope = WanRotaryPosEmbed(128, (1, 2, 2), 1024)
        # Same weights on every rank, whatever the RNG does on each device.
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)
        experts.append(model)
    components.update(transformer=experts[0], transformer_2=experts[1])
    pipe = StoryMemPipeline(**components)
    pipe.vae.to(device)
    pipe.text_encoder.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StepTimer:
    """CUDA-event time of each transformer forward."""

    def __init__(self, models):
        self.events = []
        for model in models:
            model.register_forward_pre_hook(self._start)
            model.register_forward_hook(self._stop)

    def _start(self, module, args):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append([event, None])

    def _stop(self, module, args, output):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events[-1][1] = event

    def forward_seconds(self) -> list[float]:
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1000.0 for a, b in self.events]


def render(pipe, args, memory, output_type):
    return pipe(prompt="the same red circle walks across the desert at night", memory_images=memory,
                height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
                guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(args.seed),
                output_type=output_type).frames


def timed_render(pipe, args, memory, timer):
    render(pipe, dict_to_args(args, steps=2), memory, "latent")  # warm-up (kernels, cuDNN plans, NCCL)
    timer.events.clear()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    latents = render(pipe, args, memory, "latent")
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    forwards = timer.forward_seconds()
    per_step = [sum(forwards[i:i + 2]) for i in range(0, len(forwards), 2)]
    return latents, wall, per_step


def dict_to_args(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float().cpu(), b.float().cpu()
    diff = (a - b).abs()
    return dict(max_abs=float(diff.max()), mean_abs=float(diff.mean()),
                rel=float(diff.norm() / b.norm().clamp_min(1e-12)), finite=bool(torch.isfinite(a).all()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parallel", default="ulysses", choices=["ulysses", "ring"])
    ap.add_argument("--attention-backend", help="diffusers attention backend (ring defaults to _native_cudnn)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--memory-frames", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="rank 0 writes the results here")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        raise SystemExit("bench_context_parallel.py needs CUDA GPUs: diffusers' context parallelism maps ranks to "
                         "accelerator devices (no CPU/gloo mode)")
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("run under torchrun, e.g. `torchrun --nproc-per-node 2 benchmarks/bench_context_parallel.py`")
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()

    from storymem.render import enable_context_parallel

    pipe = build_pipeline(args, device)
    rng = np.random.RandomState(0)
    memory = [rng.randint(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(args.memory_frames)]
    timer = StepTimer([pipe.transformer, pipe.transformer_2])

    # 1 GPU: rank 0 alone (the others wait at the barrier).
    single = None
    if rank == 0:
        if args.attention_backend or args.parallel == "ring":
            # Same attention kernel as the parallel run, so the comparison isolates the split.
            for model in (pipe.transformer, pipe.transformer_2):
                model.set_attention_backend(args.attention_backend or "_native_cudnn")
        latents, wall, steps = timed_render(pipe, args, memory, timer)
        frames = render(pipe, dict_to_args(args, steps=args.steps), memory, "np")
        single = dict(latents=latents, wall=wall, steps=steps, frames=frames)
        for model in (pipe.transformer, pipe.transformer_2):
            model.reset_attention_backend()
    dist.barrier()

    enable_context_parallel(pipe, args.parallel, world, args.attention_backend)
    latents, wall, steps = timed_render(pipe, args, memory, timer)
    frames = render(pipe, args, memory, "np")
    dist.barrier()

    if rank == 0:
        tokens = (args.memory_frames + (args.frames - 1) // 4 + 1) * (args.height // 16) * (args.width // 16)
        one, many = statistics.median(single["steps"]), statistics.median(steps)
        result = dict(
            parallel=args.parallel, world_size=world, gpu=torch.cuda.get_device_name(),
            model=dict(layers=args.layers, heads=args.heads, head_dim=128, ffn=args.ffn),
            size=[args.height, args.width, args.frames], memory_frames=args.memory_frames, tokens=tokens,
            steps=args.steps, step_s_1gpu=one, step_s_parallel=many, speedup=one / many,
            wall_s_1gpu=single["wall"], wall_s_parallel=wall,
            latents=compare(latents, single["latents"]),
            frames=compare(torch.from_numpy(np.asarray(frames)), torch.from_numpy(np.asarray(single["frames"]))),
        )
        print(f"{args.parallel} x{world} on {result['gpu']}: {tokens} tokens, {args.layers} layers, "
              f"{args.heads}x128 heads")
        print(f"  per step: 1 GPU {one:.3f} s, {world} GPUs {many:.3f} s -> speedup {one / many:.2f}x")
        print(f"  shot ({args.steps} steps): 1 GPU {single['wall']:.1f} s, {world} GPUs {wall:.1f} s")
        print(f"  latents vs 1 GPU: max |diff| {result['latents']['max_abs']:.3e}, "
              f"relative {result['latents']['rel']:.3e}")
        print(f"  frames  vs 1 GPU: max |diff| {result['frames']['max_abs']:.3e} (of 1.0), "
              f"mean {result['frames']['mean_abs']:.3e}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
