"""StoryMem adapters: configs, saving, and strict loading of storymem and published StoryMem weights.

Two on-disk formats are read:

* **storymem adapters** (what :func:`save_storymem_lora` and the trainer write)::

      adapter/
        storymem_adapter.json      StoryMemLoraConfig (rank, alpha, rsLoRA, targets, rope mode, stride, ...)
        high_noise.safetensors     diffusers LoRA layout ("transformer.blocks.N....lora_A.weight") + peft
        low_noise.safetensors      config in the safetensors metadata, so diffusers' own
                                   ``pipe.load_lora_weights(adapter, weight_name=...)`` reads them too

* **published StoryMem folders** (``Wan2.2-MI2V-A14B/``, ``Wan2.2-MM2V-A14B/``): ``backbone_high_noise`` and
  ``backbone_low_noise`` as ``.safetensors`` or ``.pth``, keys as peft writes them on the original WanModel
  (``base_model.model.blocks.7.self_attn.q.lora_A.weight``), from a local folder or a hub repository. They are
  renamed with diffusers' Wan LoRA converter and loaded with rank 128, alpha 128 and rsLoRA (scale
  alpha/sqrt(r)), with the memory RoPE ``"negative"``: memory frame ``j`` of ``fm`` at time position
  ``-(fm - j) * 5``, the shot at ``0 .. f-1``. That is how the weights were trained (the authors' own training
  code, and their fixed inference release of January 2026).

**When to use ``memory_rope="contiguous"``.** The first public release (December 2025) left the negative shift
out of its inference code and placed memory and shot at ``0 .. fm + f - 1``. Pass ``memory_rope="contiguous"``
(to :func:`load_storymem_lora`, to the pipeline call, or ``--memory-rope contiguous`` to ``storymem render``)
only to reproduce videos made with that release, or for an adapter that was itself trained with contiguous
positions (its ``storymem_adapter.json`` then says so and nothing needs to be passed).

Loading is strict: a missing, unexpected or mis-shaped key raises :class:`AdapterError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .atomic import atomic_write_json
from .defaults import ROPE_STRIDE
from .rope import ROPE_MODES

__all__ = [
    "AdapterError",
    "StoryMemLoraConfig",
    "TARGET_MODULES",
    "ORIGINAL_TO_DIFFUSERS",
    "add_storymem_adapter",
    "load_storymem_lora",
    "save_storymem_lora",
    "read_published_state_dict",
    "convert_published_state_dict",
]

ADAPTER_CONFIG_NAME = "storymem_adapter.json"
EXPERT_FILES = {"transformer": "high_noise.safetensors", "transformer_2": "low_noise.safetensors"}
PUBLISHED_STEMS = {"transformer": "backbone_high_noise", "transformer_2": "backbone_low_noise"}
PUBLISHED_VARIANTS = {"Wan2.2-MI2V-A14B": "mi2v", "Wan2.2-MM2V-A14B": "mm2v"}

# Original WanModel module names -> diffusers WanTransformer3DModel names.
ORIGINAL_TO_DIFFUSERS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
TARGET_MODULES = list(ORIGINAL_TO_DIFFUSERS.values())


class AdapterError(ValueError):
    """An adapter file does not match the model or the adapter format."""


@dataclass
class StoryMemLoraConfig:
    """Configuration of a StoryMem adapter (one per expert, same config for both).

    ``use_rslora`` scales the update by ``alpha / sqrt(rank)`` (11.3137 for 128/128) instead of
    ``alpha / rank``. ``memory_rope`` records which rope placement the adapter was trained with.
    """

    rank: int = 128
    alpha: float = 128.0
    use_rslora: bool = True
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(TARGET_MODULES))
    memory_rope: str = "negative"
    memory_rope_stride: int = ROPE_STRIDE
    # Conditioning the adapter was trained for: "m2v" (memory only), "mi2v" (+ first frame), "mm2v" (+ 5 frames).
    conditioning: str = "mi2v"
    experts: list[str] = field(default_factory=lambda: ["transformer", "transformer_2"])
    base_model: Optional[str] = None
    source: str = "storymem"

    def __post_init__(self):
        if self.rank < 1:
            raise AdapterError(f"rank must be >= 1, got {self.rank}")
        if self.memory_rope not in ROPE_MODES:
            raise AdapterError(f"memory_rope must be one of {ROPE_MODES}, got {self.memory_rope!r}")
        if self.conditioning not in ("m2v", "mi2v", "mm2v"):
            raise AdapterError(f"conditioning must be m2v, mi2v or mm2v, got {self.conditioning!r}")
        unknown = [e for e in self.experts if e not in EXPERT_FILES]
        if unknown:
            raise AdapterError(f"unknown experts {unknown}; expected a subset of {list(EXPERT_FILES)}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def peft_kwargs(self) -> dict:
        """LoraConfig keyword arguments; also stored as diffusers' ``lora_adapter_metadata``."""
        return dict(r=self.rank, lora_alpha=self.alpha, use_rslora=self.use_rslora, lora_dropout=self.dropout,
                    target_modules=list(self.target_modules), init_lora_weights=True, bias="none")

    def to_peft_config(self):
        from peft import LoraConfig

        return LoraConfig(**self.peft_kwargs())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "StoryMemLoraConfig":
        if not isinstance(data, dict):
            raise AdapterError(f"{source}: adapter config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise AdapterError(f"{source}: unknown adapter config fields {unknown}; known: {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise AdapterError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path) -> "StoryMemLoraConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise AdapterError(f"{path}: adapter config not found") from None
        except json.JSONDecodeError as e:
            raise AdapterError(f"{path}: invalid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))

    def save(self, path):
        atomic_write_json(path, self.to_dict())

    @classmethod
    def published(cls, conditioning: str = "mi2v", rank: int = 128) -> "StoryMemLoraConfig":
        """The config of the published StoryMem weights: rank 128, alpha 128, rsLoRA, dropout 0.05, and the
        negative memory RoPE at stride 5 they were trained with."""
        return cls(rank=rank, alpha=128.0, use_rslora=True, dropout=0.05, memory_rope="negative",
                   memory_rope_stride=ROPE_STRIDE, conditioning=conditioning, source="published")


# ---------------------------------------------------------------------------------------------- helpers
def expected_lora_shapes(transformer, config: StoryMemLoraConfig, prefix: str = "transformer.") -> dict:
    """{key: shape} of every LoRA tensor ``config`` puts on ``transformer`` (diffusers naming)."""
    shapes = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) and not hasattr(module, "base_layer"):
            continue
        if ".lora_" in name or name.endswith(".base_layer"):
            continue
        if any(name == t or name.endswith("." + t) for t in config.target_modules):
            base = getattr(module, "base_layer", module)
            shapes[f"{prefix}{name}.lora_A.weight"] = (config.rank, base.in_features)
            shapes[f"{prefix}{name}.lora_B.weight"] = (base.out_features, config.rank)
    return shapes


def _summarise(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def validate_lora_state_dict(state_dict: dict, transformer, config: StoryMemLoraConfig, source: str):
    """Raise :class:`AdapterError` naming missing, unexpected or mis-shaped keys."""
    expected = expected_lora_shapes(transformer, config)
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    wrong = [f"{k} {tuple(state_dict[k].shape)} (expected {expected[k]})"
             for k in sorted(set(state_dict) & set(expected)) if tuple(state_dict[k].shape) != expected[k]]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_summarise(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} missing keys: {_summarise(missing)}")
    if wrong:
        problems.append(f"{len(wrong)} keys of the wrong shape (rank {config.rank}): {_summarise(wrong)}")
    if problems:
        raise AdapterError(f"{source}: adapter does not match the model: " + "; ".join(problems))


def _load_tensor_file(path: Path) -> tuple[dict, dict]:
    """(state_dict, metadata) from .safetensors, or .pth/.pt/.bin read with weights_only=True."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # safetensors raises its own error types
            raise AdapterError(f"{path}: cannot read safetensors file ({e})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterError(f"{path}: cannot read checkpoint with weights_only=True ({e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AdapterError(f"{path}: expected a dict of tensors")
    return obj, {}


# ---------------------------------------------------------------------------------------------- published
_PUBLISHED_KEY = re.compile(r"^(?:base_model\.model\.|diffusion_model\.)?blocks\.(\d+)\.(.+)\.(lora_A|lora_B)\.weight$")


def read_published_state_dict(path) -> dict:
    state_dict, _ = _load_tensor_file(Path(path))
    return state_dict


def convert_published_state_dict(state_dict: dict, num_blocks: int, source: str) -> tuple[dict, int]:
    """Published (peft on WanModel) keys -> diffusers keys, via diffusers' Wan LoRA converter.

    Returns ``(converted, rank)``. Refuses unknown keys and blocks outside ``0..num_blocks-1``.
    """
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    unexpected, ranks, renamed = [], set(), {}
    for key, value in state_dict.items():
        m = _PUBLISHED_KEY.match(key)
        if m is None or m.group(2) not in ORIGINAL_TO_DIFFUSERS or int(m.group(1)) >= num_blocks:
            if key.endswith(".alpha"):
                continue  # alpha is fixed by the published recipe (128, rsLoRA); a stored one is ignored
            unexpected.append(key)
            continue
        ranks.add(value.shape[0] if m.group(3) == "lora_A" else value.shape[1])
        # Copies: the converter may rescale tensors in place.
        renamed[f"diffusion_model.blocks.{m.group(1)}.{m.group(2)}.{m.group(3)}.weight"] = value.clone()
    if unexpected:
        raise AdapterError(f"{source}: {len(unexpected)} unexpected keys for a StoryMem adapter: "
                           f"{_summarise(unexpected)}")
    if not renamed:
        raise AdapterError(f"{source}: no LoRA weights found")
    if len(ranks) != 1:
        raise AdapterError(f"{source}: inconsistent LoRA ranks {sorted(ranks)}")
    converted = WanLoraLoaderMixin.lora_state_dict(renamed)
    return converted, ranks.pop()


def _find_published_file(folder: Path, stem: str) -> Optional[Path]:
    for ext in (".safetensors", ".pth", ".pt", ".bin"):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


# ---------------------------------------------------------------------------------------------- api
def add_storymem_adapter(transformer, config: StoryMemLoraConfig, adapter_name: str = "storymem"):
    """Attach a fresh (trainable) adapter to a Wan transformer."""
    transformer.add_adapter(config.to_peft_config(), adapter_name=adapter_name)
    return transformer


def save_storymem_lora(folder, transformers: dict, config: StoryMemLoraConfig, adapter_name: str = "storymem"):
    """Write ``storymem_adapter.json`` and one safetensors file per expert, each file atomically.

    ``transformers`` maps ``"transformer"`` / ``"transformer_2"`` to models carrying the adapter, or to LoRA
    state dicts already in peft's saved naming (``blocks.0.attn1.to_q.lora_A.weight``), e.g. gathered from
    FSDP shards.
    """
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    experts = []
    for expert, source in transformers.items():
        if source is None:
            continue
        if expert not in EXPERT_FILES:
            raise AdapterError(f"unknown expert {expert!r}; expected one of {list(EXPERT_FILES)}")
        if isinstance(source, dict):
            state_dict = source
        else:
            model = getattr(source, "module", source)  # DDP / accelerate wrappers
            state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
        if not state_dict:
            raise AdapterError(f"{expert}: no LoRA weights of adapter {adapter_name!r} to save")
        state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        with tempfile.TemporaryDirectory(dir=folder, prefix=".saving-") as tmp:
            WanLoraLoaderMixin.save_lora_weights(tmp, transformer_lora_layers=state_dict,
                                                 weight_name=EXPERT_FILES[expert], safe_serialization=True,
                                                 transformer_lora_adapter_metadata=config.peft_kwargs())
            os.replace(Path(tmp) / EXPERT_FILES[expert], folder / EXPERT_FILES[expert])
        experts.append(expert)
    config = dataclasses.replace(config, experts=experts)
    config.save(folder / ADAPTER_CONFIG_NAME)
    return folder


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def _resolve_folder(path_or_repo, subfolder: Optional[str], **hub_kwargs) -> Path:
    """A local folder, or a hub repository id (``org/name``) fetched with huggingface_hub."""
    path = Path(path_or_repo)
    if not path.exists():
        if not _HUB_ID.match(str(path_or_repo)):
            raise AdapterError(f"{path_or_repo}: adapter folder not found")
        from huggingface_hub import snapshot_download

        patterns = [f"{subfolder}/*"] if subfolder else None
        try:
            path = Path(snapshot_download(str(path_or_repo), allow_patterns=patterns, **hub_kwargs))
        except Exception as e:  # offline, unknown repository, no access: say which adapter could not be had
            raise AdapterError(f"{path_or_repo}: not a local folder, and fetching it from the hub failed ({e})") \
                from None
    if subfolder:
        path = path / subfolder
    if path.is_file():
        raise AdapterError(f"{path}: expected an adapter folder, got a file")
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter folder not found")
    return path


def load_storymem_lora(pipe, path_or_repo, adapter_name: str = "storymem", subfolder: Optional[str] = None,
                       memory_rope: Optional[str] = None, **hub_kwargs) -> StoryMemLoraConfig:
    """Load a storymem adapter or a published StoryMem folder into ``pipe.transformer`` / ``transformer_2``.

    Sets ``pipe.memory_rope`` / ``pipe.memory_rope_stride`` from the adapter's metadata (``"negative"`` for the
    published weights) and returns its config. ``memory_rope`` overrides the recorded placement, e.g.
    ``"contiguous"`` to reproduce the first public release (see the module doc); the returned config then
    carries the override.
    """
    if memory_rope is not None and memory_rope not in ROPE_MODES:
        raise AdapterError(f"memory_rope must be one of {ROPE_MODES}, got {memory_rope!r}")
    folder = _resolve_folder(path_or_repo, subfolder, **hub_kwargs)
    if not (folder / ADAPTER_CONFIG_NAME).exists() and _find_published_file(folder, PUBLISHED_STEMS["transformer"]) \
            is None and _find_published_file(folder, PUBLISHED_STEMS["transformer_2"]) is None:
        variants = [v for v in PUBLISHED_VARIANTS if (folder / v).is_dir()]
        if len(variants) == 1:
            folder = folder / variants[0]
        elif variants:
            raise AdapterError(f"{folder}: holds several published variants {variants}; pass subfolder=one of them")

    plans = []  # (expert, converted state dict, source)
    if (folder / ADAPTER_CONFIG_NAME).exists():
        config = StoryMemLoraConfig.from_file(folder / ADAPTER_CONFIG_NAME)
        for expert in config.experts:
            file = folder / EXPERT_FILES[expert]
            if not file.is_file():
                raise AdapterError(f"{file}: missing (the adapter config lists expert {expert!r})")
            state_dict, _ = _load_tensor_file(file)
            plans.append((expert, state_dict, str(file)))
    else:
        files = {e: _find_published_file(folder, s) for e, s in PUBLISHED_STEMS.items()}
        if not any(files.values()):
            raise AdapterError(f"{folder}: neither {ADAPTER_CONFIG_NAME} nor backbone_high_noise/backbone_low_noise "
                               f"(.safetensors or .pth) found")
        conditioning = PUBLISHED_VARIANTS.get(folder.name, "mi2v")
        rank = None
        for expert, file in files.items():
            if file is None:
                continue
            model = getattr(pipe, expert)
            if model is None:
                raise AdapterError(f"{file}: the pipeline has no {expert} to load it into")
            converted, file_rank = convert_published_state_dict(read_published_state_dict(file),
                                                                 len(model.blocks), str(file))
            if rank is not None and file_rank != rank:
                raise AdapterError(f"{file}: rank {file_rank} differs from the other expert's {rank}")
            rank = file_rank
            plans.append((expert, converted, str(file)))
        config = StoryMemLoraConfig.published(conditioning, rank=rank)
        config.experts = [e for e, _, _ in plans]

    if memory_rope is not None:
        config = dataclasses.replace(config, memory_rope=memory_rope)

    # Validate everything before touching the model, so a bad second file leaves the pipeline unchanged.
    for expert, state_dict, source in plans:
        model = getattr(pipe, expert)
        if model is None:
            raise AdapterError(f"{source}: the pipeline has no {expert} to load it into")
        validate_lora_state_dict(state_dict, model, config, source)
    for expert, state_dict, source in plans:
        model = getattr(pipe, expert)
        was_training = model.training
        # diffusers reads metadata keys under the same prefix as the weights.
        metadata = {f"transformer.{k}": v for k, v in config.peft_kwargs().items()}
        model.load_lora_adapter(dict(state_dict), prefix="transformer", adapter_name=adapter_name, metadata=metadata)
        # peft creates its dropout modules in training mode; an inference model must stay in eval mode.
        model.train(was_training)
    if hasattr(pipe, "memory_rope"):
        pipe.memory_rope = config.memory_rope
        pipe.memory_rope_stride = config.memory_rope_stride
        pipe.storymem_adapter = config
    return config
