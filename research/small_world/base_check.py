"""How well a small-world base model draws the character its prompt names: single shots of held-out
characters, text-to-video and image-to-video, judged by the toy world's identity detector.

    python -m research.small_world.base_check --base runs/toy/base_run/base [--stories runs/toy/stories] \
        [--count 32] [--steps 20] [--device cuda] [--out check]

Prints per-attribute accuracy and the share of shots whose whole identity is right, for T2V (prompt only) and
I2V (prompt + the true first frame), and writes a contact sheet of the first shots (``--out``).

``--modes t2v,i2v,i2v-cut`` adds shots that cut once to the same character elsewhere
(:func:`research.small_world.base_clips.cut_clip`): the true first frame is given and the prompt says only "the same
character ... then the same character ...", so the character after the cut can only come from the frames before
it. They are judged after the cut: the base's skill of finding a character in one place and drawing it in
another, which an M2V adapter needs to read memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from storymem.devices import default_device

from .checks import DetectionTally, sample_shot
from .detector import IdentityDetector
from .base_clips import cut_clip
from .world import Character, ClipSpec


MODES = ("t2v", "i2v", "i2v-cut")


def held_out_characters(stories: Path | None, count: int, seed: int) -> list[Character]:
    rng = np.random.default_rng(seed)
    if stories is not None:
        from .train_base import story_identities

        keys = story_identities(stories)
        return [Character.from_key(keys[i % len(keys)]) for i in range(count)]
    return [Character.random(rng) for _ in range(count)]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m research.small_world.base_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--lora", help="also load this adapter (memory-free shots)")
    ap.add_argument("--stories", type=Path, help="toy story set whose characters to draw (default: random ones)")
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=default_device().type)
    ap.add_argument("--modes", default="t2v,i2v", help="comma-separated: t2v, i2v, i2v-cut")
    ap.add_argument("--out", type=Path, help="folder for results.json and the contact sheet")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes: choose from {', '.join(MODES)}, got {args.modes!r}")

    from storymem import StoryMemPipeline
    from storymem.devices import dtype_kwargs

    pipe = StoryMemPipeline.from_pretrained(args.base, **dtype_kwargs(torch.float32)).to(args.device)
    if args.lora:
        pipe.load_storymem_lora(args.lora)
    pipe.set_progress_bar_config(disable=True)
    detector = IdentityDetector()
    rng = np.random.default_rng(args.seed)
    characters = held_out_characters(args.stories, args.count, args.seed)
    results = {}
    sheets = {}
    for mode in modes:
        tally = DetectionTally()
        rows = []
        for i, character in enumerate(characters):
            spec = ClipSpec.random(rng, character)
            if mode == "i2v-cut":
                truth, prompt, cut = cut_clip(rng, spec, "same", args.frames, args.size, args.size)
            else:
                truth, prompt, cut = spec.render(args.frames, args.size, args.size), spec.caption("first"), 0
            kwargs = {}
            if mode in ("i2v", "i2v-cut"):
                from PIL import Image

                kwargs["first_frame"] = Image.fromarray(truth[0])
            if mode == "i2v-cut":  # keep frame 0 in the output, so frame indices are the truth's and the cut's
                kwargs["drop_context_frames"] = False
            video, seconds = sample_shot(pipe, prompt, args.size, args.frames, args.steps, args.guidance,
                                         args.seed + i, **kwargs)
            tally.add(detector.identify(video[cut:]), character, seconds)
            if i < 8:
                rows.append(np.concatenate([truth[[0, args.frames // 2, -1]].reshape(-1, args.size, 3),
                                            video[[0, args.frames // 2, -1]].reshape(-1, args.size, 3)], axis=1))
        results[mode] = {k: v for k, v in tally.results().items() if k != "memory"}
        sheets[mode] = np.concatenate(rows, axis=1)
        print(f"{mode}: {tally.line()}  detected {results[mode]['detected']:.3f}  "
              f"{results[mode]['seconds_per_shot']:.2f} s/shot", flush=True)
    if args.out:
        from PIL import Image

        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "base_check.json").write_text(json.dumps(results, indent=1))
        # Per mode: columns are characters; in each, truth (left) and model (right) at frames 0, mid, last.
        sheet = np.concatenate([sheets[m] for m in modes], axis=0)
        Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST).save(
            args.out / "base_check.png")
    return results


if __name__ == "__main__":
    main()
