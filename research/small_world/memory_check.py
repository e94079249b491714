"""What a small-world adapter takes from memory, one mechanism at a time: single shots of random characters,
judged by the toy world's identity detector.

    python -m research.small_world.memory_check --base storymem/builtin/weights/base \
        --adapter storymem/builtin/weights/adapter \
        [--count 32] [--steps 8] [--memory-guidance 1] [--conditions ...] [--device cpu] [--out check]

Each character gets a target clip (scene, motion) and a memory clip of the same character in another scene;
memory is frames 0, 8 and 16 of the memory clip (what keyframe selection keeps of a shot). Conditions:

* ``named`` - the prompt names the character, no memory: what the model draws from text alone;
* ``same`` - "the same character ...", no memory: nothing says who, so this is chance;
* ``same+memory`` - "the same character ..." with memory: a story's memory-only shot; the character can
  only come from memory, so identity here is copying from memory;
* ``same+scene-memory`` - as ``same+memory``, but the memory clip is in the target's own scene (background
  and props), the character elsewhere in the frame: shots of one scene, easier to copy from;
* ``same+first-frame`` - "the same character ..." with the target's true first frame (MI2V, no memory): a
  continued shot;
* ``named+other-memory`` - the prompt names the character, memory shows another one: a new character's
  introduction; ``memory`` is the share drawn as the remembered character instead (drift).

Prints identity (the intended character), per-attribute accuracy and, where memory is given, the share drawn
as the remembered character; ``--out`` writes ``memory_check.json`` and a contact sheet (per condition, for the
first characters: memory frame, then the shot's frames 0, 8, 16).
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
from .world import Character, ClipSpec

CONDITIONS = ("named", "same", "same+memory", "same+scene-memory", "same+first-frame", "named+other-memory")
MEMORY_FRAMES = (0, 8, 16)


def make_cases(count: int, seed: int, frames: int, size: int) -> list[dict]:
    """Target, memory clip and a different character's memory clip for ``count`` random characters."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        character = Character.random(rng)
        other = Character.random(rng)
        while other.key == character.key:
            other = Character.random(rng)
        target = ClipSpec.random(rng, character)
        cases.append({"character": character, "other": other, "target": target,
                      "truth": target.render(frames, size, size),
                      "memory": ClipSpec.random(rng, character).render(frames, size, size),
                      "other_memory": ClipSpec.random(rng, other).render(frames, size, size)})
    # Drawn from a stream of their own, so the cases above stay what they were before this condition existed.
    scene_rng = np.random.default_rng([seed, 1])
    for case in cases:
        spec = ClipSpec.random(scene_rng, case["character"], scene=case["target"].scene)
        case["scene_memory"] = spec.render(frames, size, size)
    return cases


def shot_inputs(condition: str, case: dict, frames: int) -> tuple[str, dict, Character | None]:
    """Prompt, pipeline inputs and the remembered character (None without memory) of one condition."""
    from PIL import Image

    picks = [min(i, frames - 1) for i in MEMORY_FRAMES]
    target = case["target"]
    if condition == "named":
        return target.caption("first"), {}, None
    if condition == "same":
        return target.caption("same"), {}, None
    if condition == "same+memory":
        return target.caption("same"), {"memory_images": [Image.fromarray(case["memory"][i]) for i in picks]}, \
            case["character"]
    if condition == "same+scene-memory":
        return target.caption("same"), \
            {"memory_images": [Image.fromarray(case["scene_memory"][i]) for i in picks]}, case["character"]
    if condition == "same+first-frame":
        return target.caption("same"), {"first_frame": Image.fromarray(case["truth"][0])}, None
    if condition == "named+other-memory":
        return target.caption("first"), {"memory_images": [Image.fromarray(case["other_memory"][i]) for i in picks]}, \
            case["other"]
    raise ValueError(f"unknown condition {condition!r}; expected one of {', '.join(CONDITIONS)}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m research.small_world.memory_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", help="M2V adapter to load (without: the base alone, memory included)")
    ap.add_argument("--conditions", default=",".join(CONDITIONS), help="comma-separated subset of the conditions")
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--memory-guidance", type=float, default=1.0,
                    help="the pipeline's memory_guidance_scale for shots with memory (1 = off)")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=default_device().type)
    ap.add_argument("--out", type=Path, help="folder for memory_check.json and the contact sheet")
    args = ap.parse_args(argv)
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown or not conditions:
        ap.error(f"--conditions: unknown {unknown} (choose from {', '.join(CONDITIONS)})")
    if args.count < 1 or args.steps < 1 or args.frames < 1:
        ap.error("--count, --steps and --frames must be >= 1")

    from storymem import StoryMemPipeline
    from storymem.devices import dtype_kwargs

    pipe = StoryMemPipeline.from_pretrained(args.base, **dtype_kwargs(torch.float32)).to(args.device)
    if args.adapter:
        pipe.load_storymem_lora(args.adapter)
    pipe.set_progress_bar_config(disable=True)
    detector = IdentityDetector()
    cases = make_cases(args.count, args.seed, args.frames, args.size)
    results, sheets = {}, []
    for condition in conditions:
        tally = DetectionTally()
        rows = []
        for i, case in enumerate(cases):
            prompt, kwargs, memory_character = shot_inputs(condition, case, args.frames)
            if "memory_images" in kwargs:
                kwargs["memory_guidance_scale"] = args.memory_guidance
            video, seconds = sample_shot(pipe, prompt, args.size, args.frames, args.steps, args.guidance,
                                         args.seed + i, **kwargs)
            tally.add(detector.identify(video), case["character"], seconds, remembered=memory_character)
            if i < 6:
                first = kwargs.get("memory_images", [kwargs.get("first_frame")])[0]
                first = np.zeros_like(video[0]) if first is None else np.asarray(first)
                picks = [min(j, len(video) - 1) for j in MEMORY_FRAMES]
                rows.append(np.concatenate([first, *video[picks]], axis=1))
        results[condition] = tally.results()
        sheets.append(np.concatenate(rows, axis=0))
        print(f"{condition:20s} {tally.line()}  {results[condition]['seconds_per_shot']:.2f} s/shot", flush=True)
    if args.out:
        from PIL import Image

        args.out.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        (args.out / "memory_check.json").write_text(json.dumps({"settings": settings, "results": results}, indent=1))
        sheet = np.concatenate(sheets, axis=1)
        Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST).save(
            args.out / "memory_check.png")
    return results


if __name__ == "__main__":
    main()
