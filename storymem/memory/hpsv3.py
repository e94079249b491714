"""HPSv3 (a Qwen2-VL-7B-Instruct preference model) on the current transformers, without the `hpsv3` package.

The published `HPSv3.safetensors` was saved from a `Qwen2VLForConditionalGeneration` subclass under
transformers 4.45, with:

* the special token `<|Reward|>` added to the tokenizer and the token embeddings resized to the new vocab;
* a float32 head `rm_head = Sequential(Linear(hidden, 1024), ReLU, Dropout(0.05), Linear(1024, 16), ReLU,
  Linear(16, 2))` applied to the final (normed) hidden state at the `<|Reward|>` token, giving (mu, sigma);
  the score is mu;
* a forward that calls the language model directly, without Qwen2-VL's 3D (M-RoPE) image positions: every
  token sits at its plain sequence index on all three rotary sections. We feed the same positions.

Inputs follow HPSv3's inference: the image is resized (bicubic) to Qwen's `smart_resize` size with
min_pixels = max_pixels = 256 * 28 * 28, and the user message is the image followed by `HPSV3_INSTRUCTION`
(with the prompt filled in) and `HPSV3_REWARD_PROMPT`, rendered with the processor's chat template.

Checkpoint keys of the 4.45 layout (`model.layers.*`, `model.embed_tokens.*`, `model.norm.*`, `visual.*`,
`lm_head.weight`, `rm_head.*`) are mapped onto today's `Qwen2VLModel` names (`model.language_model.*`,
`model.visual.*`); keys already in today's layout are accepted as they are. `lm_head.weight` (the language
model's output layer) plays no part in the reward and is not loaded. Any other missing or unexpected key,
or a shape mismatch, raises `HPSv3CheckpointError` naming them, before the weights are read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..devices import default_device, torch_dtype
from ..hub import cached_file, hub_offline, is_hub_id, missing_weights
from ..images import uint8_images
from .images import IMAGE_FACTOR, smart_resize
from .scorers import check_prompts

REWARD_TOKEN = "<|Reward|>"
HPSV3_IMAGE_PIXELS = 256 * IMAGE_FACTOR * IMAGE_FACTOR
HPSV3_CHECKPOINT_FILE = "HPSv3.safetensors"
HPSV3_HUB_ID = "MizzenAI/HPSv3"
HPSV3_BASE = "Qwen/Qwen2-VL-7B-Instruct"

# HPSv3's instruction (hpsv3/dataset/data_collator_qwen.py), byte for byte: the model was trained on it.
HPSV3_INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""

HPSV3_REWARD_PROMPT = """
Please provide the overall ratings of this image: <|Reward|>

END
"""

_LOCAL_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_IGNORED_KEYS = ("lm_head.weight",)


class HPSv3CheckpointError(ValueError):
    """An HPSv3 checkpoint that does not fit the model: missing, unexpected or mis-shaped keys."""


def hpsv3_user_text(prompt: str = "") -> str:
    """The text part of HPSv3's user message for `prompt` (empty for keyframes)."""
    return HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_REWARD_PROMPT


def hpsv3_messages(image: Any, prompt: str = "", pixels: int = HPSV3_IMAGE_PIXELS) -> list[dict]:
    """One chat conversation as HPSv3 builds it: the image, then the instruction text."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image, "min_pixels": pixels, "max_pixels": pixels},
                {"type": "text", "text": hpsv3_user_text(prompt)},
            ],
        }
    ]


def resize_for_hpsv3(image: np.ndarray, pixels: int = HPSV3_IMAGE_PIXELS):
    """uint8 [H, W, 3] -> PIL image resized (bicubic, like qwen-vl-utils) to `smart_resize(min=max=pixels)`."""
    from PIL import Image

    height, width = image.shape[:2]
    new_h, new_w = smart_resize(height, width, IMAGE_FACTOR, min_pixels=pixels, max_pixels=pixels)
    return Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.BICUBIC)


def convert_hpsv3_key(key: str) -> str | None:
    """A checkpoint key in the current `HPSv3RewardModel` naming; None for keys that are not loaded."""
    if key in _IGNORED_KEYS:
        return None
    if key.startswith(("model.language_model.", "model.visual.", "rm_head.")):
        return key
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    return key


def legacy_hpsv3_key(key: str) -> str:
    """Today's model key -> its name in the transformers-4.45 layout of HPSv3.safetensors."""
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


def _summarise(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


class HPSv3RewardModel(nn.Module):
    """Qwen2-VL's vision tower and language model (today's `Qwen2VLModel`) with HPSv3's reward head."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

        hidden = config.text_config.hidden_size
        self.model = Qwen2VLModel(config)
        self.rm_head = nn.Sequential(
            nn.Linear(hidden, 1024),
            nn.ReLU(),
            nn.Dropout(0.05),
            nn.Linear(1024, 16),
            nn.ReLU(),
            nn.Linear(16, 2),
        ).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        reward_token_id: int,
    ) -> torch.Tensor:
        """(mu, sigma) per sequence, [B, 2] float32."""
        batch, length = input_ids.shape
        is_reward = input_ids == reward_token_id
        counts = is_reward.sum(dim=1)
        if not bool((counts == 1).all()):
            bad = int((counts != 1).nonzero()[0, 0])
            raise ValueError(
                f"HPSv3 input {bad} holds {int(counts[bad])} {REWARD_TOKEN} tokens, expected exactly one "
                f"(a prompt must not contain {REWARD_TOKEN!r})"
            )
        # HPSv3 was trained with plain sequence positions on all three M-RoPE sections (see module doc).
        positions = torch.arange(length, device=input_ids.device).view(1, 1, length).expand(3, batch, length)
        hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            use_cache=False,
        ).last_hidden_state
        return self.rm_head(hidden[is_reward].float())


class HPSv3Scorer:
    """HPSv3 image preference score (mu), batched, model loaded once per scorer (lazily on first use).

    Args:
        checkpoint: a local `HPSv3.safetensors` (or a `.pt`/`.pth` state dict, read with weights_only), a
            folder holding `HPSv3.safetensors`, or a Hugging Face Hub repo id ("MizzenAI/HPSv3").
        base: Qwen2-VL-7B-Instruct's processor and config: a Hub id or a local folder.
        device: default CUDA when available.
        dtype: the model's dtype (bfloat16 like HPSv3; a torch dtype or its name); the reward head always runs in
            float32.
        batch_size: images per forward.
        image_pixels: HPSv3's fixed image area (256 * 28 * 28).
        attn_implementation: transformers attention backend ("sdpa" like HPSv3 without flash-attn).
        cache_dir: Hub download cache.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike = HPSV3_HUB_ID,
        base: str | os.PathLike = HPSV3_BASE,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = torch.bfloat16,
        batch_size: int = 8,
        image_pixels: int = HPSV3_IMAGE_PIXELS,
        attn_implementation: str = "sdpa",
        cache_dir: str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if image_pixels < 4 * IMAGE_FACTOR * IMAGE_FACTOR:
            raise ValueError(f"image_pixels must be >= {4 * IMAGE_FACTOR * IMAGE_FACTOR}, got {image_pixels}")
        self.checkpoint = str(checkpoint)
        self.base = str(base)
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = torch_dtype(dtype)
        self.batch_size = int(batch_size)
        self.image_pixels = int(image_pixels)
        self.attn_implementation = attn_implementation
        self.cache_dir = cache_dir
        self.model: HPSv3RewardModel | None = None
        self.processor = None
        self.reward_token_id: int | None = None
        self.num_calls = 0
        self.num_forwards = 0
        self.num_images = 0
        # Fail on a missing local file now, not after the processor has loaded.
        for what, value in (("checkpoint", self.checkpoint), ("base", self.base)):
            if _looks_local(value) and not os.path.exists(value):
                raise FileNotFoundError(f"HPSv3 {what} not found: {value}")

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike = HPSV3_HUB_ID, **kwargs) -> "HPSv3Scorer":
        """Build and load now."""
        return cls(checkpoint, **kwargs).load()

    # ------------------------------------------------------------------------------------------ loading

    def _checkpoint_file(self) -> Path:
        path = Path(self.checkpoint)
        if path.is_dir():
            candidate = path / HPSV3_CHECKPOINT_FILE
            if not candidate.is_file():
                raise FileNotFoundError(f"no {HPSV3_CHECKPOINT_FILE} in HPSv3 checkpoint folder {path}")
            return candidate
        if path.is_file():
            return path
        if _looks_local(self.checkpoint):
            raise FileNotFoundError(f"HPSv3 checkpoint not found: {self.checkpoint}")
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.checkpoint, HPSV3_CHECKPOINT_FILE, cache_dir=self.cache_dir))

    def missing_repos(self) -> list[str]:
        """The hub repositories of the weights that are not in the local cache (empty: nothing to download)."""
        return [repo for repo, names in ((self.checkpoint, [HPSV3_CHECKPOINT_FILE]), (self.base, ["config.json"]))
                if is_hub_id(repo) and cached_file(repo, names, cache_dir=self.cache_dir) is None]

    def _missing_weights(self):
        """The MissingWeightsError for hub weights not in the local cache (None when all are here)."""
        missing = self.missing_repos()
        if not missing:
            return None
        return missing_weights("HPSv3", missing, instead="do without it (storymem render --aesthetic none)")

    def check_available(self) -> None:
        """Raise :class:`~storymem.hub.MissingWeightsError` now, before anything loads, when weights would have to
        be downloaded but the hub is switched off (``HF_HUB_OFFLINE``)."""
        if hub_offline():
            missing = self._missing_weights()
            if missing is not None:
                raise missing

    def load(self) -> "HPSv3Scorer":
        """Load the processor, the config and the checkpoint now; weights that are neither local nor downloadable
        are a :class:`~storymem.hub.MissingWeightsError` naming them."""
        if self.model is not None:
            return self
        self.check_available()
        try:
            return self._load()
        except Exception as err:
            if isinstance(err, HPSv3CheckpointError):
                raise
            missing = self._missing_weights()  # a download failed: say which weights are missing
            if missing is not None:
                raise missing from None
            raise

    def _load(self) -> "HPSv3Scorer":
        from transformers import AutoConfig, AutoProcessor

        processor = AutoProcessor.from_pretrained(self.base, padding_side="right", cache_dir=self.cache_dir)
        if not getattr(processor, "chat_template", None):
            raise ValueError(f"the processor from {self.base} has no chat template (Qwen2-VL-Instruct's is needed)")
        processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        reward_id = processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        config = AutoConfig.from_pretrained(self.base, cache_dir=self.cache_dir)
        if getattr(config, "model_type", None) != "qwen2_vl":
            raise ValueError(f"{self.base} is a {getattr(config, 'model_type', '?')!r} model; HPSv3 needs qwen2_vl")

        path = self._checkpoint_file()
        shapes = _read_shapes(path)
        embed_target = "model.language_model.embed_tokens.weight"
        embed_key = next((k for k in shapes if convert_hpsv3_key(k) == embed_target), None)
        if embed_key is None:
            raise HPSv3CheckpointError(f"{path}: no token embedding (model.embed_tokens.weight) in the checkpoint")
        num_tokens = shapes[embed_key][0]
        if num_tokens < len(processor.tokenizer) or reward_id >= num_tokens:
            raise HPSv3CheckpointError(
                f"{path}: {embed_key} has {num_tokens} rows but the tokenizer with {REWARD_TOKEN} has "
                f"{len(processor.tokenizer)} tokens; is this an HPSv3 checkpoint for {self.base}?"
            )
        # HPSv3 resized the embeddings to the tokenizer; the config must follow the checkpoint.
        config.text_config.vocab_size = num_tokens
        config._attn_implementation = self.attn_implementation

        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = HPSv3RewardModel(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        renamed = _check_keys(path, shapes, expected)

        state = {}
        for key, tensor in _read_tensors(path, renamed):
            target = renamed[key]
            dtype = torch.float32 if target.startswith("rm_head.") else self.dtype
            state[target] = tensor.to(device=self.device, dtype=dtype)
        model.load_state_dict(state, strict=True, assign=True)
        model.to(self.device).eval().requires_grad_(False)
        self.model, self.processor, self.reward_token_id = model, processor, reward_id
        return self

    # ------------------------------------------------------------------------------------------ scoring

    def prepare_inputs(self, images: Any, prompts: Sequence[str] | None = None):
        """Processor outputs (input_ids, attention_mask, pixel_values, image_grid_thw, ...) for one batch."""
        self.load()
        images = uint8_images(images)
        prompts = check_prompts(prompts, len(images))
        pil = [resize_for_hpsv3(image, self.image_pixels) for image in images]
        conversations = [hpsv3_messages(p, prompt, self.image_pixels) for p, prompt in zip(pil, prompts)]
        text = self.processor.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
        return self.processor(text=text, images=pil, padding=True, return_tensors="pt")

    @torch.inference_mode()
    def rewards(self, images: Any, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """HPSv3's raw output, [N, 2] float32 (mu, sigma), on the CPU."""
        images = uint8_images(images)
        prompts = check_prompts(prompts, len(images))
        self.load()
        self.num_calls += 1
        rows = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            batch = self.prepare_inputs(images[start:stop], prompts[start:stop])
            out = self.model(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device),
                pixel_values=batch["pixel_values"].to(self.device),
                image_grid_thw=batch["image_grid_thw"].to(self.device),
                reward_token_id=self.reward_token_id,
            )
            self.num_forwards += 1
            self.num_images += out.shape[0]
            rows.append(out.float().cpu())
        return torch.cat(rows) if rows else torch.zeros(0, 2)

    def score(self, images: Any, prompts: Sequence[str] | None = None) -> list[float]:
        """HPSv3 mu per image (prompts default to empty, as for keyframes)."""
        return [float(mu) for mu in self.rewards(images, prompts)[:, 0]]

    def __repr__(self) -> str:
        return f"HPSv3Scorer(checkpoint={self.checkpoint!r}, base={self.base!r}, device={str(self.device)!r})"


def _looks_local(value: str) -> bool:
    """A file system path rather than a Hub repo id ("owner/name")."""
    return value.startswith((".", "/", "~")) or value.endswith(_LOCAL_SUFFIXES) or "\\" in value or value.count("/") > 1


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise HPSv3CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    return {k: tuple(v.shape) for k, v in _torch_state(path).items()}


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise HPSv3CheckpointError(f"{path}: not a readable torch state dict ({exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # HPSv3's trainer wraps the state dict this way
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HPSv3CheckpointError(f"{path}: expected a dict of tensors")
    return state


def _read_tensors(path: Path, keys: dict[str, str]):
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for key in keys:
                yield key, f.get_tensor(key)
    else:
        state = _torch_state(path)
        for key in keys:
            yield key, state[key]


def _check_keys(path: Path, shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Checkpoint key -> model key for every loaded key; raises on anything missing, unexpected or mis-shaped."""
    renamed: dict[str, str] = {}
    sources: dict[str, str] = {}
    for key in shapes:
        target = convert_hpsv3_key(key)
        if target is None:
            continue
        if target in sources:
            raise HPSv3CheckpointError(f"{path}: keys {sources[target]!r} and {key!r} both map to {target!r}")
        sources[target] = key
        renamed[key] = target
    missing = [k for k in expected if k not in sources]
    unexpected = [sources[k] for k in sources if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_summarise([legacy_hpsv3_key(k) for k in missing])}")
        if unexpected:
            parts.append(f"unexpected keys: {_summarise(unexpected)}")
        raise HPSv3CheckpointError(f"{path} does not match HPSv3 on Qwen2-VL: " + "; ".join(parts))
    wrong = [
        f"{key} {shapes[key]} (model expects {expected[target]})"
        for key, target in renamed.items()
        if tuple(shapes[key]) != tuple(expected[target])
    ]
    if wrong:
        raise HPSv3CheckpointError(f"{path}: shape mismatch: {_summarise(wrong)}")
    return renamed
