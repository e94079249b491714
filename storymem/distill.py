"""Distilled few-step LoRAs (lightx2v "Wan2.2-Lightning" and its kin) next to a StoryMem adapter.

A distill LoRA comes as one file per expert: ``high_noise_model.safetensors`` / ``low_noise_model.safetensors``
(Wan2.2-Lightning), or a pair named like ``..._high_noise_..._4step_1022.safetensors`` /
``..._low_noise_...``, with the original Wan module names (``diffusion_model.blocks.7.self_attn.q.lora_down.weight``,
``.lora_up.weight``, ``.alpha``; newer releases add ``.diff_b`` biases, a full ``head.head.diff`` and zeroed
norm diffs). Files in diffusers' naming (``transformer.blocks.7.attn1.to_q.lora_A.weight``) are read too.

The steps, each usable alone:

1. :func:`resolve_distill_lora` - a folder, a ``HIGH,LOW`` file pair or a hub id to the two files;
2. :func:`validate_distill_lora` - every key of every file checked against the experts' configs (module known,
   shape fitting ``dim = heads * head_dim``, ``ffn_dim``, ``text_dim`` ..., values finite) *before any model
   loads*. Keys diffusers would skip silently are refused, unless they hold only zeros (then skipping them
   changes nothing and they are dropped here, listed in ``ignored``) or the caller names their category in
   ``skip`` (:data:`SKIP_CATEGORIES`: image cross-attention keys, unapplied diffs; listed in ``skipped``);
3. :func:`load_distill_lora` - into both experts through diffusers' own ``load_lora_weights(...,
   adapter_name=..., load_into_transformer_2=True)``, then checked: every module the file names must carry it;
4. :func:`set_lora_scales` - each adapter its own scale (the StoryMem adapter's and the distill LoRA's);
5. :func:`fuse_loras` - merged into the weights for rendering at fixed scales (no per-forward LoRA cost), with
   the fused output checked against the unfused one on a probe input.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from .lora import AdapterError
from .lora_fusion import FuseReport, LoraFusionError, fuse_loras, set_lora_scales  # noqa: F401 (steps 4 and 5)

__all__ = [
    "DistillLoraError", "DistillLoraFiles", "DistillLora", "FuseReport", "EXPERTS", "DISTILL_ADAPTER",
    "LoraFusionError",
    "SKIP_CATEGORIES",
    "resolve_distill_lora", "read_expert_configs", "expert_configs_from_pipeline", "validate_distill_lora",
    "prepare_distill_lora", "load_distill_lora", "set_lora_scales", "fuse_loras", "loaded_lora_modules",
]

EXPERTS = {"transformer": "high", "transformer_2": "low"}  # diffusers component -> the file's noise level
DISTILL_ADAPTER = "distill"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(/[^,]+)?$")
_LEVEL = {level: re.compile(rf"(^|[^a-z]){level}(_?noise)?([^a-z]|$)") for level in ("high", "low")}

# Kinds of key suffix, longest first.
_SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_A.weight", "lora_B.weight", "alpha", "diff_b", "diff_m",
             "diff")

# Original Wan attention/ffn names -> diffusers names inside a block.
_BLOCK_LINEARS = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
_IMAGE_LINEARS = {"cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj"}
_GLOBAL_LINEARS = {
    "head.head": "proj_out", "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
}
# Non-linear modules whose diffs diffusers drops (norms, modulation tables, patch embedding).
_BLOCK_OTHERS = ("", "norm3", "modulation", "self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q",
                 "cross_attn.norm_k")
_GLOBAL_OTHERS = ("head.modulation", "patch_embedding")
# Keys a caller may ask to leave out (refused otherwise), by category:
SKIP_CATEGORIES = {
    # Wan2.1-style image cross-attention (k_img, v_img, norm_k_img, img_emb) on an expert without it: lightx2v's
    # Wan2.2-I2V "1022" distill LoRAs carry such keys although Wan2.2-I2V-A14B has no such modules.
    "image": "keys of image cross-attention modules the model does not have",
    # Non-zero diffs of norms, modulation tables and the patch embedding, which diffusers' Wan loader drops.
    "unapplied": "non-zero diffs diffusers' Wan loader does not apply",
}
_IMAGE_MODULE = re.compile(r"^(blocks\.\d+\.cross_attn\.(k_img|v_img|norm_k_img)|img_emb(\..*)?)$")


class DistillLoraError(AdapterError):
    """A distill LoRA that cannot be found, or does not fit the model: named by file and key."""


@dataclass
class DistillLoraFiles:
    """The file of each expert (``transformer`` = high noise, ``transformer_2`` = low noise)."""

    files: dict[str, Path]
    source: str


@dataclass
class DistillLora:
    """A validated distill LoRA, ready to load: per expert, the cleaned state dict (original Wan naming with
    ``alpha`` folded in), the diffusers modules it adapts, its ranks, the all-zero keys left out (``ignored``)
    and the non-zero keys left out because the caller asked to (``skipped``, see :data:`SKIP_CATEGORIES`)."""

    source: str
    files: dict[str, Path]
    state_dicts: dict[str, dict[str, torch.Tensor]]
    modules: dict[str, list[str]]
    ranks: dict[str, list[int]]
    ignored: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> dict:
        """What the manifest records."""
        return {"source": self.source, "files": {e: str(p) for e, p in self.files.items()},
                "ranks": self.ranks, "modules": {e: len(m) for e, m in self.modules.items()},
                "ignored_zero_keys": {e: len(k) for e, k in self.ignored.items()},
                "skipped_keys": {e: k for e, k in self.skipped.items() if k}}


# ---------------------------------------------------------------------------------------------- resolving
def _expert_of(name: str) -> Optional[str]:
    stem = name.lower()
    levels = [level for level, pattern in _LEVEL.items() if pattern.search(stem)]
    if len(levels) != 1:
        return None
    return next(e for e, level in EXPERTS.items() if level == levels[0])


def _pick_pair(names: Sequence[str], source: str, experts: Sequence[str]) -> dict[str, str]:
    """One high-noise and one low-noise name among the ``.safetensors`` files ``names`` (a folder's or a hub
    repository's), for the experts asked for; refused, listing the candidates, when missing or ambiguous."""
    candidates = sorted(n for n in names if n.endswith(".safetensors"))
    picked = {}
    for expert in experts:
        level = EXPERTS[expert]
        matches = [n for n in candidates if _expert_of(Path(n).stem) == expert]
        if not matches:
            raise DistillLoraError(f"{source}: no {level}-noise file (a .safetensors file named with '{level}', "
                                   f"e.g. {level}_noise_model.safetensors) for {expert}; found: "
                                   f"{candidates or 'no .safetensors files'}")
        if len(matches) > 1:
            raise DistillLoraError(f"{source}: several {level}-noise files {matches}; give the pair as "
                                   "HIGH.safetensors,LOW.safetensors")
        picked[expert] = matches[0]
    return picked


def _hub_file(ref: str, **hub_kwargs) -> Path:
    from huggingface_hub import hf_hub_download

    owner, name, filename = ref.split("/", 2)
    try:
        return Path(hf_hub_download(f"{owner}/{name}", filename, **hub_kwargs))
    except Exception as e:  # offline, unknown repository or file, no access
        raise DistillLoraError(f"{ref}: not a local file, and fetching it from the hub failed ({e})") from None


def _hub_pair(ref: str, experts: Sequence[str], **hub_kwargs) -> dict[str, Path]:
    """The high/low files of a hub repository (``org/name`` or ``org/name/subfolder``), only those fetched."""
    from huggingface_hub import list_repo_files

    parts = ref.split("/", 2)
    repo, sub = f"{parts[0]}/{parts[1]}", (parts[2].strip("/") + "/" if len(parts) > 2 else "")
    try:
        listed = list_repo_files(repo, **{k: v for k, v in hub_kwargs.items() if k in ("revision", "token")})
    except Exception as e:
        raise DistillLoraError(f"{ref}: not a local folder, and listing it on the hub failed ({e})") from None
    names = [n for n in listed if n.startswith(sub) and "/" not in n[len(sub):]]
    return {e: _hub_file(f"{repo}/{n}", **hub_kwargs) for e, n in _pick_pair(names, ref, experts).items()}


def resolve_distill_lora(source: Union[str, Path, Sequence], experts: Sequence[str] = tuple(EXPERTS),
                         **hub_kwargs) -> DistillLoraFiles:
    """The file of each expert of a distill LoRA given as

    * a folder with one high-noise and one low-noise ``.safetensors`` (``high_noise_model.safetensors`` ...),
    * a pair ``"HIGH.safetensors,LOW.safetensors"`` (or a 2-sequence), in that order; each may be a hub file
      ``org/name/path/file.safetensors``; the same file twice loads one LoRA into both experts,
    * a hub id ``org/name`` or ``org/name/subfolder`` holding such a pair (only those two files are fetched).

    ``experts`` are the components the model has (a one-expert model needs only the high-noise file).
    A missing expert file is refused, naming what was found.
    """
    experts = [e for e in EXPERTS if e in experts]
    if not experts:
        raise DistillLoraError(f"no experts to load a distill LoRA into (expected some of {list(EXPERTS)})")
    if isinstance(source, (list, tuple)):
        parts = [str(p) for p in source]
    else:
        parts = [p.strip() for p in str(source).split(",")] if "," in str(source) else None
    label = ",".join(parts) if parts else str(source)
    if parts is not None:
        if len(parts) != len(experts):
            levels = ", ".join(EXPERTS[e] + "-noise" for e in experts)
            raise DistillLoraError(f"{label}: expected {len(experts)} files ({levels}, in that order), "
                                   f"got {len(parts)}")
        files = {}
        for expert, part in zip(experts, parts):
            path = Path(part).expanduser()
            if path.is_file():
                files[expert] = path
            elif not path.exists() and _HUB_ID.match(part) and part.count("/") >= 2:
                files[expert] = _hub_file(part, **hub_kwargs)
            else:
                raise DistillLoraError(f"{part}: {EXPERTS[expert]}-noise file of the distill LoRA not found")
        return DistillLoraFiles(files, label)
    path = Path(source).expanduser()
    if path.is_dir():
        names = [p.name for p in path.iterdir() if p.is_file()]
        return DistillLoraFiles({e: path / n for e, n in _pick_pair(names, str(path), experts).items()}, str(path))
    if path.is_file():
        if len(experts) == 1:
            return DistillLoraFiles({experts[0]: path}, str(path))
        raise DistillLoraError(f"{path}: one file for a model with {len(experts)} experts; give a folder or the "
                               "pair HIGH.safetensors,LOW.safetensors (the same file twice to load it into both)")
    if _HUB_ID.match(str(source)):
        return DistillLoraFiles(_hub_pair(str(source), experts, **hub_kwargs), str(source))
    raise DistillLoraError(f"{source}: distill LoRA not found (expected a folder, HIGH,LOW files or a hub id)")


# ---------------------------------------------------------------------------------------------- configs
def read_expert_configs(base: str, experts: Sequence[str] = tuple(EXPERTS), **hub_kwargs) -> dict[str, dict]:
    """The experts' configs of a base model without loading its weights: a diffusers folder or hub id
    (``transformer/config.json``, ``transformer_2/config.json``), or a built-in name ("tiny", "toy")."""
    import json

    from .builtin import builtin_base_folder, is_builtin

    if is_builtin(base):
        folder = builtin_base_folder(base)
        if folder is None:  # built in code, at test sizes: building it costs well under a second
            from .builtin import builtin_components

            components = builtin_components(base)
            return {e: dict(components[e].config) for e in experts if components.get(e) is not None}
        base = str(folder)
    root = Path(base).expanduser()

    def read(name: str) -> Optional[dict]:
        if root.is_dir():
            path = root / name
            return json.loads(path.read_text()) if path.is_file() else None
        from huggingface_hub import hf_hub_download

        try:
            return json.loads(Path(hf_hub_download(str(base), name, **hub_kwargs)).read_text())
        except Exception as e:
            raise DistillLoraError(f"{base}: cannot read {name} ({e})") from None

    index = read("model_index.json") or {}
    configs = {}
    for expert in experts:
        entry = index.get(expert)
        if index and (not isinstance(entry, (list, tuple)) or entry[0] is None):
            continue  # the model has no such expert
        config = read(f"{expert}/config.json")
        if config is not None:
            configs[expert] = config
    if not configs:
        raise DistillLoraError(f"{base}: no expert config ({', '.join(f'{e}/config.json' for e in experts)})")
    return configs


def expert_configs_from_pipeline(pipe) -> dict[str, dict]:
    """The configs of a loaded pipeline's experts."""
    return {e: dict(getattr(pipe, e).config) for e in EXPERTS if getattr(pipe, e, None) is not None}


# ---------------------------------------------------------------------------------------------- validating
@dataclass(frozen=True)
class _Module:
    diffusers: Optional[str]  # None: a module diffusers does not adapt (its diffs are dropped)
    shape: Optional[tuple[int, int]] = None  # (out, in) of a linear module


def _module_table(config: Mapping) -> dict[str, _Module]:
    """Original Wan module name -> what it is in this expert, from the config alone."""
    dim = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    ffn, layers = int(config["ffn_dim"]), int(config["num_layers"])
    patch = config.get("patch_size") or (1, 2, 2)
    out = int(config.get("out_channels") or config["in_channels"]) * math.prod(patch)
    linears = {name: (dim, dim) for name in _BLOCK_LINEARS}
    linears.update({"ffn.0": (ffn, dim), "ffn.2": (dim, ffn)})
    table: dict[str, _Module] = {}
    image_in = config.get("added_kv_proj_dim") or config.get("image_dim")
    for i in range(layers):
        for wan, diff in _BLOCK_LINEARS.items():
            table[f"blocks.{i}.{wan}"] = _Module(f"blocks.{i}.{diff}", linears[wan])
        if image_in:
            for wan, diff in _IMAGE_LINEARS.items():
                table[f"blocks.{i}.{wan}"] = _Module(f"blocks.{i}.{diff}", (dim, int(image_in)))
            table[f"blocks.{i}.cross_attn.norm_k_img"] = _Module(None)
        for other in _BLOCK_OTHERS:
            table[f"blocks.{i}.{other}".rstrip(".")] = _Module(None)
    shapes = {"head.head": (out, dim), "time_projection.1": (6 * dim, dim),
              "text_embedding.0": (dim, int(config["text_dim"])), "text_embedding.2": (dim, dim),
              "time_embedding.0": (dim, int(config["freq_dim"])), "time_embedding.2": (dim, dim)}
    for wan, diff in _GLOBAL_LINEARS.items():
        table[wan] = _Module(diff, shapes[wan])
    for other in _GLOBAL_OTHERS:
        table[other] = _Module(None)
    return table


def _diffusers_to_wan(table: Mapping[str, _Module]) -> dict[str, str]:
    return {m.diffusers: wan for wan, m in table.items() if m.diffusers}


def _split_key(key: str, reverse: Mapping[str, str]) -> Optional[tuple[str, str]]:
    """(Wan module name, suffix kind) of a key in either naming, or None."""
    if key.startswith("transformer."):
        body = key[len("transformer."):]
        for kind, wan_kind in (("lora_A.weight", "lora_down.weight"), ("lora_B.weight", "lora_up.weight"),
                               ("lora_B.bias", "diff_b"), ("alpha", "alpha")):
            if body.endswith("." + kind) and body[: -len(kind) - 1] in reverse:
                return reverse[body[: -len(kind) - 1]], wan_kind
        return None
    body = key[len("diffusion_model."):] if key.startswith("diffusion_model.") else key
    for kind in _SUFFIXES:
        if body.endswith("." + kind):
            return body[: -len(kind) - 1], kind
    return None


def _summarise(items: Sequence[str], limit: int = 6) -> str:
    items = list(items)
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise DistillLoraError(f"{path}: distill LoRAs are read from .safetensors files only")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise DistillLoraError(f"{path}: not a readable safetensors file ({e})") from None


def _check_keys(path: Path, shapes: dict, table: Mapping[str, _Module], expert: str, skip: Sequence[str],
                skipped: list) -> dict[str, dict[str, str]]:
    """Group the keys by module ({wan module: {kind: key}}), refusing unknown or mis-shaped ones."""
    reverse = _diffusers_to_wan(table)
    modules: dict[str, dict[str, str]] = {}
    unknown, image, wrong = [], [], []
    for key, shape in shapes.items():
        split = _split_key(key, reverse)
        if split is not None and split[0] not in table and _IMAGE_MODULE.match(split[0]):
            (skipped if "image" in skip else image).append(key)
            continue
        if split is None or split[0] not in table:
            unknown.append(key)
            continue
        wan, kind = split
        kind = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}.get(kind, kind)
        if kind in modules.setdefault(wan, {}):
            raise DistillLoraError(f"{path}: keys {modules[wan][kind]!r} and {key!r} name the same tensor")
        modules[wan][kind] = key
        spec = table[wan]
        if spec.shape is None:
            continue
        out_f, in_f = spec.shape
        expected = {"lora_down.weight": ("r", in_f), "lora_up.weight": (out_f, "r"), "diff_b": (out_f,),
                    "diff": (out_f, in_f)}.get(kind)
        if kind == "alpha":
            if math.prod(shape) != 1:
                wrong.append(f"{key} {shape} (expected a scalar)")
        elif expected is None:
            wrong.append(f"{key} (no such tensor for a linear layer)")
        elif len(shape) != len(expected) or any(e != "r" and s != e for s, e in zip(shape, expected)):
            want = ", ".join("rank" if e == "r" else str(e) for e in expected)
            wrong.append(f"{key} {shape} (expected ({want}{',' if len(expected) == 1 else ''}))")
    if unknown:
        raise DistillLoraError(f"{path}: {len(unknown)} keys match no module of {expert}: "
                               f"{_summarise(sorted(unknown))}")
    if image:
        raise DistillLoraError(f"{path}: {len(image)} keys of image cross-attention, which {expert} does not have "
                               f"(lightx2v's Wan2.2 '1022' LoRAs and Wan2.1 I2V LoRAs carry them): "
                               f"{_summarise(sorted(image))}; skip 'image' leaves them out")
    if wrong:
        raise DistillLoraError(f"{path}: {len(wrong)} keys do not fit {expert} (another model's size?): "
                               f"{_summarise(sorted(wrong))}")
    return modules


def _clean_module(wan: str, keys: dict[str, str], spec: _Module, tensors: dict, out: dict, ignored: list,
                  problems: list, skip: Sequence[str] = (), skipped: Optional[list] = None) -> Optional[int]:
    """Add one module's tensors to ``out`` (alpha folded into the down weights). Returns the rank of what it
    adds (the output width for a full head diff), or None when it adds nothing."""
    def zero(kind: str) -> bool:
        return not bool(tensors[keys[kind]].any())

    has_pair = "lora_down.weight" in keys and "lora_up.weight" in keys
    applied = set()
    rank = None
    if spec.diffusers is not None and has_pair:
        down, up = tensors[keys["lora_down.weight"]], tensors[keys["lora_up.weight"]]
        rank = down.shape[0]
        if up.shape[1] != rank:
            problems.append(f"{keys['lora_up.weight']} rank {up.shape[1]} != {keys['lora_down.weight']} rank {rank}")
            return None
        if "alpha" in keys:
            # diffusers' Wan loader reads the update as (alpha / rank) * up @ down; fold the scale in, split
            # between both factors to keep low-precision weights in range.
            scale = float(tensors[keys["alpha"]].float().reshape(())) / rank
            root = math.sqrt(abs(scale))
            down = (down.float() * (root if scale >= 0 else -root)).to(down.dtype)
            up = (up.float() * root).to(up.dtype)
            applied.add("alpha")
        out[f"diffusion_model.{wan}.lora_down.weight"] = down.contiguous()
        out[f"diffusion_model.{wan}.lora_up.weight"] = up.contiguous()
        applied.update(("lora_down.weight", "lora_up.weight"))
        if "diff_b" in keys:
            out[f"diffusion_model.{wan}.diff_b"] = tensors[keys["diff_b"]].clone()
            applied.add("diff_b")
    elif wan == "head.head" and "diff" in keys and "diff_b" in keys:
        # A full weight diff of the output head; diffusers loads it as a LoRA of rank out_features.
        out["diffusion_model.head.head.diff"] = tensors[keys["diff"]].clone()
        out["diffusion_model.head.head.diff_b"] = tensors[keys["diff_b"]].clone()
        applied.update(("diff", "diff_b"))
        rank = tensors[keys["diff"]].shape[0]
    for kind, key in keys.items():
        if kind in applied:
            continue
        if zero(kind):
            ignored.append(key)  # diffusers would skip it; all zeros, so skipping changes nothing
        elif spec.diffusers is not None and kind in ("lora_down.weight", "lora_up.weight"):
            problems.append(f"{key} (its {'up' if kind == 'lora_down.weight' else 'down'} half is missing)")
        elif "unapplied" in skip and skipped is not None:
            skipped.append(key)
        else:
            problems.append(f"{key} (non-zero, and diffusers' Wan loader would not apply it; skip 'unapplied' "
                            "leaves such keys out)")
    return rank


def _complete_biases(out: dict) -> None:
    """peft gives every adapted layer a LoRA bias once one has it (``diff_b``); the layers without one get
    zeros (an exact no-op), which otherwise stay unset."""
    if not any(k.endswith(".diff_b") for k in out):
        return
    for key in [k for k in out if k.endswith(".lora_up.weight")]:
        module = key[: -len(".lora_up.weight")]
        if f"{module}.diff_b" not in out:
            up = out[key]
            out[f"{module}.diff_b"] = torch.zeros(up.shape[0], dtype=up.dtype)


def validate_distill_lora(files: DistillLoraFiles, configs: Mapping[str, Mapping],
                          skip: Sequence[str] = ()) -> DistillLora:
    """Read and check every file against its expert's config; returns the cleaned state dicts.

    Refused, naming file and keys: a file for an expert the configs lack or an expert without a file, keys of
    no known module of that expert (other architectures, Wan2.1 image cross-attention, block indices past
    ``num_layers``), shapes that do not fit the config (e.g. Wan2.1-1.3B or TI2V-5B sizes), a LoRA half without
    its partner, non-zero tensors diffusers' Wan loader would skip, non-finite values, and files adapting nothing.
    ``skip``: categories of :data:`SKIP_CATEGORIES` to leave out instead (listed in ``skipped``).
    """
    from safetensors import safe_open

    extra = sorted(set(files.files) - set(configs))
    if extra:
        raise DistillLoraError(f"{files.source}: files for {extra}, which the model does not have")
    missing = [e for e in configs if e not in files.files]
    if missing:
        raise DistillLoraError(f"{files.source}: no file for {missing} "
                               f"({', '.join(EXPERTS[e] + '-noise' for e in missing)})")
    unknown = sorted(set(skip) - set(SKIP_CATEGORIES))
    if unknown:
        raise DistillLoraError(f"unknown skip categories {unknown}; known: {', '.join(SKIP_CATEGORIES)}")
    state_dicts, modules, ranks, ignored, skipped = {}, {}, {}, {}, {}
    for expert, path in files.files.items():
        table = _module_table(configs[expert])
        skipped[expert] = []
        grouped = _check_keys(path, _read_shapes(path), table, expert, skip, skipped[expert])
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise DistillLoraError(f"{path}: non-finite values in {_summarise(sorted(bad))}")
        out, dropped, problems, expert_ranks, adapted = {}, [], [], set(), []
        for wan, keys in grouped.items():
            rank = _clean_module(wan, keys, table[wan], tensors, out, dropped, problems, skip, skipped[expert])
            if rank is not None:
                expert_ranks.add(rank)
                adapted.append(table[wan].diffusers)
        if problems:
            raise DistillLoraError(f"{path}: {len(problems)} keys cannot be loaded into {expert}: "
                                   f"{_summarise(sorted(problems))}")
        _complete_biases(out)
        if not adapted:
            raise DistillLoraError(f"{path}: adapts no module of {expert} (all {len(tensors)} tensors are zero "
                                   "diffs)" if tensors else f"{path}: holds no tensors")
        state_dicts[expert], modules[expert] = out, sorted(adapted)
        ranks[expert], ignored[expert], skipped[expert] = sorted(expert_ranks), sorted(dropped), sorted(skipped[expert])
    return DistillLora(files.source, dict(files.files), state_dicts, modules, ranks, ignored, skipped)


def prepare_distill_lora(source, configs: Mapping[str, Mapping], skip: Sequence[str] = (),
                         **hub_kwargs) -> DistillLora:
    """:func:`resolve_distill_lora` then :func:`validate_distill_lora`: everything checked, no model needed."""
    return validate_distill_lora(resolve_distill_lora(source, tuple(configs), **hub_kwargs), configs, skip)


# ---------------------------------------------------------------------------------------------- loading
def loaded_lora_modules(model, adapter_name: str) -> list[str]:
    """Names of the modules of ``model`` that carry LoRA weights of ``adapter_name``."""
    from peft.tuners.lora import LoraLayer

    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, LoraLayer) and adapter_name in module.lora_A)


def load_distill_lora(pipe, lora: DistillLora, adapter_name: str = DISTILL_ADAPTER) -> None:
    """Load a validated distill LoRA into the pipeline's experts, beside any adapter already there (e.g. the
    StoryMem one), with diffusers' ``load_lora_weights(..., adapter_name, load_into_transformer_2=True)``.

    Afterwards every module the file names must carry the adapter, or the adapter is removed again and
    :class:`DistillLoraError` names what diffusers skipped. Afterwards every adapter of the experts is active
    at scale 1: give the scales with :func:`set_lora_scales`.
    """
    for expert in lora.state_dicts:
        model = getattr(pipe, expert, None)
        if model is None:
            raise DistillLoraError(f"{lora.files[expert]}: the pipeline has no {expert} to load it into")
        if adapter_name in (getattr(model, "peft_config", None) or {}):
            raise DistillLoraError(f"{expert} already has an adapter named {adapter_name!r}")
        expected = _module_table(model.config)
        unfit = [m for m in lora.modules[expert] if m not in {s.diffusers for s in expected.values()}]
        if unfit:
            raise DistillLoraError(f"{lora.files[expert]}: validated for another {expert} config "
                                   f"(no {_summarise(unfit)})")
    for expert, state_dict in lora.state_dicts.items():
        model = getattr(pipe, expert)
        was_training = model.training
        with warnings.catch_warnings():
            # A second adapter beside the StoryMem one is the point here, not an accident.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            # Copies: diffusers' converter rescales some tensors in place.
            pipe.load_lora_weights({k: v.clone() for k, v in state_dict.items()}, adapter_name=adapter_name,
                                   load_into_transformer_2=expert == "transformer_2")
        model.train(was_training)  # peft builds its dropout modules in training mode
        missing = sorted(set(lora.modules[expert]) - set(loaded_lora_modules(model, adapter_name)))
        unset = sorted(n for n, p in model.named_parameters() if f".{adapter_name}." in n and p.is_meta)
        if unset:
            model.delete_adapters(adapter_name)
            raise DistillLoraError(f"{lora.files[expert]}: diffusers left {len(unset)} LoRA tensors of {expert} "
                                   f"unset: {_summarise(unset)}")
        if missing:
            model.delete_adapters(adapter_name)
            raise DistillLoraError(f"{lora.files[expert]}: diffusers left {len(missing)} modules of {expert} "
                                   f"without the LoRA: {_summarise(missing)}")
    # Every loaded adapter active at scale 1 (an earlier set_lora_scales is undone: set the scales afterwards).
    for expert in lora.state_dicts:
        set_lora_scales(pipe, {name: 1.0 for name in getattr(pipe, expert).peft_config}, experts=[expert])
