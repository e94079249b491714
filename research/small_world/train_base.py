"""Training the small world's base video model from scratch: VAE, text encoder and one Wan transformer.

The base is what Wan2.2-I2V is to the real StoryMem: a text-and-image-to-video model that knows nothing of
memory. It is built from the same diffusers/transformers classes (``AutoencoderKLWan`` with 4x spatial and 4x
temporal compression, a small ``UMT5EncoderModel`` over the toy world's word tokenizer, one
``WanTransformer3DModel`` expert) and trained on procedurally rendered shape clips:

1. **VAE** on short windows of the clips (reconstruction, with the saturated character pixels weighted up,
   plus a small KL term); the latents' per-channel mean and std then go into the VAE config, where Wan
   pipelines read them.
2. **Transformer and text encoder** on the clips' normalised latents with the rectified-flow velocity loss of
   :func:`storymem.training.loss.flow_matching_loss` (the memory-free layout): half the batches are
   text-to-video (the all-zeros M2V condition), half image-to-video (first frame given); captions are
   dropped to the empty prompt for classifier-free guidance; an EMA of the weights is what gets saved.

The result is a diffusers folder ``StoryMemPipeline.from_pretrained`` loads (``infer_story.py --base DIR``,
``train_lora.py ... --base DIR``), stored in float16 to keep it small::

    python -m research.small_world.train_base --out runs/vae --vae-only --vae-window 5 --vae-minutes 5
    python -m research.small_world.train_base --out runs/base --vae-init runs/vae/stages/vae --vae-window 17 \
        --vae-minutes 2.5 --minutes 4

``--init BASE`` continues from a saved base on fresh clips (``--seed``): the text encoder and transformer train
on, the VAE is kept, or fine-tuned first with ``--retrain-vae`` (the transformer then trains on its new latents);
``--vae-decoder-only`` tunes only the decoder, so the latent space, and every transformer trained on it, stay
valid. Runs stay short (a GPU lease, a preemptible job) and chain::

    python -m research.small_world.train_base --out runs/more --init runs/base/base --seed 3 --minutes 7.5

``--cut-prob P`` makes a share P of the clips cut once, between two latent frames, to the same character in
another clip (scene, place, motion), captioned "... then the same character ...". Single shots only ever ask the
model to redraw a character where the first frame has it; after a cut it has to find the character in earlier
frames and draw it somewhere else, which is what reading memory needs (an adapter cannot route memory into a
skill the base does not have).

The VAE learns frames in two phases: short windows (the first frame and one causal chunk) are cheap and teach
the spatial code; whole clips then teach the steady state of the causal temporal cache, which short windows
never reach (a VAE trained on 5-frame windows alone reconstructs frames 0-4 at 25-27 dB and frames 9-16 at
7-10 dB). Stages resume: a finished VAE in ``OUT/stages/vae`` is reused unless ``--retrain-vae``.

Continuations run data-parallel over several GPUs under torchrun (the text encoder and transformer; the VAE
trains in one process)::

    torchrun --nproc-per-node 4 -m research.small_world.train_base --out runs/more --init runs/base/base --seed 3 \
        --minutes 7.5 --batch-size 256

Each process renders ``--num-clips`` clips of its own (rank 0 from ``--seed``, rank r from ``seed * 1000 + r``)
and draws ``--batch-size`` of them a step; gradients are averaged, so a step sees N times the batch. The
learning-rate schedule follows the slowest process's clock, and rank 0 saves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from storymem.atomic import atomic_write_json
from storymem.devices import default_device

from .world import Character, ClipSpec

logger = logging.getLogger(__name__)

__all__ = [
    "ToyBaseConfig",
    "build_base_components",
    "cut_clip",
    "latent_character_mask",
    "load_base_components",
    "render_reference_frames",
    "render_training_clips",
    "to_video",
    "train_base",
    "train_vae",
    "train_transformer",
]

MAX_SEQUENCE_LENGTH = 512  # what the pipeline pads prompts to; training must see the same padding
CAPTION_MODES = ("first", "named", "returns", "same")


@dataclass
class ToyBaseConfig:
    """Sizes and training settings of the small world's base model."""

    # clips
    height: int = 64
    width: int = 64
    num_frames: int = 17
    num_clips: int = 12000
    caption_mode_probs: tuple = (0.5, 0.25, 0.15, 0.1)  # first, named, returns, same
    # Share of clips that cut once to the same character in another scene (see cut_clip): the base then learns
    # to find a character in one place and draw it in another, which memory needs and single shots never ask.
    cut_prob: float = 0.0
    # Caption modes of the part before a cut. Mostly "same": when the caption names the character, the model
    # can draw it after the cut from the text alone and never has to look back at the frames.
    cut_caption_mode_probs: tuple = (0.1, 0.05, 0.1, 0.75)  # first, named, returns, same
    exclude: list = field(default_factory=list)  # identity keys kept out of training (held-out stories)
    # Share of steps in the memory layout of M2V (storymem.conditioning, negative RoPE): memory frames of the
    # clip's character drawn in other clips, before the clip. A big model brings this skill from pretraining on
    # real video; the small base has to be taught it, or an adapter has nothing to route memory into.
    memory_prob: float = 0.0
    memory_frames: int = 4  # reference frames per clip (two from each of two other clips); a step uses 1..this
    # Share of memory steps with a frame of another character among the references, the caption naming the
    # clip's character: a story's bank holds every character so far, and the prompt says which one is meant.
    memory_distractor_prob: float = 0.0
    # On image-to-video and memory steps, the share of captions replaced by their referential form ("the same
    # character ..."): with a caption that names the character, the model can draw it from the text and never
    # learns to carry it over from the frames.
    referential_prob: float = 0.0
    freeze_text_encoder: bool = False  # train the transformer only (prompt embeddings of the base stay valid)
    # VAE
    vae_base_dim: int = 16
    vae_dim_mult: tuple = (1, 2, 4)
    z_dim: int = 16
    vae_steps: int = 3000
    vae_batch_size: int = 32
    vae_window: int = 9  # frames per training window (4n+1): the first frame and two causal chunks
    vae_lr: float = 5e-4
    vae_kl_weight: float = 1e-6
    character_weight: float = 4.0  # extra reconstruction weight on saturated (character) pixels
    vae_decoder_only: bool = False  # train the decoder only: the latent space (and a transformer on it) stays valid
    # text encoder
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    # transformer
    heads: int = 4
    head_dim: int = 48
    layers: int = 8
    ffn_dim: int = 768
    freq_dim: int = 64
    flow_shift: float = 3.0
    steps: int = 20000
    batch_size: int = 64
    lr: float = 4e-4
    warmup_steps: int = 500
    i2v_prob: float = 0.5
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0

    def validate(self):
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {self.height}x{self.width}")
        for name in ("num_frames", "vae_window"):
            value = getattr(self, name)
            if value < 5 or (value - 1) % 4:
                raise ValueError(f"{name} must be 4n+1 and >= 5, got {value}")
        if self.vae_window > self.num_frames:
            raise ValueError(f"vae_window ({self.vae_window}) is longer than the clips ({self.num_frames})")
        for name in ("caption_mode_probs", "cut_caption_mode_probs"):
            _check_mode_probs(getattr(self, name), name)
        for name in ("cut_prob", "memory_prob", "memory_distractor_prob", "referential_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.memory_prob and self.memory_frames < 1:
            raise ValueError(f"memory_frames must be >= 1 when memory_prob > 0, got {self.memory_frames}")
        if self.cut_prob and self.num_frames < 9:
            raise ValueError(f"a cut needs num_frames >= 9 (two latent frames before it, one after), "
                             f"got {self.num_frames}")
        if (self.head_dim // 6) * 4 >= self.head_dim:
            raise ValueError(f"head_dim {self.head_dim} leaves no rope channels for time")

    @property
    def spatial_scale(self) -> int:
        return 2 ** (len(self.vae_dim_mult) - 1)


def _check_mode_probs(probs, name: str):
    probs = tuple(probs)
    if len(probs) != len(CAPTION_MODES) or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
        raise ValueError(f"{name} must be {len(CAPTION_MODES)} probabilities (for {', '.join(CAPTION_MODES)}) "
                         f"summing to 1, got {probs}")


# ---------------------------------------------------------------------------------------------- models
def build_base_components(config: ToyBaseConfig, seed: int = 0) -> dict:
    """Untrained components of the base model (StoryMemPipeline keyword arguments)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from storymem.builtin.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        downsamples = len(config.vae_dim_mult) - 1
        vae = AutoencoderKLWan(base_dim=config.vae_base_dim, z_dim=config.z_dim, dim_mult=list(config.vae_dim_mult),
                               num_res_blocks=1, temperal_downsample=[True] * downsamples,
                               scale_factor_spatial=config.spatial_scale,
                               latents_mean=[0.0] * config.z_dim, latents_std=[1.0] * config.z_dim)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=config.text_dim, d_kv=config.text_dim // config.text_heads,
            d_ff=4 * config.text_dim, num_layers=config.text_layers, num_heads=config.text_heads,
            relative_attention_num_buckets=16, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        ))
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=config.heads, attention_head_dim=config.head_dim,
            in_channels=2 * config.z_dim + 4, out_channels=config.z_dim, text_dim=config.text_dim,
            freq_dim=config.freq_dim, ffn_dim=config.ffn_dim, num_layers=config.layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=256, image_dim=None,
        )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=config.flow_shift, num_train_timesteps=1000)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                transformer=transformer, transformer_2=None, boundary_ratio=None)


def load_base_components(folder) -> dict:
    """The trained VAE, text encoder and transformer of a base folder, in float32 (to train further)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    folder = Path(folder)
    for name in ("vae", "text_encoder", "transformer"):
        if not (folder / name / "config.json").is_file():
            raise FileNotFoundError(f"{folder / name / 'config.json'} is missing: --init needs a base folder "
                                    "(OUT/base of train_base)")
    return dict(vae=AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval(),
                text_encoder=UMT5EncoderModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32),
                transformer=WanTransformer3DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32))


# ---------------------------------------------------------------------------------------------- data
def cut_clip(rng: np.random.Generator, first: ClipSpec, mode: str, num_frames: int, height: int, width: int,
             temporal_scale: int = 4) -> tuple[np.ndarray, str, int]:
    """A clip of ``first`` that cuts once to its character in a random other clip (scene, place, motion).

    The cut falls between two latent frames (after pixel frame ``4j``), so no latent frame mixes the two
    shots, with at least two latent frames before it and one after. The caption describes the first shot in
    ``mode``, then the second as "the same character ...": after the cut, only the frames before it say who to
    draw.

    Returns ``(frames uint8 [T, H, W, 3], caption, cut)`` where ``cut`` is the first frame of the second shot.
    """
    latent_frames = (num_frames - 1) // temporal_scale + 1
    if (num_frames - 1) % temporal_scale or latent_frames < 3:
        raise ValueError(f"a cut needs num_frames = {temporal_scale}n+1 >= {2 * temporal_scale + 1}, got {num_frames}")
    j = int(rng.integers(1, latent_frames - 1))  # latent frames 0..j show the first shot
    cut = temporal_scale * j + 1
    second = ClipSpec.random(rng, first.characters[0])
    video = np.concatenate([first.render(num_frames, height, width)[:cut],
                            second.render(num_frames, height, width)[:num_frames - cut]])
    return video, f"{first.caption(mode)} then {second.caption('same')}", cut


def _render_chunk(job: tuple) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    seed, count, num_frames, height, width, mode_probs, exclude, cut_prob, cut_mode_probs = job
    rng = np.random.default_rng(seed)
    frames = np.empty((count, num_frames, height, width, 3), np.uint8)
    captions, identities, referential = [], [], []
    for i in range(count):
        character = Character.random(rng, exclude=exclude)
        spec = ClipSpec.random(rng, character)
        mode = CAPTION_MODES[int(rng.choice(len(CAPTION_MODES), p=mode_probs))]
        # No draw without cuts: the clips of a seed stay what they were before cuts existed.
        if cut_prob and rng.random() < cut_prob:
            mode = CAPTION_MODES[int(rng.choice(len(CAPTION_MODES), p=cut_mode_probs))]
            frames[i], caption, _ = cut_clip(rng, spec, mode, num_frames, height, width)
            same = caption  # after the cut it is referential already; before it, mostly too
        else:
            frames[i], caption = spec.render(num_frames, height, width), spec.caption(mode)
            same = spec.caption("same")
        captions.append(caption)
        identities.append(character.key)
        referential.append(same)
    return frames, captions, identities, referential


def render_training_clips(count: int, num_frames: int, height: int, width: int, seed: int = 0,
                          exclude: Sequence[str] = (), mode_probs: Sequence[float] = (0.5, 0.25, 0.15, 0.1),
                          workers: int = 1, chunk: int = 250,
                          cut_prob: float = 0.0, cut_mode_probs: Sequence[float] = (0.1, 0.05, 0.1, 0.75),
                          ) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    """``count`` single-character clips of random characters (identities in ``exclude`` left out) in random
    scenes, with captions in the given mix of modes; a share ``cut_prob`` of them cut once to the same
    character elsewhere (:func:`cut_clip`), the part before the cut captioned in the ``cut_mode_probs`` mix.
    Deterministic per ``seed`` whatever ``workers``.

    Returns ``(frames uint8 [N, T, H, W, 3], captions, identity keys, referential captions)``, the last being
    each clip's caption in the ``same`` mode ("the same character ..."; a cut clip's caption as it is).
    """
    if not 0.0 <= cut_prob <= 1.0:
        raise ValueError(f"cut_prob must be in [0, 1], got {cut_prob}")
    _check_mode_probs(mode_probs, "mode_probs")
    _check_mode_probs(cut_mode_probs, "cut_mode_probs")
    jobs = [(int(np.random.default_rng([seed, i]).integers(2 ** 31)), min(chunk, count - start), num_frames,
             height, width, tuple(mode_probs), tuple(exclude), float(cut_prob), tuple(cut_mode_probs))
            for i, start in enumerate(range(0, count, chunk))]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(job) for job in jobs]
    frames = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, num_frames, height, width, 3), np.uint8)
    return (frames, [c for p in parts for c in p[1]], [k for p in parts for k in p[2]],
            [c for p in parts for c in p[3]])


def _render_reference_chunk(job: tuple) -> np.ndarray:
    seed, keys, per_clip, num_frames, height, width = job
    rng = np.random.default_rng(seed)
    out = np.empty((len(keys), per_clip, height, width, 3), np.uint8)
    for i, key in enumerate(keys):
        character = Character.from_key(key)
        filled = 0
        while filled < per_clip:
            video = ClipSpec.random(rng, character).render(num_frames, height, width)
            take = min(2, per_clip - filled)
            for t in sorted(rng.choice(num_frames, size=take, replace=False)):
                out[i, filled] = video[t]
                filled += 1
    return out


def render_reference_frames(identities: Sequence[str], per_clip: int, num_frames: int, height: int, width: int,
                            seed: int = 0, workers: int = 1, chunk: int = 250) -> np.ndarray:
    """Memory frames for training clips: for each identity key, ``per_clip`` frames of that character in other
    clips (two random frames from each, every clip in a random scene, place and motion), the way a memory bank
    holds keyframes of earlier shots. Deterministic per ``seed`` whatever ``workers``.

    Returns uint8 ``[N, per_clip, H, W, 3]``.
    """
    if per_clip < 1:
        raise ValueError(f"per_clip must be >= 1, got {per_clip}")
    jobs = [(int(np.random.default_rng([seed, 7, i]).integers(2 ** 31)), list(identities[start:start + chunk]),
             per_clip, num_frames, height, width) for i, start in enumerate(range(0, len(identities), chunk))]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_reference_chunk, jobs))
    else:
        parts = [_render_reference_chunk(job) for job in jobs]
    return np.concatenate(parts) if parts else np.empty((0, per_clip, height, width, 3), np.uint8)


# Darkest background value 0.28; darkest pattern shade 0.78 x 0.5 = 0.39 (world.COLOURS, PATTERN_SHADE).
_CHARACTER_MIN_VALUE = 0.33


def to_video(frames_uint8: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] (tensor or array) -> float [B, 3, T, H, W] in [-1, 1]."""
    if isinstance(frames_uint8, np.ndarray):
        frames_uint8 = torch.from_numpy(np.ascontiguousarray(frames_uint8))
    return frames_uint8.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def _character_weight(video: torch.Tensor, extra: float) -> torch.Tensor:
    """1 + extra on saturated pixels: the world draws characters in saturated colours and backgrounds muted or
    dark, so this puts the loss where identities are. The value floor sits between the darkest background
    (:data:`~research.small_world.world.BACKGROUND_MAX_VALUE`) and the darkest pattern shade, so patterns count too: a
    floor above the shade taught a VAE to paint bodies plain."""
    rgb = (video + 1) / 2
    top = rgb.amax(dim=1, keepdim=True)
    saturation = (top - rgb.amin(dim=1, keepdim=True)) / top.clamp_min(1e-3)
    return 1.0 + extra * ((saturation > 0.6) & (top > _CHARACTER_MIN_VALUE)).float()


class _Clock:
    """Training progress by steps or by wall time, whichever runs out first."""

    def __init__(self, steps: int, minutes: Optional[float]):
        self.start = time.perf_counter()
        self.steps = steps
        self.limit = None if minutes is None else 60.0 * minutes

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        by_steps = step / max(1, self.steps)
        return by_steps if self.limit is None else max(by_steps, self.elapsed() / self.limit)

    def out(self, step: int) -> bool:
        return self.progress(step) >= 1.0


def _set_lr(optimizer, base_lr: float, step: int, warmup: int, progress: float) -> float:
    """Linear warmup, then cosine decay to a tenth over the run's progress (steps or time, so a run cut short
    by its time limit still anneals)."""
    factor = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor
    return base_lr * factor


# ---------------------------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class Processes:
    """This process's place in a data-parallel run (``torchrun``); rank 0 of 1 when it runs alone."""

    rank: int = 0
    world: int = 1

    def broadcast(self, params: Sequence[torch.Tensor]) -> None:
        """Every process starts from rank 0's weights."""
        if self.world > 1:
            import torch.distributed as dist

            for p in params:
                dist.broadcast(p.data, src=0)

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Replace each gradient with its mean over the processes (one flat all-reduce)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def agree(self, value: float, device) -> float:
        """The largest ``value`` over the processes: where a time limit is concerned, the slowest clock."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)


def init_processes(device: str) -> tuple[Processes, str]:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1), each process on its own GPU
    (``cuda:LOCAL_RANK``; gloo on the CPU). Returns the run's :class:`Processes` and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes(), device
    import torch.distributed as dist

    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size()), device


# ---------------------------------------------------------------------------------------------- VAE
def train_vae(vae, clips: torch.Tensor, config: ToyBaseConfig, device, minutes: Optional[float] = None,
              log_every: int = 100, generator: Optional[torch.Generator] = None) -> list[float]:
    """Train ``vae`` in place on random windows of ``clips`` (uint8 [N, T, H, W, 3], CPU). Returns the losses."""
    vae.to(device).train().requires_grad_(True)
    trained = vae
    if config.vae_decoder_only:
        vae.requires_grad_(False)
        trained = torch.nn.ModuleList([vae.decoder, vae.post_quant_conv]).requires_grad_(True)
        vae.encoder.eval()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=config.vae_lr, weight_decay=0.0)
    warmup = min(200, config.vae_steps // 10)
    generator = generator or torch.Generator().manual_seed(config.seed)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=torch.device(device).type == "cuda")
    clock, losses = _Clock(config.vae_steps, minutes), []
    n, length = clips.shape[0], clips.shape[1]
    for step in range(config.vae_steps):
        _set_lr(optimizer, config.vae_lr, step, warmup, clock.progress(step))
        index = torch.randint(n, (config.vae_batch_size,), generator=generator)
        start = int(torch.randint(length - config.vae_window + 1, (1,), generator=generator))
        video = to_video(clips[index, start:start + config.vae_window].to(device, non_blocking=True))
        with autocast, torch.set_grad_enabled(not config.vae_decoder_only):
            posterior = vae.encode(video).latent_dist
        with autocast:
            reconstruction = vae.decode(posterior.sample(generator=None)).sample
        reconstruction = reconstruction.float()
        weight = _character_weight(video, config.character_weight)
        error = reconstruction - video
        loss = (weight * (error.abs() + error.square())).mean() / weight.mean()
        if not config.vae_decoder_only:
            loss = loss + config.vae_kl_weight * posterior.kl().float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if log_every and (step % log_every == 0 or step == config.vae_steps - 1):
            logger.info("vae step %d loss %.4f (%.0f s)", step, float(np.mean(losses[-log_every:])), clock.elapsed())
        if clock.out(step + 1):
            if step + 1 < config.vae_steps:
                logger.info("vae: time limit reached after %d steps", step + 1)
            break
    vae.eval().requires_grad_(False)
    return losses


def latent_character_mask(video: torch.Tensor, temporal_scale: int = 4, spatial_scale: int = 4) -> torch.Tensor:
    """Which latent cells show a character: ``video`` float ``[B, 3, T, H, W]`` in [-1, 1] (T = 4n+1) ->
    ``[B, 1, f, H/s, W/s]`` of 0/1, a cell being 1 if any of its pixels, in any frame it encodes, is a
    character's (saturated) pixel. Latent frame 0 encodes pixel frame 0, frame k the frames 4k-3 .. 4k."""
    from storymem.training.sources import mask_latent_cells

    return mask_latent_cells(_character_weight(video, 1.0) - 1.0, temporal_scale, spatial_scale)


@torch.no_grad()
def reconstruction_psnr(vae, clips: torch.Tensor, device, batch_size: int = 32) -> dict:
    """PSNR (dB) of the VAE's reconstructions of ``clips``: whole frames and character pixels only."""
    errors, weights = [], []
    for start in range(0, clips.shape[0], batch_size):
        video = to_video(clips[start:start + batch_size].to(device))
        reconstruction = vae.decode(vae.encode(video).latent_dist.mode()).sample.float().clamp(-1, 1)
        errors.append(((reconstruction - video) / 2).square())
        weights.append(_character_weight(video, 1.0) - 1.0)
    error, character = torch.cat(errors), torch.cat(weights).expand_as(torch.cat(errors))
    mse_all = float(error.mean())
    mse_character = float((error * character).sum() / character.sum().clamp_min(1))
    return {"psnr": round(-10 * math.log10(max(mse_all, 1e-10)), 2),
            "character_psnr": round(-10 * math.log10(max(mse_character, 1e-10)), 2)}


@torch.no_grad()
def set_latent_statistics(vae, clips: torch.Tensor, device, batch_size: int = 64) -> tuple[list, list]:
    """Per-channel mean and std of the VAE's latents (posterior mode) over ``clips``, written to the VAE
    config as ``latents_mean`` / ``latents_std`` (how Wan pipelines normalise latents)."""
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, clips.shape[0], batch_size):
        video = to_video(clips[start:start + batch_size].to(device))
        z = vae.encode(video.to(vae.dtype)).latent_dist.mode().float()
        total = total + z.sum(dim=(0, 2, 3, 4)).double()
        total_sq = total_sq + z.square().sum(dim=(0, 2, 3, 4)).double()
        count += z.numel() // z.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-8).sqrt()
    mean_list, std_list = [round(float(v), 5) for v in mean], [round(float(v), 5) for v in std]
    vae.register_to_config(latents_mean=mean_list, latents_std=std_list)
    return mean_list, std_list


@torch.no_grad()
def encode_clips(vae, clips: torch.Tensor, device, batch_size: int = 64, out_dtype=torch.bfloat16):
    """Normalised latents of the clips and their image-to-video conditions (first frame, then zeros)."""
    from storymem.conditioning import encode_video_condition, normalize_latents

    _, length, height, width, _ = clips.shape
    latents, conditions = [], []
    for start in range(0, clips.shape[0], batch_size):
        video = to_video(clips[start:start + batch_size].to(device))
        latents.append(normalize_latents(vae, vae.encode(video).latent_dist.mode().float()).to(out_dtype))
        conditions.append(encode_video_condition(vae, video[:, :, :1], length, height, width,
                                                 batch_size=video.shape[0], device=device).to(out_dtype))
    return torch.cat(latents), torch.cat(conditions)


@torch.no_grad()
def encode_reference_frames(vae, references: np.ndarray, device, batch_size: int = 512,
                            out_dtype=torch.bfloat16) -> torch.Tensor:
    """uint8 ``[N, K, H, W, 3]`` reference frames -> normalised memory latents ``[N, z, K, h, w]``, each frame
    encoded on its own as a one-frame video, as the pipeline encodes memory
    (:func:`~storymem.conditioning.encode_memory_frames`)."""
    from storymem.conditioning import encode_memory_frames

    n, k = references.shape[:2]
    flat = torch.from_numpy(np.ascontiguousarray(references)).flatten(0, 1)  # [N*K, H, W, 3]
    parts = []
    for start in range(0, flat.shape[0], batch_size):
        images = flat[start:start + batch_size].to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        parts.append(encode_memory_frames(vae, images, batch_size=batch_size)[0].to(out_dtype))  # [z, m, h, w]
    latents = torch.cat(parts, dim=1)  # [z, N*K, h, w]
    return latents.unflatten(1, (n, k)).permute(1, 0, 2, 3, 4).contiguous()


# ---------------------------------------------------------------------------------------------- transformer
def _prompt_embeddings(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Wan's prompt encoding: the encoder's states up to each prompt's length, zeros after (as
    ``WanImageToVideoPipeline._get_t5_prompt_embeds``)."""
    states = text_encoder(ids, mask).last_hidden_state
    return states * mask.unsqueeze(-1).to(states.dtype)


def tokenize(tokenizer, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean

    inputs = tokenizer([prompt_clean(c) for c in captions], padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                       truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    return inputs.input_ids, inputs.attention_mask


def train_transformer(components: dict, latents: torch.Tensor, i2v_conditions: torch.Tensor,
                      m2v_condition: torch.Tensor, captions: Sequence[str], config: ToyBaseConfig, device,
                      minutes: Optional[float] = None, log_every: int = 200,
                      generator: Optional[torch.Generator] = None,
                      processes: Processes = Processes(),
                      referential_captions: Optional[Sequence[str]] = None,
                      memory_latents: Optional[torch.Tensor] = None) -> list[float]:
    """Train the transformer and the text encoder in place (then load their EMA weights). Returns the losses
    (this process's).

    ``latents`` / ``i2v_conditions``: normalised ``[N, z, f, h, w]`` on ``device``; ``m2v_condition``:
    ``[1, z, f, h, w]``. Under several ``processes`` each trains on its own clips and gradients are averaged.

    A share ``config.memory_prob`` of the steps is in the M2V memory layout: ``memory_latents`` ``[N, z, K, h,
    w]`` (normalised, one latent frame per reference image; :func:`render_reference_frames`) hold K references
    per clip, and the step puts 1..K of them (the same choice for the whole batch) before the clip, at
    negative RoPE times, with the loss on the clip alone (:func:`~storymem.training.loss.flow_matching_loss`,
    the function adapter training uses). Memory steps are image-to-video as often as the others. On
    image-to-video and memory steps, ``config.referential_prob`` of the captions are replaced by
    ``referential_captions`` (each clip's "the same character ..." form), except on the
    ``config.memory_distractor_prob`` of memory steps that also hold a reference of another character: there
    the caption is what says which one to draw.
    """
    from diffusers.training_utils import EMAModel

    from storymem.training.loss import flow_matching_loss

    transformer, text_encoder, tokenizer = components["transformer"], components["text_encoder"], components["tokenizer"]
    if config.memory_prob and memory_latents is None:
        raise ValueError("config.memory_prob > 0 needs memory_latents (reference frames of each clip's character)")
    if config.referential_prob and referential_captions is None:
        raise ValueError("config.referential_prob > 0 needs referential_captions")
    if memory_latents is not None and (memory_latents.shape[0] != latents.shape[0]
                                       or memory_latents.shape[3:] != latents.shape[3:]):
        raise ValueError(f"memory_latents {tuple(memory_latents.shape)} do not match latents {tuple(latents.shape)}")
    train_text = not config.freeze_text_encoder
    transformer.to(device).train().requires_grad_(True)
    text_encoder.to(device).train(train_text).requires_grad_(train_text)
    ids, mask = tokenize(tokenizer, captions)
    empty_ids, empty_mask = tokenize(tokenizer, [""])
    ref_ids, ref_mask = tokenize(tokenizer, referential_captions) if referential_captions is not None else (ids, mask)
    # Prompts are short: the encoder only needs the first tokens (the rest is padding it masks anyway).
    used = max(int(mask.sum(dim=1).max()), int(ref_mask.sum(dim=1).max()))
    ids, mask = ids[:, :used].to(device), mask[:, :used].to(device)
    ref_ids, ref_mask = ref_ids[:, :used].to(device), ref_mask[:, :used].to(device)
    empty_ids, empty_mask = empty_ids[:, :used].to(device), empty_mask[:, :used].to(device)

    params = list(transformer.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    processes.broadcast(params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = EMAModel(params, decay=config.ema_decay)
    generator = generator or torch.Generator().manual_seed(config.seed + 1 + 7919 * processes.rank)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=torch.device(device).type == "cuda")
    n, f = latents.shape[0], latents.shape[2]
    empty_memory = latents.new_zeros(config.batch_size, latents.shape[1], 0, *latents.shape[3:]).float()
    clock, losses = _Clock(config.steps, minutes), []
    progress = processes.agree(clock.progress(0), device)
    for step in range(config.steps):
        lr = _set_lr(optimizer, config.lr, step, config.warmup_steps, progress)
        index = torch.randint(n, (config.batch_size,), generator=generator)
        i2v = bool(torch.rand((), generator=generator) < config.i2v_prob)
        dropped = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        # Draws only when a setting is on, so runs without them see the batches they always saw.
        with_memory = bool(config.memory_prob and torch.rand((), generator=generator) < config.memory_prob)
        distractor = bool(with_memory and config.memory_distractor_prob
                          and torch.rand((), generator=generator) < config.memory_distractor_prob)
        index_d = index.to(device)
        batch_ids, batch_mask = ids[index_d], mask[index_d]
        if config.referential_prob and (i2v or with_memory) and not distractor:
            same = (torch.rand(config.batch_size, generator=generator) < config.referential_prob).to(device)[:, None]
            batch_ids = torch.where(same, ref_ids[index_d], batch_ids)
            batch_mask = torch.where(same, ref_mask[index_d], batch_mask)
        batch_ids = torch.where(dropped.to(device)[:, None], empty_ids.expand(config.batch_size, -1), batch_ids)
        batch_mask = torch.where(dropped.to(device)[:, None], empty_mask.expand(config.batch_size, -1), batch_mask)
        memory = empty_memory
        if with_memory:
            k = memory_latents.shape[2]
            chosen = torch.randperm(k, generator=generator)[: int(torch.randint(1, k + 1, (), generator=generator))]
            memory = memory_latents[index_d][:, :, chosen.to(device)].float()
            if distractor:  # a reference of the next sample's character, somewhere among this sample's
                j = int(torch.randint(k, (), generator=generator))
                at = int(torch.randint(memory.shape[2] + 1, (), generator=generator))
                other = memory_latents[index_d.roll(1)][:, :, j:j + 1].float()
                memory = torch.cat([memory[:, :, :at], other, memory[:, :, at:]], dim=2)
        with autocast, torch.set_grad_enabled(train_text):
            embeds = _prompt_embeddings(text_encoder, batch_ids, batch_mask)
        embeds = F.pad(embeds.float(), (0, 0, 0, MAX_SEQUENCE_LENGTH - embeds.shape[1]))
        batch = {
            "latents": latents[index_d].float(),
            "memory_latents": memory,
            "video_condition": (i2v_conditions[index_d] if i2v else m2v_condition.expand(config.batch_size, -1, -1, -1, -1)).float(),
            "num_frames": (f - 1) * 4 + 1,
            "num_context_frames": 1 if i2v else 0,
            "prompt_embeds": embeds,
        }
        with autocast:
            loss, _ = flow_matching_loss(transformer, batch, expert="all", flow_shift=config.flow_shift,
                                         weight_dtype=torch.float32, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        processes.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.step(params)
        losses.append(float(loss.detach()))
        if log_every and processes.rank == 0 and (step % log_every == 0 or step == config.steps - 1):
            logger.info("transformer step %d loss %.4f lr %.2e (%.0f s)", step, float(np.mean(losses[-log_every:])),
                        lr, clock.elapsed())
        # One agreed progress for the next step's learning rate and for stopping: every process stops together.
        progress = processes.agree(clock.progress(step + 1), device)
        if progress >= 1.0:
            if step + 1 < config.steps:
                logger.info("transformer: time limit reached after %d steps", step + 1)
            break
    ema.copy_to(params)
    transformer.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return losses


# ---------------------------------------------------------------------------------------------- driver
def save_base(components: dict, out_dir: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write the base as a diffusers folder (safetensors, ``dtype``) that StoryMemPipeline loads."""
    from storymem.pipeline import StoryMemPipeline

    pipe = StoryMemPipeline(**components)
    pipe.to("cpu")
    for name in ("vae", "text_encoder", "transformer"):
        getattr(pipe, name).to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for name in ("vae", "text_encoder", "transformer"):
        getattr(pipe, name).to(torch.float32)
    return out_dir


def train_base(config: ToyBaseConfig, out_dir, device: str = "cpu", workers: int = 1,
               vae_minutes: Optional[float] = None, minutes: Optional[float] = None,
               retrain_vae: bool = False, vae_init: Optional[str] = None, vae_only: bool = False,
               init: Optional[str] = None, processes: Processes = Processes()) -> dict:
    """The whole recipe: render clips, train (or reuse) the VAE, encode, train the transformer, save.

    ``vae_init``: a VAE folder to start VAE training from (e.g. one trained on shorter windows).
    ``init``: a base folder (``OUT/base`` of an earlier run) to continue from: its text encoder and transformer
    are trained further, and its VAE is kept as it is unless ``retrain_vae`` (then it is where VAE training
    starts). The clips come from ``config.seed``, so a continuation with another seed sees new clips.
    ``processes`` (see :func:`init_processes`): a data-parallel continuation; only rank 0 writes."""
    from diffusers import AutoencoderKLWan

    from storymem.conditioning import encode_video_condition

    config.validate()
    out_dir = Path(out_dir)
    vae_dir = out_dir / "stages" / "vae"
    trains_vae = retrain_vae or vae_only or (init is None and not (vae_dir / "config.json").is_file())
    if processes.world > 1 and trains_vae:
        raise ValueError(f"{out_dir}: a run of {processes.world} processes trains the text encoder and transformer "
                         "only; train the VAE in one process, then continue with --init (without --retrain-vae "
                         "or --vae-only)")
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    clip_seed = config.seed if processes.rank == 0 else config.seed * 1000 + processes.rank
    frames, captions, identities, referential = render_training_clips(
        config.num_clips, config.num_frames, config.height, config.width, seed=clip_seed, exclude=config.exclude,
        mode_probs=config.caption_mode_probs, workers=workers, cut_prob=config.cut_prob,
        cut_mode_probs=config.cut_caption_mode_probs)
    clips = torch.from_numpy(frames)
    if device.startswith("cuda"):
        clips = clips.pin_memory()
    references = None
    if config.memory_prob:
        references = render_reference_frames(identities, config.memory_frames, config.num_frames, config.height,
                                             config.width, seed=clip_seed, workers=workers)
    logger.info("rendered %d clips in %.1f s", len(captions), time.perf_counter() - t0)
    components = build_base_components(config, seed=config.seed)
    if init is not None:
        components.update(load_base_components(init))
        summary_init = {"init": str(init)}
    else:
        summary_init = {}
        if vae_init is None and retrain_vae:
            vae_init = str(Path(init) / "vae")

    summary = {"config": dataclasses.asdict(config), "clips": len(captions),
               "identities": len(set(identities)), **summary_init}
    if processes.world > 1:
        summary["processes"] = processes.world  # clips and identities: rank 0's
    if vae_init is not None and retrain_vae is False and (vae_dir / "config.json").is_file():
        raise ValueError(f"{vae_dir} already holds a trained VAE; pass retrain_vae=True to train from {vae_init}")
    if (vae_dir / "config.json").is_file() and not retrain_vae:
        components["vae"] = AutoencoderKLWan.from_pretrained(vae_dir, torch_dtype=torch.float32).eval()
        summary["vae"] = {"reused": str(vae_dir)}
        logger.info("reusing the VAE in %s", vae_dir)
    elif init is not None and not retrain_vae:
        summary["vae"] = {"reused": str(Path(init) / "vae")}
        logger.info("keeping the VAE of %s", init)
    else:
        if vae_init is not None:
            components["vae"] = AutoencoderKLWan.from_pretrained(vae_init, torch_dtype=torch.float32)
            summary["vae_init"] = str(vae_init)
        t = time.perf_counter()
        vae_losses = train_vae(components["vae"], clips, config, device, minutes=vae_minutes)
        if not config.vae_decoder_only:  # the encoder, and so the latents' statistics, are unchanged otherwise
            set_latent_statistics(components["vae"], clips[: min(len(clips), 1024)], device)
        components["vae"].to("cpu").save_pretrained(vae_dir, safe_serialization=True)
        summary["vae"] = {"steps": len(vae_losses), "seconds": round(time.perf_counter() - t, 1),
                          "loss_first": vae_losses[0], "loss_last100": float(np.mean(vae_losses[-100:]))}
        # Held-out clips (another seed) for the reconstruction figure.
        held_out, _, _, _ = render_training_clips(64, config.num_frames, config.height, config.width,
                                               seed=config.seed + 10_000, exclude=config.exclude)
        summary["vae"].update(reconstruction_psnr(components["vae"].to(device), torch.from_numpy(held_out), device))
        logger.info("vae: %s", summary["vae"])
    if vae_only:
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(out_dir / "train_base_summary.json", summary)
        return summary
    vae = components["vae"].to(device).eval().requires_grad_(False)
    t = time.perf_counter()
    latents, i2v_conditions = encode_clips(vae, clips, device)
    m2v = encode_video_condition(vae, None, config.num_frames, config.height, config.width, device=device)
    memory_latents = None if references is None else encode_reference_frames(vae, references, device)
    summary["encode_seconds"] = round(time.perf_counter() - t, 1)
    del clips, frames, references

    t = time.perf_counter()
    losses = train_transformer(components, latents, i2v_conditions, m2v, captions, config, device, minutes=minutes,
                               processes=processes, referential_captions=referential, memory_latents=memory_latents)
    summary["transformer"] = {"steps": len(losses), "seconds": round(time.perf_counter() - t, 1),
                              "loss_first100": float(np.mean(losses[:100])),
                              "loss_last500": float(np.mean(losses[-500:]))}
    if processes.rank != 0:
        return summary
    components["vae"] = vae.to("cpu")
    save_base(components, out_dir / "base")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out_dir / "train_base_summary.json", summary)
    return summary


BOOL_FIELDS = ("vae_decoder_only", "freeze_text_encoder")  # store_true flags of the command line


def _probs(text: str) -> tuple:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m research.small_world.train_base",
                                 description="Train the small world's base video model (VAE, text encoder, "
                                             "transformer) and save it as a diffusers folder.")
    ap.add_argument("--out", required=True, help="output folder (the model goes to OUT/base)")
    ap.add_argument("--device", default=default_device().type)
    ap.add_argument("--workers", type=int, default=1, help="processes rendering the training clips")
    ap.add_argument("--exclude-stories", help="a toy story set (index.json folder) whose characters stay out")
    ap.add_argument("--vae-minutes", type=float, help="stop VAE training after this long")
    ap.add_argument("--minutes", type=float, help="stop transformer training after this long")
    ap.add_argument("--retrain-vae", action="store_true")
    ap.add_argument("--vae-init", help="VAE folder to start VAE training from")
    ap.add_argument("--vae-only", action="store_true", help="stop after the VAE stage (OUT/stages/vae)")
    ap.add_argument("--vae-decoder-only", action="store_true",
                    help="train the VAE decoder only (the latent space, and a transformer on it, stay valid)")
    ap.add_argument("--init", help="base folder (OUT/base of an earlier run) to continue training from")
    ap.add_argument("--freeze-text-encoder", action="store_true",
                    help="train the transformer only (the base's prompt embeddings stay valid)")
    for f in dataclasses.fields(ToyBaseConfig):
        if f.type in ("int", "float") or f.type in (int, float):
            ap.add_argument("--" + f.name.replace("_", "-"), type=float if "float" in str(f.type) else int)
    for name in ("caption_mode_probs", "cut_caption_mode_probs"):
        ap.add_argument("--" + name.replace("_", "-"), type=_probs, metavar="P,P,P,P",
                        help=f"probabilities of the caption modes {', '.join(CAPTION_MODES)}")
    return ap.parse_args(argv)


def story_identities(stories_dir) -> list[str]:
    """Every identity key of a toy story set (``index.json`` of :func:`.datasets.make_story_set`)."""
    path = Path(stories_dir) / "index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        return sorted({key for story in index["stories"] for key in story["identities"].values()})
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a toy story set index ({err})") from None


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = _parse(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ToyBaseConfig)
                 if getattr(args, f.name, None) is not None and f.name not in BOOL_FIELDS}
    overrides.update({name: getattr(args, name) for name in BOOL_FIELDS})
    config = ToyBaseConfig(**overrides)
    if args.exclude_stories:
        config.exclude = story_identities(args.exclude_stories)
    processes, device = init_processes(args.device)
    try:
        summary = train_base(config, args.out, device=device, workers=args.workers, vae_minutes=args.vae_minutes,
                             minutes=args.minutes, retrain_vae=args.retrain_vae, vae_init=args.vae_init,
                             vae_only=args.vae_only, init=args.init, processes=processes)
    finally:
        if processes.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if processes.rank == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))


if __name__ == "__main__":
    main()
