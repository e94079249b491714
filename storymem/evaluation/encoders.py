"""Evaluation models: video-text encoders and per-frame aesthetic scorers behind two small interfaces.

* :class:`OpenCLIPVideoEncoder` - open_clip, a video's embedding is the mean of its frames' (the default);
* :class:`ViCLIPEncoder` - ViCLIP (InternVid) from its released checkpoint, 8 frames per video;
* :class:`PixelBagOfWordsEncoder` - not CLIP: pixel thumbnails for videos, a bag of words for texts, for
  worlds CLIP does not know (the toy world) - cross-shot consistency only;
* :class:`LaionAestheticScorer` - the LAION aesthetic predictor head on CLIP ViT-L/14 image embeddings;
* :class:`HPSv3FrameScorer` - HPSv3 through :class:`storymem.memory.hpsv3.HPSv3Scorer`.

Every model file is read safely (safetensors, or ``torch.load(weights_only=True)``) and strictly: missing or
unexpected keys are named.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from storymem.devices import default_device, torch_dtype

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "EvalError",
    "FrameScorer",
    "HPSv3FrameScorer",
    "LaionAestheticScorer",
    "OpenCLIPVideoEncoder",
    "PixelBagOfWordsEncoder",
    "ViCLIPEncoder",
    "ViCLIPVisionTransformer",
    "VideoTextEncoder",
    "clip_center_crop",
    "clip_label",
    "load_aesthetic_head",
    "sample_frame_indices",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EvalError(ValueError):
    """The evaluation inputs are inconsistent (folder, manifest, story) or a model file is unusable."""


# ---------------------------------------------------------------------------------------------- interfaces


@runtime_checkable
class VideoTextEncoder(Protocol):
    """A joint video-text embedding space.

    `name` describes the model (it is written into the report). `num_frames`, when not None, is the exact
    number of frames the model takes per video (ViCLIP: 8); None lets the evaluator choose. An encoder whose
    video and text embeddings do not share one space says so with ``aligned = False`` (then video-text
    similarities, i.e. prompt following, are not computed).
    """

    name: str
    num_frames: int | None

    def embed_video(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames [N, H, W, 3] -> one L2-normalised embedding [D]."""
        ...

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> L2-normalised embeddings [len(texts), D]."""
        ...


@runtime_checkable
class FrameScorer(Protocol):
    """A per-frame quality score. `name` and `scale` (what the numbers mean) go into the report."""

    name: str
    scale: str

    def score_frames(self, frames: np.ndarray, prompt: str) -> list[float]:
        """uint8 frames [N, H, W, 3] -> one score per frame."""
        ...


def clip_label(model_name: str, pretrained) -> str:
    """How a report names an open_clip model: ``ViT-L-14/openai``, or ``ViT-L-14 (random weights)``."""
    if pretrained is None:
        return f"{model_name} (random weights)"
    return f"{model_name}/{Path(pretrained).name if Path(str(pretrained)).is_file() else pretrained}"


def sample_frame_indices(num_frames: int, count: int) -> list[int]:
    """VBench's "middle" sampling: split [0, num_frames) into `count` equal segments and take the middle of
    each; a video shorter than `count` frames is padded with its last frame."""
    if num_frames < 1 or count < 1:
        raise ValueError(f"need num_frames >= 1 and count >= 1, got {num_frames} and {count}")
    taken = min(count, num_frames)
    bounds = np.linspace(0, num_frames, taken + 1).astype(int)
    indices = [int((bounds[i] + bounds[i + 1] - 1) // 2) for i in range(taken)]
    return indices + [indices[-1]] * (count - taken)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


# ---------------------------------------------------------------------------------------------- open_clip


class OpenCLIPVideoEncoder:
    """open_clip image-text model; a video's embedding is the mean of its frames' embeddings, re-normalised.

    Wraps `storymem.memory.embedders.OpenCLIPEmbedder` (the keyframe selector's embedder). Frames get CLIP's
    evaluation preprocessing first, as VBench does: bicubic resize of the short side to the model's input
    size, then a centre crop (the keyframe selector squashes whole frames instead).
    """

    num_frames = None

    def __init__(self, embedder, name: str | None = None):
        self.embedder = embedder
        model_name = getattr(embedder, "model_name", type(embedder).__name__)
        model = clip_label(model_name, getattr(embedder, "pretrained", None))
        self.name = name or f"open_clip {model}, frame-averaged"

    @classmethod
    def load(
        cls,
        model_name: str = "ViT-L-14",
        pretrained: str | None = "openai",
        device=None,
        batch_size: int = 32,
        dtype: str | torch.dtype = "float32",
    ) -> OpenCLIPVideoEncoder:
        from storymem.memory.embedders import OpenCLIPEmbedder

        embedder = OpenCLIPEmbedder(
            model_name=model_name, pretrained=pretrained, device=device, batch_size=batch_size, precision=dtype
        )
        embedder.check_available()  # offline: name the weights to download now, not after the videos are read
        return cls(embedder)

    @torch.no_grad()
    def embed_video(self, frames: np.ndarray) -> torch.Tensor:
        per_frame = self.embedder.embed(clip_center_crop(frames, self.embedder.input_size))
        return _normalize(per_frame.float().mean(dim=0))

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        return _normalize(self.embedder.embed_text(list(texts)))


class PixelBagOfWordsEncoder:
    """A video-text encoder that is not CLIP: for worlds CLIP has never seen (the toy world) and for tests.

    A video's embedding is the mean of its frames' :class:`~storymem.memory.embedders.PixelEmbedder`
    embeddings (centred ``size`` x ``size`` RGB thumbnails), re-normalised; a text's is its normalised bag of
    words over ``vocabulary`` (lower-cased letter runs; other words are ignored). The two sit in separate
    blocks of one vector, so video-video similarities (cross-shot consistency) and text-text similarities
    (top-k prompt pairing) are meaningful, and every video-text similarity is 0: ``aligned`` is False and the
    evaluator skips prompt following.
    """

    num_frames = None
    aligned = False

    def __init__(self, vocabulary: Sequence[str], size: int = 16):
        from storymem.memory.embedders import PixelEmbedder

        words = list(dict.fromkeys(str(w).lower() for w in vocabulary))
        if not words:
            raise EvalError("PixelBagOfWordsEncoder needs a non-empty vocabulary")
        self.vocabulary = {w: i for i, w in enumerate(words)}
        self.embedder = PixelEmbedder(size=size)
        self.name = f"not CLIP: pixel {size}x{size} thumbnails + bag of words over {len(words)} words"

    @property
    def embedding_dim(self) -> int:
        return self.embedder.embedding_dim + len(self.vocabulary)

    @torch.no_grad()
    def embed_video(self, frames: np.ndarray) -> torch.Tensor:
        pixels = _normalize(self.embedder.embed(frames).mean(dim=0))
        return torch.cat([pixels, torch.zeros(len(self.vocabulary))])

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        counts = torch.zeros(len(texts), len(self.vocabulary))
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", str(text).lower()):
                column = self.vocabulary.get(word)
                if column is not None:
                    counts[row, column] += 1.0
        # A text with no known word stays the zero vector: similar to nothing.
        return torch.cat([torch.zeros(len(texts), self.embedder.embedding_dim), _normalize(counts)], dim=1)


def clip_center_crop(frames: np.ndarray, size: int | tuple[int, int], chunk: int = 16) -> np.ndarray:
    """CLIP's evaluation resize on uint8 frames [N, H, W, 3]: short side to `size` (bicubic, antialiased),
    then a centre crop; returns uint8 [N, h, w, 3]. Works `chunk` frames at a time to bound memory."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    h, w = (size, size) if isinstance(size, int) else size
    out = []
    for start in range(0, len(frames), chunk):
        video = torch.from_numpy(np.ascontiguousarray(frames[start : start + chunk])).permute(0, 3, 1, 2)
        video = TF.resize(video, min(h, w), interpolation=InterpolationMode.BICUBIC, antialias=True)
        out.append(TF.center_crop(video, [h, w]).permute(0, 2, 3, 1).numpy())
    return np.ascontiguousarray(np.concatenate(out))


# ---------------------------------------------------------------------------------------------- ViCLIP


class ViCLIPVisionTransformer(nn.Module):
    """ViCLIP's video tower (InternVid release): a CLIP ViT whose patch embedding is a Conv3d of temporal
    size `kernel_size`, with a learnt temporal position embedding; all frames' patches attend jointly and
    the class token is projected. State-dict names follow the released checkpoint (``vision_encoder.*``)."""

    def __init__(
        self,
        input_resolution: int = 224,
        patch_size: int = 14,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        output_dim: int = 768,
        kernel_size: int = 1,
        num_frames: int = 8,
    ):
        super().__init__()
        from open_clip.transformer import LayerNorm, QuickGELU, Transformer

        self.input_resolution = input_resolution
        self.num_frames = num_frames
        self.conv1 = nn.Conv3d(
            3, width, (kernel_size, patch_size, patch_size), (kernel_size, patch_size, patch_size), bias=False
        )
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.temporal_positional_embedding = nn.Parameter(torch.zeros(1, num_frames // kernel_size, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, act_layer=QuickGELU, norm_layer=LayerNorm)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] (CLIP-normalised) -> [B, output_dim]."""
        x = self.conv1(video)  # [B, C, T', h, w]
        B, C, T, H, W = x.shape
        x = x.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)
        cls = self.class_embedding.to(x.dtype).expand(B * T, 1, C)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        cls_tokens, x = x[:B, :1], x[:, 1:]
        # Temporal position per patch, then the release's token order: patch-major, time-minor.
        x = x.reshape(B, T, H * W, C).permute(0, 2, 1, 3)  # [B, n, T, C]
        if T == 1:
            x = x + self.temporal_positional_embedding.mean(1)
        else:
            x = x + self.temporal_positional_embedding.unsqueeze(0)
        x = x.reshape(B, H * W * T, C)
        x = self.ln_pre(torch.cat([cls_tokens, x], dim=1))
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj


class ViCLIPEncoder:
    """ViCLIP (InternVid) video-text encoder, loaded from its released checkpoint.

    The checkpoint (``ViClip-InternVid-10M-FLT.pth``: ``{"model": state_dict}``, or a ``.safetensors`` holding
    that state dict) must load with ``torch.load(weights_only=True)``. The architecture is read from the
    tensor shapes (ViT-L/14 video tower over 8 frames at 224 px; 12-layer CLIP text tower with a 32-token
    context); attention heads default to width / 64 as in CLIP. Preprocessing is VBench's: 8 frames by middle
    sampling, bicubic resize of the short side to 224, centre crop, CLIP mean/std.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = torch.float32,
        vision_heads: int | None = None,
        text_heads: int | None = None,
    ):
        from open_clip.tokenizer import SimpleTokenizer
        from open_clip.transformer import QuickGELU, TextTransformer

        checkpoint = Path(checkpoint)
        state = _load_viclip_state_dict(checkpoint)
        vision = {k[len("vision_encoder.") :]: v for k, v in state.items() if k.startswith("vision_encoder.")}
        text = {k[len("text_encoder.") :]: v for k, v in state.items() if k.startswith("text_encoder.")}
        unexpected = sorted(k for k in state if not k.startswith(("vision_encoder.", "text_encoder.")) and k != "temp")
        if unexpected:
            raise EvalError(f"{checkpoint}: unexpected keys in the ViCLIP checkpoint: {', '.join(unexpected[:8])}")

        try:
            conv = vision["conv1.weight"]  # [width, 3, k, p, p]
            width, _, kernel, patch, _ = conv.shape
            grid = round(math.sqrt(vision["positional_embedding"].shape[0] - 1))
            v_layers = _count_layers(vision, "transformer.resblocks.")
            t_width = text["token_embedding.weight"].shape[1]
            vocab = text["token_embedding.weight"].shape[0]
            context = text["positional_embedding"].shape[0]
            t_layers = _count_layers(text, "transformer.resblocks.")
            self.vision = ViCLIPVisionTransformer(
                input_resolution=grid * patch,
                patch_size=patch,
                width=width,
                layers=v_layers,
                heads=vision_heads or max(1, width // 64),
                output_dim=vision["proj"].shape[1],
                kernel_size=kernel,
                num_frames=vision["temporal_positional_embedding"].shape[1] * kernel,
            )
            self.text = TextTransformer(
                context_length=context,
                vocab_size=vocab,
                width=t_width,
                heads=text_heads or max(1, t_width // 64),
                layers=t_layers,
                output_dim=text["text_projection"].shape[1],
                act_layer=QuickGELU,
            )
        except (KeyError, ValueError, IndexError) as err:
            raise EvalError(f"{checkpoint}: not a ViCLIP checkpoint (cannot read its shapes: {err})") from None
        _load_strict(self.vision, vision, checkpoint, "vision_encoder.")
        _load_strict(self.text, text, checkpoint, "text_encoder.")

        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype = torch_dtype(dtype)
        self.vision.to(self.device, dtype).eval()
        self.text.to(self.device, dtype).eval()
        self.tokenizer = SimpleTokenizer(context_length=context)
        self.num_frames = self.vision.num_frames
        self.resolution = self.vision.input_resolution
        self.name = f"ViCLIP {checkpoint.name} ({self.num_frames} frames, {self.resolution}px)"

    def _preprocess(self, frames: np.ndarray) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        frames = frames[sample_frame_indices(len(frames), self.num_frames)]
        video = torch.from_numpy(clip_center_crop(frames, self.resolution)).permute(0, 3, 1, 2).float().div_(255.0)
        video = TF.normalize(video, CLIP_MEAN, CLIP_STD)
        return video.permute(1, 0, 2, 3)  # [3, T, H, W]

    @torch.no_grad()
    def embed_video(self, frames: np.ndarray) -> torch.Tensor:
        video = self._preprocess(frames).unsqueeze(0).to(self.device, self.dtype)
        return _normalize(self.vision(video)[0]).cpu()

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return _normalize(self.text(tokens)).cpu()


def _count_layers(state: dict, prefix: str) -> int:
    blocks = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    if not blocks:
        raise KeyError(prefix + "0")
    return max(blocks) + 1


def _load_strict(module: nn.Module, state: dict, path: Path, prefix: str) -> None:
    expected = module.state_dict()
    missing = sorted(prefix + k for k in expected if k not in state)
    unexpected = sorted(prefix + k for k in state if k not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append("unexpected " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
        raise EvalError(f"{path}: ViCLIP checkpoint does not match the model: {'; '.join(parts)}")
    for key, value in state.items():
        if expected[key].shape != value.shape:
            raise EvalError(
                f"{path}: ViCLIP tensor {prefix}{key} has shape {list(value.shape)}, "
                f"expected {list(expected[key].shape)}"
            )
    module.load_state_dict(state)


def _load_weights(path: Path, what: str) -> dict:
    """A state dict from .safetensors, or from a torch file loaded with weights_only=True."""
    if not path.is_file():
        raise EvalError(f"{path}: {what} file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors vary by content; report them uniformly
        raise EvalError(
            f"{path}: cannot load the {what} with torch.load(weights_only=True) ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); re-save its state dict as .safetensors"
        ) from None


def _load_viclip_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = _load_weights(path, "ViCLIP checkpoint")
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvalError(f"{path}: expected a ViCLIP state dict (tensors under 'model'), got {type(state).__name__}")
    return state


# ---------------------------------------------------------------------------------------------- aesthetic


def load_aesthetic_head(path: str | Path) -> nn.Linear:
    """The LAION aesthetic predictor head (``sa_0_4_vit_l_14_linear.pth``: a Linear(768, 1) state dict)."""
    path = Path(path)
    state = _load_weights(path, "aesthetic head")
    if not isinstance(state, dict) or set(state) != {"weight", "bias"}:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise EvalError(f"{path}: expected a Linear state dict with keys ['bias', 'weight'], got {keys}")
    weight, bias = state["weight"], state["bias"]
    if weight.ndim != 2 or weight.shape[0] != 1 or bias.shape != (1,):
        raise EvalError(
            f"{path}: expected weight [1, D] and bias [1], got {list(weight.shape)} and {list(bias.shape)}"
        )
    head = nn.Linear(weight.shape[1], 1)
    head.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return head.eval()


class LaionAestheticScorer:
    """LAION aesthetic predictor: Linear head on L2-normalised CLIP image embeddings; scores are divided by
    10 as in VBench's aesthetic quality (so the paper's 0.61 is a LAION score of 6.1)."""

    scale = "LAION aesthetic score / 10 (VBench), about 0..1"

    def __init__(self, head: nn.Linear, embedder, name: str = "LAION aesthetic predictor"):
        self.head = head.float().eval()
        self.embedder = embedder
        self.name = name

    @classmethod
    def load(
        cls,
        head_path: str | Path,
        clip_model: str = "ViT-L-14",
        pretrained: str | None = "openai",
        device=None,
        batch_size: int = 32,
        dtype: str | torch.dtype = "float32",
        embedder=None,
    ) -> LaionAestheticScorer:
        """Load the head; reuse `embedder` when given (it must be that CLIP), else build an OpenCLIPEmbedder."""
        head = load_aesthetic_head(head_path)
        if embedder is None:
            from storymem.memory.embedders import OpenCLIPEmbedder

            embedder = OpenCLIPEmbedder(
                model_name=clip_model, pretrained=pretrained, device=device, batch_size=batch_size, precision=dtype
            )
            embedder.check_available()
        name = f"LAION aesthetic {Path(head_path).name} on open_clip {clip_label(clip_model, pretrained)}"
        return cls(head, embedder, name=name)

    @torch.no_grad()
    def score_frames(self, frames: np.ndarray, prompt: str = "") -> list[float]:
        embeddings = _normalize(self.embedder.embed(clip_center_crop(frames, self.embedder.input_size)))
        if embeddings.shape[-1] != self.head.in_features:
            raise EvalError(
                f"aesthetic head expects {self.head.in_features}-d CLIP embeddings but the CLIP model gives "
                f"{embeddings.shape[-1]}-d (the LAION head needs ViT-L/14)"
            )
        scores = self.head.to(embeddings.device)(embeddings).squeeze(-1) / 10.0
        return [float(s) for s in scores.cpu()]


class HPSv3FrameScorer:
    """HPSv3 (`storymem.memory.hpsv3.HPSv3Scorer`) as a frame quality score, with the empty prompt the
    release uses for keyframes. Its numbers (the preference model's mu) are on their own scale, not LAION's."""

    scale = "HPSv3 mu (empty prompt); not comparable with the LAION aesthetic score"

    def __init__(self, scorer, name: str = "HPSv3"):
        self.scorer = scorer
        self.name = name

    def score_frames(self, frames: np.ndarray, prompt: str = "") -> list[float]:
        return [float(s) for s in self.scorer.score(frames, None)]
