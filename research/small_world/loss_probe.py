"""Does the model use what it has seen? Loss probes of a small-world base (and adapter), no sampling.

    python -m research.small_world.loss_probe --base storymem/builtin/weights/base [--adapter ADAPTER] \
        [--probes cut,memory] [--count 64] [--device cpu] [--out probe]

Each probe measures the flow-matching loss on the latent cells that show the character (the world knows which
pixels are characters'), for the same clips, noise and timesteps under conditions that differ in one thing:

* ``cut`` - clips that cut once to the same character elsewhere (:func:`research.small_world.base_clips.cut_clip`),
  captioned "the same character ... then the same character ...", with the true first frame (I2V); loss on the
  frames after the cut. ``seen``: the true frames before the cut; ``other``: the same frames with another
  character in them (same scene and motion; its first frame given), the frames after unchanged;
  ``other-shape`` (``-colour``, ``-pattern``, ``-accessory``): with only that attribute changed; ``named``: the
  true frames, and the caption names the character before the cut. ``other`` above ``seen`` means the model
  finds the character before the cut and draws it after, the skill reading memory needs; ``other-shape`` above
  it, that it takes the shape as well.
* ``memory`` - single shots captioned "the same character ...", M2V; loss on every frame. ``memory``: frames
  0, 8 and 16 of another clip of the character as memory; ``other-memory``, ``other-shape-memory``, ...: the
  same memory clip with another character, or one attribute changed; ``none``: no memory; ``named``: no
  memory, the caption names the character. ``other-memory`` above ``memory`` means memory is read.

A gap is a relative loss difference (``other / seen - 1``): 0 when the frames are ignored. Far cheaper and
finer-grained than generating and detecting (``base_check.py --modes i2v-cut``, ``memory_check.py``),
so it can follow a training run; those checks say what the gaps are worth in drawn identities.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from storymem.devices import default_device

from .base_clips import to_video
from .world import ACCESSORIES, COLOURS, PATTERNS, SHAPES, Character, ClipSpec

_CHOICES = {"shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS, "accessory": ACCESSORIES}

SWAPS = ("shape", "colour", "pattern", "accessory")  # one attribute changed, the rest of the clip as it was
PROBES = {"cut": ("seen", "other", *(f"other-{a}" for a in SWAPS), "named"),
          "memory": ("memory", "other-memory", *(f"other-{a}-memory" for a in SWAPS), "none", "named")}
GAPS = {"cut": tuple((c, "seen") for c in PROBES["cut"][1:]),
        "memory": tuple((c, "memory") for c in PROBES["memory"][1:])}
TIMESTEPS = (100, 300, 500, 700, 900)
MEMORY_FRAMES = (0, 8, 16)


def _two_characters(rng: np.random.Generator) -> tuple[Character, Character]:
    character, other = Character.random(rng), Character.random(rng)
    while other.key == character.key:
        other = Character.random(rng)
    return character, other


def _stand_ins(rng: np.random.Generator, character: Character, other: Character) -> dict[str, Character]:
    """Who stands in for ``character`` in each counterfactual: ``other``, and ``character`` with one attribute
    changed."""
    stand_ins = {"other": other}
    for attribute in SWAPS:
        current = getattr(character, attribute)
        choices = [c for c in _CHOICES[attribute] if c != current]
        changed = choices[int(rng.integers(len(choices)))]
        stand_ins[f"other-{attribute}"] = dataclasses.replace(character, **{attribute: changed})
    return stand_ins


def _recast(spec: ClipSpec, character: Character) -> ClipSpec:
    """The same clip (scene, motion, seed) with another character in it."""
    return dataclasses.replace(spec, characters=(character,))


def make_cut_cases(count: int, seed: int, frames: int, size: int) -> list[dict]:
    """Per case: the cut clip and its captions, and the clip with a stand-in (:func:`_stand_ins`) before the cut,
    in the same scene and motion."""
    from .base_clips import cut_clip

    rng = np.random.default_rng([seed, 2])
    cases = []
    for _ in range(count):
        character, other = _two_characters(rng)
        first = ClipSpec.random(rng, character)
        video, caption, cut = cut_clip(rng, first, "same", frames, size, size)
        after = caption[len(first.caption("same")):]  # " then the same character ..."
        stand_ins = _stand_ins(rng, character, other)
        swapped = {name: np.concatenate([_recast(first, who).render(frames, size, size)[:cut], video[cut:]])
                   for name, who in stand_ins.items()}
        cases.append({"character": character, "stand_ins": stand_ins, "video": video, "swapped": swapped,
                      "cut": cut, "caption": caption, "named_caption": first.caption("first") + after})
    return cases


def make_memory_cases(count: int, seed: int, frames: int, size: int) -> list[dict]:
    """Per case: a target clip, memory frames of the same character elsewhere, and the same memory frames with
    stand-ins (:func:`_stand_ins`)."""
    rng = np.random.default_rng([seed, 3])
    picks = [min(i, frames - 1) for i in MEMORY_FRAMES]
    cases = []
    for _ in range(count):
        character, other = _two_characters(rng)
        target, remembered = ClipSpec.random(rng, character), ClipSpec.random(rng, character)
        stand_ins = _stand_ins(rng, character, other)
        memory = {"memory": remembered.render(frames, size, size)[picks]}
        for name, who in stand_ins.items():
            memory[f"{name}-memory"] = _recast(remembered, who).render(frames, size, size)[picks]
        cases.append({"character": character, "stand_ins": stand_ins, "video": target.render(frames, size, size),
                      "caption": target.caption("same"), "named_caption": target.caption("first"),
                      "memory": memory})
    return cases


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
        from .base_steps import MAX_SEQUENCE_LENGTH, prompt_embeddings, tokenize

        ids, mask = tokenize(self.pipe.tokenizer, captions)
        embeds = prompt_embeddings(self.pipe.text_encoder, ids.to(self.device), mask.to(self.device)).float()
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
    from .base_clips import latent_character_mask

    video = to_video(np.stack([c["video"] for c in cases]))
    true_latents = prober.latents(video)
    weights = latent_character_mask(video, prober.temporal, prober.spatial).to(prober.device)
    frames = torch.arange(true_latents.shape[2], device=prober.device)
    first_after = torch.tensor([(c["cut"] - 1) // prober.temporal + 1 for c in cases], device=prober.device)
    after = (frames[None] >= first_after[:, None])[:, None, :, None, None]
    weights = weights * after.float()
    same, named = prober.prompt_embeds([c["caption"] for c in cases]), prober.prompt_embeds(
        [c["named_caption"] for c in cases])
    true_condition = prober.first_frame_condition(video)
    losses = {"seen": prober.cell_losses(true_latents, true_condition, 1, same, weights)}
    for name in cases[0]["swapped"]:
        swapped = to_video(np.stack([c["swapped"][name] for c in cases]))
        # The stand-in before the cut, the very same latents after it (a causal VAE would carry the frames
        # before the cut into the latents after it).
        latents = torch.where(after, true_latents, prober.latents(swapped))
        losses[name] = prober.cell_losses(latents, prober.first_frame_condition(swapped), 1, same, weights)
    losses["named"] = prober.cell_losses(true_latents, true_condition, 1, named, weights)
    return losses


def probe_memory(prober: Prober, cases: list[dict]) -> dict:
    from storymem.conditioning import encode_memory_frames
    from .base_clips import latent_character_mask

    video = to_video(np.stack([c["video"] for c in cases]))
    latents = prober.latents(video)
    weights = latent_character_mask(video, prober.temporal, prober.spatial).to(prober.device)

    def memory(key):
        return torch.cat([encode_memory_frames(prober.pipe.vae, to_video(c["memory"][key][None])[0]
                                               .permute(1, 0, 2, 3).to(prober.device)) for c in cases]).float()

    condition = prober.empty_condition(len(cases), video.shape[2], video.shape[-1])
    same, named = prober.prompt_embeds([c["caption"] for c in cases]), prober.prompt_embeds(
        [c["named_caption"] for c in cases])
    losses = {key: prober.cell_losses(latents, condition, 0, same, weights, memory(key)) for key in cases[0]["memory"]}
    losses["none"] = prober.cell_losses(latents, condition, 0, same, weights)
    losses["named"] = prober.cell_losses(latents, condition, 0, named, weights)
    return losses


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
    ap = argparse.ArgumentParser(prog="python -m research.small_world.loss_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", help="storymem adapter to load (the memory probe is then the adapter's)")
    ap.add_argument("--probes", default="cut,memory", help=f"comma-separated: {', '.join(PROBES)}")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=default_device().type)
    ap.add_argument("--out", type=Path, help="folder for loss_probe.json")
    args = ap.parse_args(argv)
    probes = [p.strip() for p in args.probes.split(",") if p.strip()]
    if not probes or any(p not in PROBES for p in probes):
        ap.error(f"--probes: choose from {', '.join(PROBES)}, got {args.probes!r}")
    if args.count < 1 or args.batch_size < 1:
        ap.error("--count and --batch-size must be >= 1")

    from storymem import StoryMemPipeline
    from storymem.devices import dtype_kwargs

    pipe = StoryMemPipeline.from_pretrained(args.base, **dtype_kwargs(torch.float32)).to(args.device)
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
        print(f"{probe}: loss " + "  ".join(f"{k} {v:.4f}" for k, v in r["loss"].items()), flush=True)
        print("  gap " + "  ".join(f"{k} {v:+.3f}" for k, v in r["gap"].items()), flush=True)
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
