"""Periodic validation renders during training: a short story through :class:`~storymem.StoryMemPipeline`.

The story is the captions of a few clips of one cluster of the training set. Shot 1 remembers cached memory
frames of the cluster's other clips (the training task, at inference); every later shot also remembers the
middle frame of each shot rendered before it (as the release's bank: the first ``sink`` kept, then the most
recent, up to ``max_memory``). All shots are joined into one mp4.

Prompts are encoded once, when the renderer is built; the text encoder is released afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..conditioning import encode_memory_frames
from ..defaults import FPS, GUIDANCE, MAX_MEMORY, SINK, WAN_NEGATIVE_PROMPT
from .cache import PreparedDataset

logger = logging.getLogger(__name__)

__all__ = ["ValidationRenderer"]


class ValidationRenderer:
    """Renders the validation story with the model being trained.

    Args:
        data: the prepared training set (prompts, seed memory, size).
        base: base model (for the VAE, the scheduler, the text encoder and, with ``other_expert="base"``, the
            expert that is not being trained).
        component: the trained expert, ``"transformer"`` or ``"transformer_2"``.
        other_expert: ``"base"`` (the base's other expert, kept on the CPU between renders) or ``"none"``
            (the trained expert denoises every step).
    """

    def __init__(self, data: PreparedDataset, base: str, component: str, device, weight_dtype: torch.dtype,
                 num_shots: int = 3, num_inference_steps: int = 30, guidance_scale: float = GUIDANCE,
                 other_expert: str = "base", cluster: int = 0, max_memory: int = MAX_MEMORY, sink: int = SINK,
                 seed: int = 0):
        from .models import load_boundary_ratio, load_encoders, load_expert

        if other_expert not in ("base", "none"):
            raise ValueError(f"other_expert must be 'base' or 'none', got {other_expert!r}")
        if not 0 <= cluster < len(data.clusters):
            raise ValueError(f"validation cluster {cluster} out of range (the data has {len(data.clusters)})")
        self.data, self.component, self.device, self.weight_dtype = data, component, torch.device(device), weight_dtype
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.max_memory, self.sink, self.seed = max_memory, sink, seed

        members = data.clusters[cluster]
        self.shots = members[:max(1, min(num_shots, len(members) - 1))]
        seed_clips = [c for c in members if c not in self.shots] or members[1:]
        self.seed_memory = [(c, 0) for c in seed_clips][:max_memory]
        self.prompts = [data.clips[c]["caption"] for c in self.shots]

        pipe = load_encoders(base, device=self.device)
        with torch.no_grad():
            self.prompt_embeds = [pipe.encode_prompt(p, do_classifier_free_guidance=False, device=self.device)[0]
                                  .to(weight_dtype) for p in self.prompts]
            self.negative_embeds = pipe.encode_prompt(WAN_NEGATIVE_PROMPT, do_classifier_free_guidance=False,
                                                      device=self.device)[0].to(weight_dtype)
        self.tokenizer, self.vae, self.scheduler = pipe.tokenizer, pipe.vae, pipe.scheduler
        del pipe  # drops the text encoder

        other = {"transformer": "transformer_2", "transformer_2": "transformer"}[component]
        self.other_component = other
        self.other_model = None
        self.boundary_ratio = None
        if other_expert == "base":
            self.boundary_ratio = load_boundary_ratio(base)
            if self.boundary_ratio is not None:
                self.other_model = load_expert(base, other, dtype=weight_dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def render(self, model, path, fps: float = float(FPS)) -> Path:
        """Render the story with ``model`` (the unwrapped trained transformer) and write it to ``path``."""
        from ..pipeline import StoryMemPipeline, preprocess_memory_images
        from ..rope import install_memory_rope
        from ..video import write_video

        data = self.data
        was_training = model.training
        model.eval()
        if self.other_model is not None:
            self.other_model.to(self.device)
            install_memory_rope(self.other_model)
        experts = {self.component: model, self.other_component: self.other_model}
        if self.other_model is None:  # one expert denoises all steps
            experts = {"transformer": model, "transformer_2": None}
        pipe = StoryMemPipeline(tokenizer=self.tokenizer, text_encoder=None, vae=self.vae, scheduler=self.scheduler,
                                boundary_ratio=self.boundary_ratio if self.other_model is not None else None,
                                **experts)
        pipe.set_progress_bar_config(disable=True)
        try:
            memory = [data.memory_frame(c, j).unsqueeze(0).to(self.device, torch.float32)
                      for c, j in self.seed_memory]
            frames_out = []
            for shot, (embeds, prompt) in enumerate(zip(self.prompt_embeds, self.prompts)):
                kept = memory if len(memory) <= self.max_memory else \
                    memory[:self.sink] + memory[len(memory) - (self.max_memory - self.sink):]
                memory_latents = torch.cat(kept, dim=2) if kept else None
                generator = torch.Generator().manual_seed(self.seed + shot)
                video = pipe(prompt_embeds=embeds, negative_prompt_embeds=self.negative_embeds,
                             memory_latents=memory_latents, height=data.height, width=data.width,
                             num_frames=data.num_frames, num_inference_steps=self.num_inference_steps,
                             guidance_scale=self.guidance_scale, generator=generator, output_type="np").frames[0]
                frames_out.append(np.asarray(video))
                middle = np.round(video[len(video) // 2] * 255).astype(np.uint8)
                image = preprocess_memory_images([middle], data.height, data.width).to(self.device)
                memory.append(encode_memory_frames(self.vae, image).to(torch.float32))
            path = Path(path)
            write_video(path, np.concatenate(frames_out, axis=0), fps=fps, pad_to_even=True)
            logger.info("validation story (%d shots: %s) written to %s", len(self.prompts),
                        " | ".join(self.prompts), path)
            return path
        finally:
            model.train(was_training)
            if self.other_model is not None:
                self.other_model.to("cpu")
