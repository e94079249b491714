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

Loading is strict: a missing, unexpected or mis-shaped key, a tensor that is not floating point or holds a
non-finite value, and a damaged or truncated file raise :class:`AdapterError` naming it.
:func:`check_adapter_files` runs the same checks on the files alone, before any model loads (``storymem render``
does so while it checks its inputs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

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
    "check_adapter_files",
    "check_lora_tensor",
    "iter_tensor_file",
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
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise AdapterError(f"rank must be a whole number >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise AdapterError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or \
                not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout!r}")
        stride = self.memory_rope_stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise AdapterError(f"memory_rope_stride must be a whole number >= 1, got {stride!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise AdapterError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        if not self.experts:
            raise AdapterError("experts is empty: an adapter has weights for at least one expert")
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


def _first_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return text[0].strip() if text else type(err).__name__


def _torch_load(path: Path):
    """A .pth/.pt/.bin checkpoint with ``weights_only=True``, memory-mapped where its format allows."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(str(path), map_location="cpu", weights_only=True)  # the legacy (pre-zip) format


def iter_tensor_file(path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a .safetensors file (read one at a time) or of a .pth/.pt/.bin checkpoint
    (``weights_only=True``, memory-mapped), each checked by :func:`check_lora_tensor`. A damaged or truncated file
    is an :class:`AdapterError` naming it."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield key, check_lora_tensor(f.get_tensor(key), f"{path}: {key}")
            return
        obj = _torch_load(path)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise AdapterError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
        for key, value in obj.items():
            if not isinstance(value, torch.Tensor):
                raise AdapterError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
            yield key, check_lora_tensor(value, f"{path}: {key}")
    except AdapterError:
        raise
    except pickle.UnpicklingError:
        raise AdapterError(f"{path}: refused: the checkpoint holds Python objects besides tensors, and adapter files "
                           "are read with torch.load(weights_only=True)") from None
    except Exception as err:  # safetensors and torch raise their own types for damaged files
        raise AdapterError(f"{path}: cannot read the adapter file, it is damaged or truncated "
                           f"({_first_line(err)})") from None


def check_lora_tensor(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """A LoRA matrix as it must be to render: 2-D, floating point, non-empty, every value finite."""
    if tensor.ndim != 2 or tensor.numel() == 0:
        raise AdapterError(f"{where}: shape {tuple(tensor.shape)} is not a LoRA matrix (2-D, non-empty)")
    if not tensor.is_floating_point():
        raise AdapterError(f"{where}: dtype {str(tensor.dtype).replace('torch.', '')} is not a floating point type")
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise AdapterError(f"{where}: {bad} of {tensor.numel()} values are not finite (NaN or infinity); the "
                           "weights are damaged")
    return tensor


def _load_tensor_file(path: Path) -> tuple[dict, dict]:
    """(state_dict, metadata) of an adapter file, every tensor checked (:func:`iter_tensor_file`)."""
    metadata = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
        except Exception as err:
            raise AdapterError(f"{path}: cannot read the adapter file, it is damaged or truncated "
                               f"({_first_line(err)})") from None
    return dict(iter_tensor_file(path)), metadata


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


# ---------------------------------------------------------------------------------------------- checking files
_STORYMEM_KEY = re.compile(r"^transformer\.blocks\.(\d+)\.(.+)\.(lora_A|lora_B)\.weight$")
_EXPERT_NAMES = {"transformer": "high-noise expert (transformer)", "transformer_2": "low-noise expert (transformer_2)"}


def _storymem_key(key: str):
    m = _STORYMEM_KEY.match(key)
    return None if m is None else (int(m.group(1)), m.group(2), m.group(3))


def _published_key(key: str):
    m = _PUBLISHED_KEY.match(key)
    if m is None or m.group(2) not in ORIGINAL_TO_DIFFUSERS:
        return None
    return int(m.group(1)), ORIGINAL_TO_DIFFUSERS[m.group(2)], m.group(3)


def _module_io(target: str, config: dict) -> Optional[tuple[int, int]]:
    """(in, out) features of a targeted module of a Wan transformer, from the transformer's config."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    if target.startswith(("attn1.", "attn2.")):
        return dim, dim
    return {"ffn.net.0.proj": (dim, config["ffn_dim"]), "ffn.net.2": (config["ffn_dim"], dim)}.get(target)


def _check_expert_file(file: Path, naming, targets: list[str], base: Optional[dict]) -> int:
    """Read every tensor of one expert's file and check the layers they form; returns the rank."""
    layers: dict = {}  # (block, target) -> {"lora_A": shape, "lora_B": shape}
    for key, tensor in iter_tensor_file(file):
        parsed = naming(key)
        if parsed is None:
            if key.endswith(".alpha") and naming is _published_key:
                continue  # alpha is fixed by the published recipe
            raise AdapterError(f"{file}: unexpected key {key} (not a LoRA matrix of a Wan transformer block)")
        block, target, which = parsed
        if target not in targets:
            raise AdapterError(f"{file}: {key}: {target} is not one of the adapter's target modules {targets}")
        if base is not None and block >= base["num_layers"]:
            raise AdapterError(f"{file}: {key}: block {block}, but the base model has {base['num_layers']} blocks")
        layers.setdefault((block, target), {})[which] = tuple(tensor.shape)
    if not layers:
        raise AdapterError(f"{file}: no LoRA weights")
    ranks, features = set(), {}
    for (block, target), pair in sorted(layers.items()):
        where = f"{file}: blocks.{block}.{target}"
        if len(pair) != 2:
            raise AdapterError(f"{where}: {'lora_B' if 'lora_A' in pair else 'lora_A'} is missing (a LoRA layer is "
                               "an A and a B matrix)")
        (rank, fan_in), (fan_out, rank_b) = pair["lora_A"], pair["lora_B"]
        if rank != rank_b:
            raise AdapterError(f"{where}: lora_A {pair['lora_A']} and lora_B {pair['lora_B']} disagree on the rank")
        ranks.add(rank)
        expected = _module_io(target, base) if base is not None else features.setdefault(target, (fan_in, fan_out))
        if expected is not None and (fan_in, fan_out) != expected:
            other = "the base model's layer" if base is not None else "the same layer of the other blocks"
            raise AdapterError(f"{where}: maps {fan_in} -> {fan_out} features; {other} maps {expected[0]} -> "
                               f"{expected[1]}")
    if len(ranks) > 1:
        raise AdapterError(f"{file}: layers of different ranks {sorted(ranks)}")
    blocks = base["num_layers"] if base is not None else 1 + max(block for block, _ in layers)
    absent = [(b, t) for b in range(blocks) for t in targets if (b, t) not in layers]
    if absent:
        raise AdapterError(f"{file}: {len(absent)} LoRA layers are missing, e.g. blocks.{absent[0][0]}.{absent[0][1]}")
    return ranks.pop()


def check_adapter_files(path_or_repo, subfolder: Optional[str] = None, transformer_configs: Optional[dict] = None,
                        **hub_kwargs) -> StoryMemLoraConfig:
    """Check a storymem adapter folder or a published StoryMem folder before any model loads, and return its config.

    Every tensor of every file is read (safetensors; ``.pth`` with ``weights_only=True``, memory-mapped): keys
    must be LoRA matrices of the adapter's target modules, each layer an A ``[r, in]`` and a B ``[out, r]`` of
    one rank (the config's), floating point, all values finite, every block present, features consistent across
    blocks. ``transformer_configs`` (``{"transformer": config dict or None, "transformer_2": ...}``, when the base
    model's transformer configs can be read without loading it) also checks blocks and features against the
    base, and that it has the experts the adapter is for. Raises :class:`AdapterError` naming the file."""
    folder = _variant_folder(_resolve_folder(path_or_repo, subfolder, **hub_kwargs))
    config = None
    if (folder / ADAPTER_CONFIG_NAME).exists():
        config = StoryMemLoraConfig.from_file(folder / ADAPTER_CONFIG_NAME)
        files = {expert: folder / EXPERT_FILES[expert] for expert in config.experts}
        for expert, file in files.items():
            if not file.is_file():
                raise AdapterError(f"{file}: missing (the adapter config lists expert {expert!r})")
        naming, targets = _storymem_key, list(config.target_modules)
    else:
        found = {e: _find_published_file(folder, stem) for e, stem in PUBLISHED_STEMS.items()}
        files = {e: f for e, f in found.items() if f is not None}
        if not files:
            raise AdapterError(f"{folder}: neither {ADAPTER_CONFIG_NAME} nor backbone_high_noise/backbone_low_noise "
                               f"(.safetensors or .pth) found")
        naming, targets = _published_key, list(TARGET_MODULES)
    ranks = {}
    for expert, file in files.items():
        base = None
        if transformer_configs is not None:
            base = transformer_configs.get(expert)
            if base is None:
                raise AdapterError(f"{file}: the base model has no {_EXPERT_NAMES[expert]} to load it into")
        ranks[expert] = _check_expert_file(file, naming, targets, base)
        if config is not None and ranks[expert] != config.rank:
            raise AdapterError(f"{file}: rank {ranks[expert]}, but {ADAPTER_CONFIG_NAME} says {config.rank}")
    if len(set(ranks.values())) > 1:
        raise AdapterError(f"{folder}: the experts' ranks differ ({', '.join(f'{e}: {r}' for e, r in ranks.items())})")
    if config is None:
        rank = ranks[next(iter(files))]
        config = StoryMemLoraConfig.published(PUBLISHED_VARIANTS.get(folder.name, "mi2v"), rank=rank)
        config.experts = list(files)
    return config


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
            from .hub import download_hint, unreachable_reason

            try:  # what an earlier download left in the cache is enough
                path = Path(snapshot_download(str(path_or_repo), allow_patterns=patterns, local_files_only=True,
                                              **hub_kwargs))
            except Exception:
                if "local_files_only" in hub_kwargs:
                    raise AdapterError(f"{path_or_repo}: not a local folder, and not in the Hugging Face cache") \
                        from None
                raise AdapterError(f"{path_or_repo}: not a local folder, and not in the Hugging Face cache while "
                                   f"{unreachable_reason()} ({_first_line(e)}); "
                                   f"{download_hint([str(path_or_repo)])}") from None
    if subfolder:
        path = path / subfolder
    if path.is_file():
        raise AdapterError(f"{path}: expected an adapter folder, got a file")
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter folder not found")
    return path


def _variant_folder(folder: Path) -> Path:
    """The folder holding the adapter's files: ``folder``, or its one published variant subfolder."""
    if not (folder / ADAPTER_CONFIG_NAME).exists() and _find_published_file(folder, PUBLISHED_STEMS["transformer"]) \
            is None and _find_published_file(folder, PUBLISHED_STEMS["transformer_2"]) is None:
        variants = [v for v in PUBLISHED_VARIANTS if (folder / v).is_dir()]
        if len(variants) == 1:
            return folder / variants[0]
        if variants:
            raise AdapterError(f"{folder}: holds several published variants {variants}; pass subfolder=one of them")
    return folder


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
    folder = _variant_folder(_resolve_folder(path_or_repo, subfolder, **hub_kwargs))

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
