"""The steps of the small world's base-model training: the VAE (windows of clips, character pixels weighted up),
the latents it gives, and the text encoder and transformer on them (rectified flow, text-to-video,
image-to-video and the memory layout), data-parallel over the processes ``torchrun`` starts.
:mod:`.train_base` runs them in order and saves the model.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base_clips import character_weight, to_video

if TYPE_CHECKING:  # annotations only: train_base imports this module
    from .train_base import ToyBaseConfig

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_SEQUENCE_LENGTH",
    "Processes",
    "encode_clips",
    "encode_reference_frames",
    "init_processes",
    "prompt_embeddings",
    "reconstruction_psnr",
    "set_latent_statistics",
    "tokenize",
    "train_transformer",
    "train_vae",
]

MAX_SEQUENCE_LENGTH = 512  # what the pipeline pads prompts to; training must see the same padding


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
        weight = character_weight(video, config.character_weight)
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


@torch.no_grad()
def reconstruction_psnr(vae, clips: torch.Tensor, device, batch_size: int = 32) -> dict:
    """PSNR (dB) of the VAE's reconstructions of ``clips``: whole frames and character pixels only."""
    errors, weights = [], []
    for start in range(0, clips.shape[0], batch_size):
        video = to_video(clips[start:start + batch_size].to(device))
        reconstruction = vae.decode(vae.encode(video).latent_dist.mode()).sample.float().clamp(-1, 1)
        errors.append(((reconstruction - video) / 2).square())
        weights.append(character_weight(video, 1.0) - 1.0)
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
def prompt_embeddings(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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
            embeds = prompt_embeddings(text_encoder, batch_ids, batch_mask)
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
