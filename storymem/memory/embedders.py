"""Frame embedders: images -> L2-normalised vectors whose dot products are the similarities keyframe selection
thresholds.

Interface (duck-typed, see `FrameEmbedder`): `.embed(images) -> torch.Tensor [N, D]`, float32 on the CPU, each
row of unit norm. `images` is a list of uint8 [H, W, 3] RGB arrays or PIL images (sizes may differ), a uint8
array [N, H, W, 3], or a float tensor [N, 3, H, W] in [0, 1]. Embedders also count their work in
`num_forwards` (model forward calls) and `num_images`, which `KeyframeSelector.last_stats` and the benchmark read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ..devices import DTYPE_NAMES, default_device, torch_dtype
from ..hub import MissingWeightsError, cached_file, hub_offline, missing_weights
from ..images import uint8_images

_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_OPEN_CLIP_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def open_clip_precision(precision: str | torch.dtype) -> str:
    """open_clip's precision name for a dtype named as everywhere in storymem (``float32``, ``bfloat16``,
    ``float16``, their short forms, or a torch dtype); open_clip's own names (``pure_bf16``, ``amp``, ...) pass."""
    if isinstance(precision, torch.dtype) or precision in DTYPE_NAMES or precision in ("fp32", "bf16", "fp16"):
        return _OPEN_CLIP_PRECISION[torch_dtype(precision)]
    return precision


@runtime_checkable
class FrameEmbedder(Protocol):
    def embed(self, images: Any) -> torch.Tensor: ...


def _group_by_size(images: Sequence[np.ndarray]) -> dict[tuple[int, int], list[int]]:
    """Indices of same-sized images, so each group can be stacked into one batch."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape[:2], []).append(i)
    return groups


class _DropDownloadLog(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to download weights")


class OpenCLIPEmbedder:
    """An open_clip image(-text) model with the release's frame preprocessing.

    The release compares frames with OpenAI CLIP ViT-B/32 on frames squashed to the model's input size
    (bilinear, no crop, no antialias) and normalised with CLIP's mean/std; size, mean and std are read from
    the model's preprocess config, so any open_clip model works the same way.

    Args:
        model_name: an open_clip model name (`open_clip.list_models()`), or an `hf-hub:` / `local-dir:` id.
        pretrained: an open_clip pretrained tag (e.g. "openai"), a local checkpoint file, or None for random
            weights. Ignored for `hf-hub:` / `local-dir:` names.
        device: where the model runs; default CUDA when available.
        batch_size: images per forward.
        model: an already built open_clip model (then `model_name` only selects the tokenizer).
        precision: the model's dtype: "float32" (like the release), "bfloat16", "float16" (or a torch dtype, or
            one of open_clip's own precision names such as "pure_bf16").
        force_quick_gelu: QuickGELU activations; default: what the pretrained tag was trained with (OpenAI
            weights need it).
        tokenizer: text tokenizer for `embed_text`; default `open_clip.get_tokenizer(model_name)`.
        cache_dir: download cache for pretrained tags.

    The model is built once, on first use (or by `load()`), and kept by this object.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | os.PathLike | None = "openai",
        device: str | torch.device | None = None,
        batch_size: int = 32,
        model: torch.nn.Module | None = None,
        precision: str | torch.dtype = "float32",
        force_quick_gelu: bool | None = None,
        tokenizer: Any = None,
        cache_dir: str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = model_name
        self.pretrained = str(pretrained) if pretrained is not None else None
        self.device = torch.device(device) if device is not None else default_device()
        self.batch_size = int(batch_size)
        self.precision = open_clip_precision(precision)
        self.force_quick_gelu = force_quick_gelu
        self.cache_dir = cache_dir
        self._model = model
        self._tokenizer = tokenizer
        self._preprocess: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None
        self.num_forwards = 0
        self.num_images = 0
        if model is None:
            self._check_source()
        else:
            self._prepare_model(model)

    # ------------------------------------------------------------------------------------------ loading

    def _check_source(self) -> None:
        """Reject unknown model names, tags and missing checkpoint files before anything is built."""
        import open_clip

        name = self.model_name
        if name.startswith(("hf-hub:", "local-dir:")):
            if name.startswith("local-dir:") and not Path(name[len("local-dir:") :]).is_dir():
                raise FileNotFoundError(f"open_clip model folder not found: {name[len('local-dir:'):]}")
            return
        if name.replace("/", "-") not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
        pretrained = self.pretrained
        if pretrained is None or os.path.isfile(pretrained):
            return
        looks_like_path = os.sep in pretrained or "/" in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)
        if looks_like_path:
            raise FileNotFoundError(f"open_clip checkpoint file not found: {pretrained}")
        tags = open_clip.list_pretrained_tags_by_model(name.replace("/", "-"))
        if pretrained not in tags:
            raise ValueError(
                f"unknown pretrained tag {pretrained!r} for open_clip model {name!r}; known tags: {tags} "
                "(or pass a checkpoint file path)"
            )

    def hub_weights(self) -> tuple[str, list[str]]:
        """(hub repository, its weight file names) the weights download from; ("", []) for a local checkpoint,
        random weights, or a tag open_clip fetches from elsewhere."""
        if self._model is not None:
            return "", []
        if self.model_name.startswith("hf-hub:"):
            return self.model_name[len("hf-hub:") :], ["open_clip_config.json"]
        if self.pretrained is None or os.path.isfile(self.pretrained) or self.model_name.startswith("local-dir:"):
            return "", []
        import open_clip

        hub = open_clip.get_pretrained_cfg(self.model_name, self.pretrained).get("hf_hub", "")
        repo, filename = os.path.split(hub.rstrip("/")) if hub.endswith((".bin", ".pt", ".pth", ".safetensors")) \
            else (hub.rstrip("/"), "")
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        return repo, names

    def missing_repos(self) -> list[str]:
        """The hub repositories of the weights that are not in the local cache (empty: nothing to download)."""
        repo, names = self.hub_weights()
        return [repo] if repo and cached_file(repo, names, cache_dir=self.cache_dir) is None else []

    def _missing_weights(self) -> MissingWeightsError | None:
        repos = self.missing_repos()
        if not repos:
            return None
        tag = f"{self.model_name}:{self.pretrained}" if self.pretrained else self.model_name
        return missing_weights(f"open_clip {tag}", repos, instead="give a local checkpoint file")

    def check_available(self) -> None:
        """Raise :class:`~storymem.hub.MissingWeightsError` now, before anything loads, when the weights would
        have to be downloaded but the hub is switched off (``HF_HUB_OFFLINE``)."""
        if hub_offline():
            missing = self._missing_weights()
            if missing is not None:
                raise missing

    def load(self) -> "OpenCLIPEmbedder":
        """Build the model now (otherwise it is built on the first `embed`). Weights that are neither local nor
        downloadable are a :class:`~storymem.hub.MissingWeightsError` naming them."""
        if self._model is None:
            import open_clip

            self.check_available()
            quick_gelu = self.force_quick_gelu
            if quick_gelu is None and self.pretrained and not os.path.isfile(self.pretrained):
                quick_gelu = bool(open_clip.get_pretrained_cfg(self.model_name, self.pretrained).get("quick_gelu"))
            quiet = _DropDownloadLog()  # open_clip logs the failure it then raises: one message, ours, is enough
            logging.getLogger().addFilter(quiet)
            try:
                model = open_clip.create_model(
                    self.model_name,
                    pretrained=self.pretrained,
                    precision=self.precision,
                    device=self.device,
                    force_quick_gelu=bool(quick_gelu),
                    cache_dir=self.cache_dir,
                )
            except Exception:
                missing = self._missing_weights()  # the download failed: say so, not how it failed
                if missing is not None:
                    raise missing from None
                raise
            finally:
                logging.getLogger().removeFilter(quiet)
            self._prepare_model(model)
        return self

    def _prepare_model(self, model: torch.nn.Module) -> None:
        import open_clip

        model.eval().requires_grad_(False)
        model.to(self.device)
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), dtype=torch.float32).view(1, 3, 1, 1)
        self._preprocess = (size, mean.to(self.device), std.to(self.device))
        self._model = model

    @property
    def model(self) -> torch.nn.Module:
        self.load()
        return self._model

    @property
    def input_size(self) -> tuple[int, int]:
        self.load()
        return self._preprocess[0]

    @property
    def _dtype(self) -> torch.dtype:
        return next(self._model.parameters()).dtype

    # ------------------------------------------------------------------------------------------ images

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 [H, W, 3] images (one size) -> normalised model input [N, 3, h, w] on the model's device."""
        size, mean, std = self._preprocess
        batch = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
        return ((batch - mean) / std).to(self._dtype)

    @torch.no_grad()
    def embed(self, images: Any) -> torch.Tensor:
        """L2-normalised image embeddings [N, D] (float32, CPU), in the order given."""
        images = uint8_images(images)
        self.load()
        if not images:
            return torch.zeros(0, self.embedding_dim)
        out: list[torch.Tensor | None] = [None] * len(images)
        for indices in _group_by_size(images).values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                features = self._model.encode_image(self.preprocess([images[i] for i in chunk]))
                self.num_forwards += 1
                self.num_images += len(chunk)
                features = F.normalize(features.float(), dim=-1).cpu()
                for row, i in enumerate(chunk):
                    out[i] = features[row]
        return torch.stack(out)

    # ------------------------------------------------------------------------------------------ text

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.model_name, cache_dir=self.cache_dir)
        return self._tokenizer

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings [N, D] (float32, CPU) in the same space as `embed`."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("embed_text expects a list of strings")
        self.load()
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.embedding_dim)
        rows = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[start : start + self.batch_size]).to(self.device)
            rows.append(F.normalize(self._model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(rows)

    @property
    def embedding_dim(self) -> int:
        self.load()
        visual = getattr(self._model, "visual", None)
        dim = getattr(visual, "output_dim", None)
        if dim is None:
            proj = getattr(self._model, "text_projection", None)
            dim = proj.shape[-1] if isinstance(proj, torch.Tensor) else None
        if dim is None:
            raise AttributeError("cannot tell the embedding size of this open_clip model")
        return int(dim)

    def __repr__(self) -> str:
        return (
            f"OpenCLIPEmbedder(model_name={self.model_name!r}, pretrained={self.pretrained!r}, "
            f"device={str(self.device)!r})"
        )


class PixelEmbedder:
    """A weight-free, deterministic embedder: each image is downsampled to a `size` x `size` RGB grid
    (bilinear, antialiased), flattened, centred (its mean removed, so the cosine of two images is the
    correlation of their thumbnails) and L2-normalised. Flat images, which have nothing left after centring,
    all map to one fixed unit vector orthogonal to every non-flat embedding.

    Useful where CLIP is not worth loading: toy renders, tests, a cheap similarity for quick previews.
    """

    def __init__(self, size: int = 16, batch_size: int = 256):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.size = int(size)
        self.batch_size = int(batch_size)
        self.num_forwards = 0
        self.num_images = 0

    @property
    def embedding_dim(self) -> int:
        return 3 * self.size * self.size

    @torch.no_grad()
    def embed(self, images: Any) -> torch.Tensor:
        images = uint8_images(images)
        out = torch.zeros(len(images), self.embedding_dim)
        for indices in _group_by_size(images).values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                # float64 throughout, so a flat image stays exactly flat and is recognised as such below
                batch = torch.from_numpy(np.stack([images[i] for i in chunk])).double().permute(0, 3, 1, 2)
                grid = F.interpolate(batch, size=(self.size, self.size), mode="bilinear", antialias=True)
                flat = grid.flatten(1) / 255.0
                flat = flat - flat.mean(dim=1, keepdim=True)
                norms = flat.norm(dim=1, keepdim=True)
                flat = torch.where(
                    norms > 1e-9, flat / norms.clamp_min(1e-12), torch.full_like(flat, self.embedding_dim**-0.5)
                )
                out[chunk] = flat.float()
                self.num_forwards += 1
                self.num_images += len(chunk)
        return out

    def __repr__(self) -> str:
        return f"PixelEmbedder(size={self.size})"
