"""Shared fixtures for the storymem.memory tests: synthetic shots, deterministic counting scorers/embedders,
and tiny offline open_clip / Qwen2-VL (HPSv3) builds. Nothing here downloads anything."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from storymem.memory.images import resize_for_scoring


# ---------------------------------------------------------------------------------------------- videos


def smooth_world(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random RGB texture (float32 in [0, 255])."""
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.uniform(0, 255, (1, 3, height, width)).astype(np.float32))
    smooth = F.avg_pool2d(F.avg_pool2d(noise, 9, 1, 4, count_include_pad=False), 9, 1, 4, count_include_pad=False)
    smooth = (smooth - smooth.amin()) / (smooth.amax() - smooth.amin()) * 255.0
    return smooth[0].permute(1, 2, 0).numpy()


def pan_video(num_frames: int = 24, height: int = 40, width: int = 56, speed: float = 1.0, seed: int = 0) -> np.ndarray:
    """A camera panning (by `speed` pixels per frame, sub-pixel) over a smooth texture: similarity to a frame
    falls off with the distance to it, and no two frames are identical."""
    world = smooth_world(height, width + int(np.ceil(speed * num_frames)) + 2, seed)
    frames = []
    for i in range(num_frames):
        offset = i * speed
        k, a = int(np.floor(offset)), offset - np.floor(offset)
        frames.append((1 - a) * world[:, k : k + width] + a * world[:, k + 1 : k + 1 + width])
    return np.stack(frames).round().astype(np.uint8)


def cut_video(segments: list[int], height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    """Static segments of unrelated textures (hard cuts), `segments[k]` frames each."""
    parts = []
    for k, count in enumerate(segments):
        frame = smooth_world(height, width, seed * 100 + k).round().astype(np.uint8)
        parts.append(np.repeat(frame[None], count, axis=0))
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------- scorers


def frame_key(image) -> str:
    return hashlib.sha1(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)).tobytes()).hexdigest()


class CountingScorer:
    """Scores frames from a per-frame table; records every call and every frame (by index) it scored."""

    def __init__(self, video: np.ndarray, scores):
        resized = resize_for_scoring(video)
        self.index_of = {}
        for i, frame in enumerate(resized):
            self.index_of.setdefault(frame_key(frame), i)
        self.table = [float(s) for s in scores]
        self.calls: list[list[int]] = []

    def score(self, images, prompts=None):
        indices = [self.index_of[frame_key(im)] for im in images]
        self.calls.append(indices)
        return [self.table[i] for i in indices]

    @property
    def scored(self) -> list[int]:
        return [i for call in self.calls for i in call]


class FixedScorer:
    """Returns the given values whatever the images (for bad-output tests)."""

    def __init__(self, values):
        self.values = values

    def score(self, images, prompts=None):
        return self.values[: len(images)] if isinstance(self.values, list) else self.values


class CountingEmbedder:
    """Wraps an embedder, counting calls and images."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0
        self.images = 0

    def embed(self, images):
        self.calls += 1
        self.images += len(images)
        return self.inner.embed(images)


# ---------------------------------------------------------------------------------------------- open_clip

TINY_CLIP_NAME = "storymem-test-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


def register_tiny_clip(folder: Path) -> str:
    """Register a tiny open_clip architecture (random weights only) under `TINY_CLIP_NAME`."""
    import open_clip

    path = Path(folder) / f"{TINY_CLIP_NAME}.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return TINY_CLIP_NAME


# ---------------------------------------------------------------------------------------------- Qwen2-VL / HPSv3

# Qwen2-VL-7B-Instruct's chat template (the public one of its processor).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]  # fmt: skip


def build_tiny_qwen2_vl_base(folder: Path):
    """Save a tiny Qwen2-VL processor (word-level tokenizer with Qwen's special tokens) and config to
    `folder`; returns (processor, config)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    words = ["[UNK]", "a", "the", "image", "of", "Please", "provide", "overall", "ratings", "this", ":", "END",
             "system", "user", "assistant", "You", "are", "helpful", ".", "red", "cat", "on", "-", "*"]  # fmt: skip
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(t, special=True) for t in QWEN_SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        unk_token="[UNK]")  # fmt: skip
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config=dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, max_position_embeddings=2048, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        ),
        vision_config=dict(depth=1, embed_dim=16, num_heads=2, hidden_size=32, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
    )  # fmt: skip
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(folder)
    config.save_pretrained(folder)
    return processor, config


def to_hpsv3_layout(state: dict) -> dict:
    """Today's Qwen2VLForConditionalGeneration keys -> the transformers-4.45 keys HPSv3.safetensors uses."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.visual."):
            key = key[len("model.") :]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model.") :]
        out[key] = value
    return out


def build_hpsv3_checkpoint(base: Path, path: Path, seed: int = 0):
    """Write an HPSv3-layout checkpoint for the tiny base: a random Qwen2-VL whose embeddings are resized for
    `<|Reward|>`, plus a random reward head. Returns (stock model in today's naming, rm_head)."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
    from safetensors.torch import save_file

    processor = AutoProcessor.from_pretrained(base)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    config = AutoConfig.from_pretrained(base)
    config.text_config.vocab_size = len(processor.tokenizer)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # give every weight a visible scale so a mis-mapped tensor changes the output
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    hidden = config.text_config.hidden_size
    rm_head = torch.nn.Sequential(
        torch.nn.Linear(hidden, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05), torch.nn.Linear(1024, 16),
        torch.nn.ReLU(), torch.nn.Linear(16, 2),
    ).eval()  # fmt: skip
    with torch.no_grad():
        rm_head[5].bias.copy_(torch.tensor([4.0, -1.0]))
    state = to_hpsv3_layout({k: v.contiguous() for k, v in model.state_dict().items()})
    state.update({f"rm_head.{k}": v.contiguous() for k, v in rm_head.state_dict().items()})
    save_file(state, str(path))
    return model, rm_head
