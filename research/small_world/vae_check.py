"""What a small-world VAE keeps of a character: the identity detector's reading of VAE reconstructions of true
clips, per attribute, next to its reading of the clips themselves.

    python -m research.small_world.vae_check --vae storymem/builtin/weights/base/vae runs/toy/base_run/stages/vae \
        [--count 48] [--seed 1] [--device cuda]

Whatever a VAE loses (a pattern painted over, say), no transformer trained on its latents can draw: this is the
ceiling of the base model's identity accuracy. Prints one line per VAE (and one for the clips themselves).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from storymem.devices import default_device

from .detector import ATTRIBUTES, IdentityDetector
from .world import Character, ClipSpec


def _score(detector, videos, characters) -> dict:
    hits = {a: 0 for a in ATTRIBUTES}
    whole = 0
    for video, character in zip(videos, characters):
        detection = detector.identify(video)
        if detection is None:
            continue
        for a in ATTRIBUTES:
            hits[a] += getattr(detection.character, a) == getattr(character, a)
        whole += detection.character.key == character.key
    n = len(characters)
    return {"identity": whole / n, **{a: hits[a] / n for a in ATTRIBUTES}}


@torch.no_grad()
def reconstruct(vae, truth: np.ndarray, device) -> np.ndarray:
    video = torch.from_numpy(truth).to(device).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1)
    out = vae.decode(vae.encode(video).latent_dist.mode()).sample[0].float().clamp(-1, 1)
    return ((out.permute(1, 2, 3, 0) + 1) * 127.5).round().byte().cpu().numpy()


def main(argv=None):
    from diffusers import AutoencoderKLWan

    ap = argparse.ArgumentParser(prog="python -m research.small_world.vae_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", nargs="+", required=True, help="VAE folders (diffusers AutoencoderKLWan)")
    ap.add_argument("--count", type=int, default=48)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default=default_device().type)
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    characters = [Character.random(rng) for _ in range(args.count)]
    truths = [ClipSpec.random(rng, c).render(args.frames, args.size, args.size) for c in characters]
    detector = IdentityDetector()
    results = {"clips": _score(detector, truths, characters)}
    for folder in args.vae:
        vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch.float32).to(args.device).eval()
        results[folder] = _score(detector, [reconstruct(vae, t, args.device) for t in truths], characters)
    for name, r in results.items():
        print(f"{name}: identity {r['identity']:.3f}  " + "  ".join(f"{a} {r[a]:.3f}" for a in ATTRIBUTES),
              flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
