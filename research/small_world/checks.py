"""What the single-shot checks of the small world share (``research/small_world/base_check.py``,
``research/small_world/memory_check.py``): one sampled shot as uint8 frames, and a tally of what the detector read in
each shot against the character meant."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from .detection import ATTRIBUTES, Detection
from .world import Character

__all__ = ["DetectionTally", "sample_shot"]


def sample_shot(pipe, prompt: str, size: int, num_frames: int, steps: int, guidance: float, seed: int,
                **kwargs) -> tuple[np.ndarray, float]:
    """One square shot from ``pipe`` (negative prompt empty, CPU generator seeded ``seed``): uint8
    ``[F, size, size, 3]`` and the seconds the call took. ``kwargs`` go to the pipeline (memory, first frame)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    start = time.perf_counter()
    frames = pipe(prompt=prompt, negative_prompt="", height=size, width=size, num_frames=num_frames,
                  num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np",
                  **kwargs).frames[0]
    seconds = time.perf_counter() - start
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8), seconds


class DetectionTally:
    """Shares over shots: whole identity right, each attribute right, detected at all, and (where memory showed
    a character) drawn as the remembered character; a shot without a detection counts as wrong."""

    def __init__(self):
        self.shots = self.found = self.whole = self.remembered = 0
        self.with_memory = False
        self.hits = {a: 0 for a in ATTRIBUTES}
        self.seconds = 0.0

    def add(self, detection: Optional[Detection], character: Character, seconds: float = 0.0,
            remembered: Optional[Character] = None):
        self.shots += 1
        self.seconds += seconds
        self.with_memory |= remembered is not None
        if detection is None:
            return
        self.found += 1
        self.whole += detection.character.key == character.key
        for a in ATTRIBUTES:
            self.hits[a] += getattr(detection.character, a) == getattr(character, a)
        if remembered is not None:
            self.remembered += detection.character.key == remembered.key

    def results(self) -> dict:
        n = max(self.shots, 1)
        return {"identity": self.whole / n, **{a: self.hits[a] / n for a in ATTRIBUTES},
                "memory": self.remembered / n if self.with_memory else None, "detected": self.found / n,
                "seconds_per_shot": self.seconds / n}

    def line(self) -> str:
        """``identity 0.500  shape 0.719  ...`` (then the share drawn as the remembered character, if any)."""
        r = self.results()
        text = f"identity {r['identity']:.3f}  " + "  ".join(f"{a} {r[a]:.3f}" for a in ATTRIBUTES)
        if r["memory"] is not None:
            text += f"  drawn as the remembered character {r['memory']:.3f}"
        return text
