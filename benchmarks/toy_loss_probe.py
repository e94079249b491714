"""Does the model use what it has seen? Loss probes of a small-world base (and adapter), no sampling.

    python benchmarks/toy_loss_probe.py --base storymem/toy/weights/base [--adapter ADAPTER] \
        [--probes cut,memory] [--count 64] [--device cpu] [--out probe]

Each probe measures the flow-matching loss on the latent cells that show the character (the world knows which
pixels are characters'), for the same clips, noise and timesteps under conditions that differ in one thing:

* ``cut`` - clips that cut once to the same character elsewhere (:func:`storymem.toy.train_base.cut_clip`),
  captioned "the same character ... then the same character ...", with the true first frame (I2V); loss on the
  frames after the cut. ``seen``: the true frames before the cut; ``other``: another character's frames before
  it (and first frame), the frames after unchanged; ``named``: the true frames, and the caption names the
  character before the cut. ``other`` above ``seen`` means the model finds the character before the cut and
  draws it after: the skill reading memory needs.
* ``memory`` - single shots captioned "the same character ...", M2V; loss on every frame. ``memory``: frames
  0, 8 and 16 of another clip of the character as memory; ``other-memory``: the same of another character;
  ``none``: no memory; ``named``: no memory, the caption names the character. ``other-memory`` above
  ``memory`` means memory is read.

A gap is a relative loss difference (``other / seen - 1``): 0 when the frames are ignored. Far cheaper and
finer-grained than generating and detecting (``toy_base_check.py --modes i2v-cut``, ``toy_memory_check.py``),
so it can follow a training run; those checks say what the gaps are worth in drawn identities.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storymem.toy.world import Character, ClipSpec  # noqa: E402

PROBES = {"cut": ("seen", "other", "named"), "memory": ("memory", "other-memory", "none", "named")}
GAPS = {"cut": (("other", "seen"), ("named", "seen")),
        "memory": (("other-memory", "memory"), ("none", "memory"), ("named", "memory"))}
TIMESTEPS = (100, 300, 500, 700, 900)
MEMORY_FRAMES = (0, 8, 16)


def _two_characters(rng: np.random.Generator) -> tuple[Character, Character]:
    character, other = Character.random(rng), Character.random(rng)
    while other.key == character.key:
        other = Character.random(rng)
    return character, other


def make_cut_cases(count: int, seed: int, frames: int, size: int) -> list[dict]:
    """Per case: the cut clip and its captions, and the same clip with another character before the cut."""
    from storymem.toy.train_base import cut_clip

    rng = np.random.default_rng([seed, 2])
    cases = []
    for _ in range(count):
        character, other = _two_characters(rng)
        first = ClipSpec.random(rng, character)
        video, caption, cut = cut_clip(rng, first, "same", frames, size, size)
        after = caption[len(first.caption("same")):]  # " then the same character ..."
        swapped = np.concatenate([ClipSpec.random(rng, other).render(frames, size, size)[:cut], video[cut:]])
        cases.append({"video": video, "swapped": swapped, "cut": cut, "caption": caption,
                      "named_caption": first.caption("first") + after})
    return cases


def make_memory_cases(count: int, seed: int, frames: int, size: int) -> list[dict]:
    """Per case: a target clip, memory frames of the same character elsewhere and of another character."""
    rng = np.random.default_rng([seed, 3])
    picks = [min(i, frames - 1) for i in MEMORY_FRAMES]
    cases = []
    for _ in range(count):
        character, other = _two_characters(rng)
        target = ClipSpec.random(rng, character)
        cases.append({"video": target.render(frames, size, size), "caption": target.caption("same"),
                      "named_caption": target.caption("first"),
                      "memory": ClipSpec.random(rng, character).render(frames, size, size)[picks],
                      "other_memory": ClipSpec.random(rng, other).render(frames, size, size)[picks]})
    return cases


def _video(frames_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> float [B, 3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames_uint8)).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1)


class Prober:
    """The base's pieces, and one loss evaluation: fixed noise per case, every timestep of :data:`TIMESTEPS`."""

    def __init__(self, pipe, device: str, seed: int):
        self.pipe, self.device, self.seed = pipe, device, seed
        self.temporal = pipe.vae_scale_factor_temporal
        self.spatial = pipe.vae_scale_factor_spatial

    @torch.no_grad()
    def latents(self, video: torch.Tensor) -> torch.Tensor:
        from storymem.conditioning import normalize_latents

        vae = self.pipe.vae
        return normalize_latents(vae, vae.encode(video.to(self.device)).latent_dist.mode().float())

    @torch.no_grad()
    def first_frame_condition(self, video: torch.Tensor) -> torch.Tensor:
        from storymem.conditioning import encode_video_condition

        b, _, t, h, w = video.shape
        return encode_video_condition(self.pipe.vae, video[:, :, :1].to(self.device), t, h, w, batch_size=b,
                                      device=self.device)

    @torch.no_grad()
    def empty_condition(self, batch: int, frames: int, size: int) -> torch.Tensor:
        from storymem.conditioning import encode_video_condition

        return encode_video_condition(self.pipe.vae, None, frames, size, size, batch_size=1,
                                      device=self.device).expand(batch, -1, -1, -1, -1)

    @torch.no_grad()
    def prompt_embeds(self, captions: list[str]) -> torch.Tensor:
        from storymem.toy.train_base import MAX_SEQUENCE_LENGTH, _prompt_embeddings, tokenize

        ids, mask = tokenize(self.pipe.tokenizer, captions)
        embeds = _prompt_embeddings(self.pipe.text_encoder, ids.to(self.device), mask.to(self.device)).float()
        return F.pad(embeds, (0, 0, 0, MAX_SEQUENCE_LENGTH - embeds.shape[1]))

    @torch.no_grad()
    def cell_losses(self, latents, condition, context_frames, prompt_embeds, weights, memory=None) -> torch.Tensor:
        """Loss per case and timestep, ``[B, len(TIMESTEPS)]``: squared error averaged over the cells where
        ``weights`` ``[B, 1, f, h, w]`` is 1."""
        from storymem.training.loss import flow_matching_loss

        b = latents.shape[0]
        memory = memory if memory is not None else latents.new_zeros(b, latents.shape[1], 0, *latents.shape[3:])
        batch = {"latents": latents, "memory_latents": memory, "video_condition": condition,
                 "num_frames": (latents.shape[2] - 1) * self.temporal + 1, "num_context_frames": context_frames,
                 "prompt_embeds": prompt_embeds}
        model = self.pipe.transformer
        out = []
        for i, t in enumerate(TIMESTEPS):
            # The same noise for every condition: a probe's conditions differ only in what they show.
            generator = torch.Generator().manual_seed(self.seed * 1000 + i)
            _, info = flow_matching_loss(model, batch, expert="all", rope_mode=self.pipe.memory_rope,
                                         rope_stride=self.pipe.memory_rope_stride, weight_dtype=torch.float32,
                                         generator=generator, timesteps=torch.full((b,), t), return_errors=True)
            errors = info["errors"].mean(dim=1, keepdim=True)
            out.append((errors * weights).sum(dim=(1, 2, 3, 4)) / weights.sum(dim=(1, 2, 3, 4)).clamp_min(1))
        return torch.stack(out, dim=1).cpu()


def probe_cut(prober: Prober, cases: list[dict]) -> dict:
    from storymem.toy.train_base import latent_character_mask

    video, swapped = _video(np.stack([c["video"] for c in cases])), _video(np.stack([c["swapped"] for c in cases]))
    true_latents, swapped_latents = prober.latents(video), prober.latents(swapped)
    weights = latent_character_mask(video, prober.temporal, prober.spatial).to(prober.device)
    frames = torch.arange(true_latents.shape[2], device=prober.device)
    first_after = torch.tensor([(c["cut"] - 1) // prober.temporal + 1 for c in cases], device=prober.device)
    after = (frames[None] >= first_after[:, None]).float()[:, None, :, None, None]
    # Another character before the cut, the very same latents after it (a causal VAE would carry the frames
    # before the cut into the latents after it).
    other_latents = torch.where(after.bool(), true_latents, swapped_latents)
    same, named = prober.prompt_embeds([c["caption"] for c in cases]), prober.prompt_embeds(
        [c["named_caption"] for c in cases])
    true_condition, other_condition = prober.first_frame_condition(video), prober.first_frame_condition(swapped)
    weights = weights * after
    return {"seen": prober.cell_losses(true_latents, true_condition, 1, same, weights),
            "other": prober.cell_losses(other_latents, other_condition, 1, same, weights),
            "named": prober.cell_losses(true_latents, true_condition, 1, named, weights)}


def probe_memory(prober: Prober, cases: list[dict]) -> dict:
    from storymem.conditioning import encode_memory_frames
    from storymem.toy.train_base import latent_character_mask

    video = _video(np.stack([c["video"] for c in cases]))
    latents = prober.latents(video)
    weights = latent_character_mask(video, prober.temporal, prober.spatial).to(prober.device)

    def memory(key):
        return torch.cat([encode_memory_frames(prober.pipe.vae, _video(c[key][None])[0].permute(1, 0, 2, 3)
                                               .to(prober.device)) for c in cases]).float()

    condition = prober.empty_condition(len(cases), video.shape[2], video.shape[-1])
    same, named = prober.prompt_embeds([c["caption"] for c in cases]), prober.prompt_embeds(
        [c["named_caption"] for c in cases])
    return {"memory": prober.cell_losses(latents, condition, 0, same, weights, memory("memory")),
            "other-memory": prober.cell_losses(latents, condition, 0, same, weights, memory("other_memory")),
            "none": prober.cell_losses(latents, condition, 0, same, weights),
            "named": prober.cell_losses(latents, condition, 0, named, weights)}


def summarize(probe: str, losses: dict) -> dict:
    """Mean loss per condition (overall and per timestep) and the probe's gaps, overall and per timestep."""
    mean = {k: v.mean(dim=0) for k, v in losses.items()}
    result = {"loss": {k: round(float(v.mean()), 5) for k, v in mean.items()},
              "loss_per_timestep": {k: {str(t): round(float(x), 5) for t, x in zip(TIMESTEPS, v)}
                                    for k, v in mean.items()},
              "gap": {}, "gap_per_timestep": {}}
    for a, b in GAPS[probe]:
        name = f"{a}/{b}"
        result["gap"][name] = round(float(mean[a].mean() / mean[b].mean() - 1), 4)
        result["gap_per_timestep"][name] = {str(t): round(float(x / y - 1), 4)
                                            for t, x, y in zip(TIMESTEPS, mean[a], mean[b])}
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", help="storymem adapter to load (the memory probe is then the adapter's)")
    ap.add_argument("--probes", default="cut,memory", help=f"comma-separated: {', '.join(PROBES)}")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, help="folder for loss_probe.json")
    args = ap.parse_args(argv)
    probes = [p.strip() for p in args.probes.split(",") if p.strip()]
    if not probes or any(p not in PROBES for p in probes):
        ap.error(f"--probes: choose from {', '.join(PROBES)}, got {args.probes!r}")
    if args.count < 1 or args.batch_size < 1:
        ap.error("--count and --batch-size must be >= 1")

    from storymem import StoryMemPipeline

    pipe = StoryMemPipeline.from_pretrained(args.base, torch_dtype=torch.float32).to(args.device)
    if args.adapter:
        pipe.load_storymem_lora(args.adapter)
    prober = Prober(pipe, args.device, args.seed)
    makers = {"cut": (make_cut_cases, probe_cut), "memory": (make_memory_cases, probe_memory)}
    results = {}
    for probe in probes:
        make, run = makers[probe]
        cases = make(args.count, args.seed, args.frames, args.size)
        parts = [run(prober, cases[i:i + args.batch_size]) for i in range(0, len(cases), args.batch_size)]
        losses = {k: torch.cat([p[k] for p in parts]) for k in PROBES[probe]}
        results[probe] = summarize(probe, losses)
        r = results[probe]
        print(f"{probe}: loss " + "  ".join(f"{k} {v:.4f}" for k, v in r["loss"].items())
              + " | gap " + "  ".join(f"{k} {v:+.3f}" for k, v in r["gap"].items()), flush=True)
        for name, per_t in r["gap_per_timestep"].items():
            print(f"  {name} by timestep: " + "  ".join(f"{t} {v:+.3f}" for t, v in per_t.items()), flush=True)
    if args.out:
        from storymem.atomic import atomic_write_json

        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / "loss_probe.json", {"args": {k: str(v) for k, v in vars(args).items()},
                                                         "results": results})
    return results


if __name__ == "__main__":
    main()
