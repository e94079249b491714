"""Keyframe extraction for one shot: `KeyframeSelector` vs the release's algorithm restated literally
(`storymem.memory.reference.release_keyframes`), same embedder, same scorer, same frames.

    python benchmarks/bench_keyframes.py                       # 81 frames of 480x832 on the CPU
    python benchmarks/bench_keyframes.py --frames 41 --device cuda

Embedder: open_clip ViT-B-32 with random weights (pretrained=None; nothing is downloaded), the release's CLIP
architecture and preprocessing. Scorer: a deterministic, cheap contrast score standing in for HPSv3 (luma
standard deviation / 6.4, so dark frames fail the 3.0 bar); it costs next to nothing, so the figures isolate
the embedder work and the algorithm. The synthetic shot fades in from black, pans across a textured world and
darkens with a warm tint towards the end, which gives several similarity candidates and so a few adaptive
threshold passes (random CLIP weights respond mostly to brightness and colour). Both runs also dedup against
three remembered keyframes of an earlier, blue-tinted shot.

Prints embedder forwards and images, scorer calls, wall time, the speedup and whether the picks are identical.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from storymem.memory import KeyframeSelector, OpenCLIPEmbedder
from storymem.memory.reference import release_keyframes


class ContrastScorer:
    """Deterministic stand-in for HPSv3: 10 * std(luma) / 64."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def score(self, images, prompts=None):
        self.calls += 1
        self.images += len(images)
        return [float(10.0 * np.asarray(im, np.float32).mean(axis=-1).std() / 64.0) for im in images]


def synthetic_shot(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.uniform(0, 1, (1, 3, height // 24, 3 * width // 24)).astype(np.float32))
    world = F.interpolate(noise, size=(height, 3 * width), mode="bicubic").clamp(0, 1)[0].permute(1, 2, 0).numpy()
    t = np.arange(num_frames) / max(num_frames - 1, 1)
    gain = np.clip(t / 0.08, 0, 1) * (1 - 0.6 * np.clip((t - 0.4) / 0.5, 0, 1))  # fade in, then dusk
    warm = np.clip((t - 0.55) / 0.3, 0, 1)
    frames = []
    for i in range(num_frames):
        offset = int(i * 2 * width / max(num_frames - 1, 1))
        tint = np.array([1.0, 1 - 0.35 * warm[i], 1 - 0.7 * warm[i]], np.float32)
        frames.append(np.clip(world[:, offset : offset + width] * gain[i] * tint * 255, 0, 255).astype(np.uint8))
    return np.stack(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="runs of ours (median reported); the reference runs once")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    embedder = OpenCLIPEmbedder(args.model, pretrained=None, device=args.device, batch_size=args.batch_size).load()
    frames = synthetic_shot(args.frames, args.height, args.width, args.seed)
    # An earlier shot in a cold blue palette, remembered as three keyframes.
    earlier = synthetic_shot(12, args.height, args.width, args.seed + 1)[[3, 5, 7]].astype(np.float32)
    memory = list((earlier * np.array([0.35, 0.6, 1.0], np.float32)).astype(np.uint8))
    embedder.embed(frames[:2])  # warm-up (kernel selection, allocator)

    def sync():
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()

    ours_times, ours = [], None
    for _ in range(args.repeat):
        scorer = ContrastScorer()
        selector = KeyframeSelector(embedder=embedder, scorer=scorer, batch_size=args.batch_size)
        sync()
        start = time.perf_counter()
        ours = selector.extract(frames, memory=memory)
        sync()
        ours_times.append(time.perf_counter() - start)
        ours_scorer = scorer
    ours_time = statistics.median(ours_times)

    ref_scorer = ContrastScorer()
    forwards_before = embedder.num_forwards
    sync()
    start = time.perf_counter()
    ref = release_keyframes(frames, embedder, ref_scorer, memory=memory)
    sync()
    ref_time = time.perf_counter() - start
    ref_forwards = embedder.num_forwards - forwards_before

    stats = ours.stats
    print(f"shot: {args.frames} frames {args.height}x{args.width}, embedder {args.model} (random weights) on "
          f"{args.device}, batch {args.batch_size}; {stats.passes} adaptive pass(es), final threshold "
          f"{stats.threshold:.2f}; 3 memory frames")  # fmt: skip
    print(f"{'':12}{'forwards':>10}{'images':>10}{'scorer calls':>14}{'wall s':>10}")
    print(f"{'reference':12}{ref_forwards:>10}{ref.embedded_images:>10}{ref_scorer.calls:>14}{ref_time:>10.2f}")
    print(f"{'ours':12}{stats.embed_forwards:>10}{stats.embedded_images:>10}{ours_scorer.calls:>14}{ours_time:>10.2f}")
    print(f"fewer embedder forwards: {ref_forwards / max(stats.embed_forwards, 1):.1f}x, "
          f"fewer embedded images: {ref.embedded_images / max(stats.embedded_images, 1):.1f}x, "
          f"fewer scorer calls: {ref_scorer.calls / max(ours_scorer.calls, 1):.1f}x, "
          f"speedup: {ref_time / ours_time:.1f}x")  # fmt: skip
    print(f"picks: reference {ref.indices} (before dedup {ref.candidates}), ours {ours.indices} "
          f"(before dedup {ours.candidates}) -> {'identical' if ref.indices == ours.indices else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
