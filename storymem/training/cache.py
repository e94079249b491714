"""The prepared training set on disk: its layout, and :class:`PreparedDataset`, which reads it.

``prepare`` (:mod:`storymem.training.prepare`) writes a folder of cached latents and text embeddings, so that
training never runs the VAE or the text encoder::

    index.json                 sizes, base, clips (caption, source, cluster, shard), clusters, skipped items
    shared.safetensors         "m2v": M2V video condition [16, f, h, w]; "empty_text": embedding of ""
    shards/shard-00000.safetensors
                               per clip id c: "c.latents" [16, f, h, w], "c.memory" [16, K, h, w],
                               "c.mi2v" / "c.mm2v" [16, f, h, w], "c.text" [n_tokens, text_dim],
                               "c.subject" [f, h, w] (1 where the clip's subject mask touches a latent
                               cell; only when the clips have masks)

Text embeddings are stored without the zero padding Wan's ``encode_prompt`` adds (:meth:`PreparedDataset.pad_text`
restores it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from ..atomic import atomic_write
from ..defaults import MOTION_FRAMES
from ..devices import DTYPE_NAMES, torch_dtype
from .errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["CACHE_FORMAT", "CACHE_VERSION", "CONTEXT_KINDS", "INDEX_NAME", "SHARED_NAME", "PreparedDataset",
           "read_index", "save_safetensors", "sha256_file"]

CACHE_FORMAT = "storymem-train-cache"
CACHE_VERSION = 1
INDEX_NAME = "index.json"
SHARED_NAME = "shared.safetensors"
# Cached video conditions, by name, and the number of leading frames each conditions on (MI2V: the first frame;
# MM2V: the motion frames).
CONTEXT_KINDS = {"mi2v": 1, "mm2v": MOTION_FRAMES}
# How safetensors headers name the cache dtypes.
_HEADER_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_safetensors(path: Path, tensors: dict, metadata: Optional[dict] = None) -> str:
    """Write tensors atomically; return the file's sha256."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return sha256_file(path)


_REQUIRED_INDEX_FIELDS = {
    "format": str, "version": int, "height": int, "width": int, "num_frames": int, "latent_shape": list,
    "text_dim": int, "max_sequence_length": int, "dtype": str, "contexts": list, "memory_positions": list,
    "shared": dict, "shards": list, "clips": list, "clusters": list,
}


def read_index(root: Path) -> dict:
    """The checked ``index.json`` of a prepared folder."""
    index_path = Path(root) / INDEX_NAME
    if not index_path.is_file():
        raise DataError(f"{root}: no {INDEX_NAME}; run `storymem prepare` (train_lora.py prepare) first")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{index_path}: not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise DataError(f"{index_path}: expected a JSON object")
    for key, kind in _REQUIRED_INDEX_FIELDS.items():
        if not isinstance(index.get(key), kind):
            raise DataError(f"{index_path}: field {key!r} is missing or not a {kind.__name__}")
    if index["format"] != CACHE_FORMAT or index["version"] != CACHE_VERSION:
        raise DataError(f"{index_path}: format {index['format']!r} v{index['version']} is not "
                        f"{CACHE_FORMAT!r} v{CACHE_VERSION}")
    if index["dtype"] not in DTYPE_NAMES:
        raise DataError(f"{index_path}: field 'dtype' must be one of {', '.join(DTYPE_NAMES)}")
    return index


def _shard_problem(path: Path, expected: dict, header_dtype: str) -> Optional[str]:
    """What is wrong with a safetensors file that should hold the ``expected`` tensors (name -> shape, None for
    any length) in ``header_dtype``, from its header alone; None when nothing is."""
    from safetensors import safe_open

    if not path.is_file():
        return "file not found"
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = [k for k in expected if k not in keys]
            if missing:
                return f"{len(missing)} tensors missing (e.g. {missing[0]!r})"
            for key, shape in expected.items():
                tensor = f.get_slice(key)
                got = tuple(tensor.get_shape())
                if len(got) != len(shape) or any(e is not None and g != e for g, e in zip(got, shape)):
                    return f"tensor {key!r} has shape {got}, expected {shape}"
                if tensor.get_dtype() != header_dtype:
                    return f"tensor {key!r} is {tensor.get_dtype()}, expected {header_dtype}"
    except Exception as e:  # safetensors raises its own error types for garbled headers
        return f"cannot read safetensors header ({e})"
    return None


class PreparedDataset:
    """Read access to a prepared folder, checked when opened.

    Every shard's header is read (keys, shapes, dtypes; a truncated or garbled file fails here) and, with
    ``verify_checksums``, its sha256 compared with the index. A bad shard raises :class:`DataError` naming it;
    with ``skip_bad_shards`` its clips are dropped instead and counted in :attr:`dropped`. Clusters left with
    fewer than two clips are dropped too (memory must come from another clip).
    """

    def __init__(self, root, skip_bad_shards: bool = False, verify_checksums: bool = False):
        self.root = Path(root)
        self.index = index = read_index(self.root)
        self.dropped: dict[str, int] = {}
        self.bad_shards: list[str] = []
        self._handles: dict = {}
        self._pid = None
        self.latent_shape = tuple(index["latent_shape"])
        self.memory_count = len(index["memory_positions"])
        self.has_subject_masks = bool(index.get("subject_masks"))

        z, f, h, w = self.latent_shape
        header_dtype = _HEADER_DTYPES[torch_dtype(index["dtype"])]
        self._check_file(index["shared"], {"m2v": (z, f, h, w), "empty_text": (None, index["text_dim"])},
                         header_dtype, verify_checksums, fatal=True)
        valid = self._check_shards(header_dtype, verify_checksums, fatal=not skip_bad_shards)
        self.clips = [c for c, ok in zip(index["clips"], valid) if ok]
        self.clusters = self._usable_clusters(valid)
        self.cluster_of = {m: k for k, members in enumerate(self.clusters) for m in members}

    # ------------------------------------------------------------------ checks
    def _expected_per_clip(self) -> dict[str, tuple]:
        """The tensors of every clip (key suffix -> shape, None for the text length)."""
        z, f, h, w = self.latent_shape
        expected = {"latents": (z, f, h, w), "memory": (z, self.memory_count, h, w),
                    "text": (None, self.index["text_dim"])}
        expected.update({c: (z, f, h, w) for c in self.index["contexts"]})
        if self.has_subject_masks:
            expected["subject"] = (f, h, w)
        return expected

    def _check_shards(self, header_dtype: str, verify: bool, fatal: bool) -> list[bool]:
        """Check every shard's header (and checksum); return which clips are readable."""
        index, index_path = self.index, self.root / INDEX_NAME
        clips_by_shard: dict[int, list[int]] = {}
        for i, clip in enumerate(index["clips"]):
            for key in ("id", "caption", "cluster", "shard"):
                if key not in clip:
                    raise DataError(f"{index_path}: clips[{i}] has no field {key!r}")
            if not 0 <= clip["shard"] < len(index["shards"]):
                raise DataError(f"{index_path}: clips[{i}] refers to shard {clip['shard']}, which is not listed")
            clips_by_shard.setdefault(clip["shard"], []).append(i)
        per_clip = self._expected_per_clip()
        valid = [True] * len(index["clips"])
        for s, shard in enumerate(index["shards"]):
            members = clips_by_shard.get(s, [])
            expected = {f"{index['clips'][i]['id']}.{k}": shape for i in members for k, shape in per_clip.items()}
            if not self._check_file(shard, expected, header_dtype, verify, fatal):
                for i in members:
                    valid[i] = False
                self.dropped["bad shard"] = self.dropped.get("bad shard", 0) + len(members)
        return valid

    def _usable_clusters(self, valid: list[bool]) -> list[list[int]]:
        """The index's clusters over the readable clips (renumbered), those of two or more clips."""
        remap = {old: new for new, old in enumerate(i for i, ok in enumerate(valid) if ok)}
        clusters = []
        for members in self.index["clusters"]:
            if not isinstance(members, list) or not all(isinstance(m, int) and 0 <= m < len(valid) for m in members):
                raise DataError(f"{self.root / INDEX_NAME}: clusters must be lists of clip indices")
            kept = [remap[m] for m in members if valid[m]]
            if len(kept) >= 2:
                clusters.append(kept)
            elif kept:
                self.dropped["cluster of one"] = self.dropped.get("cluster of one", 0) + len(kept)
        if not clusters:
            raise DataError(f"{self.root}: no cluster with two or more usable clips"
                            + (f" (dropped: {self.dropped})" if self.dropped else ""))
        return clusters

    def _check_file(self, entry: dict, expected: dict, header_dtype: str, verify: bool, fatal: bool) -> bool:
        """Whether a shard listed in the index holds the ``expected`` tensors; a bad one raises (``fatal``) or
        is logged and recorded in :attr:`bad_shards`."""
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise DataError(f"{self.root / INDEX_NAME}: a shard entry has no 'file'")
        path = self.root / entry["file"]
        problem = _shard_problem(path, expected, header_dtype)
        if problem is None and verify and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            problem = "checksum mismatch (file changed or corrupted since preparation)"
        if problem is None:
            return True
        message = f"{path}: corrupted or incomplete cache shard: {problem}"
        if fatal:
            raise DataError(message + ("; re-run prepare, or train with --skip-bad-shards to drop its clips"
                                       if entry.get("file") != SHARED_NAME else "; re-run prepare"))
        logger.warning(message + "; its clips are skipped")
        self.bad_shards.append(str(path))
        return False

    # ------------------------------------------------------------------ access
    @property
    def height(self) -> int:
        return self.index["height"]

    @property
    def width(self) -> int:
        return self.index["width"]

    @property
    def num_frames(self) -> int:
        return self.index["num_frames"]

    @property
    def contexts(self) -> list[str]:
        return list(self.index["contexts"])

    @property
    def max_sequence_length(self) -> int:
        return self.index["max_sequence_length"]

    @property
    def base(self) -> Optional[str]:
        return self.index.get("base")

    def __len__(self) -> int:
        return len(self.clips)

    def _handle(self, file: str):
        from safetensors import safe_open

        if self._pid != os.getpid():  # reopen in data-loader worker processes
            self._handles, self._pid = {}, os.getpid()
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.root / file), framework="pt")
        return self._handles[file]

    def _shard_file(self, clip: int) -> str:
        return self.index["shards"][self.clips[clip]["shard"]]["file"]

    def tensor(self, clip: int, key: str) -> torch.Tensor:
        """A cached tensor of a clip: ``latents``, ``memory``, ``text``, a context (``mi2v``/``mm2v``), or
        ``subject`` (with masks)."""
        return self._handle(self._shard_file(clip)).get_tensor(f"{self.clips[clip]['id']}.{key}")

    def memory_frame(self, clip: int, candidate: int) -> torch.Tensor:
        """One memory candidate latent ``[z, 1, h, w]``."""
        sl = self._handle(self._shard_file(clip)).get_slice(f"{self.clips[clip]['id']}.memory")
        return sl[:, candidate:candidate + 1]

    def shared(self, key: str) -> torch.Tensor:
        return self._handle(self.index["shared"]["file"]).get_tensor(key)

    def pad_text(self, embedding: torch.Tensor) -> torch.Tensor:
        """Restore the zero padding to ``max_sequence_length`` that Wan's ``encode_prompt`` produces."""
        length = self.max_sequence_length
        out = embedding.new_zeros(length, embedding.shape[-1])
        n = min(length, embedding.shape[0])
        out[:n] = embedding[:n]
        return out

    def summary(self) -> str:
        text = f"{self.root}: {len(self.clips)} clips in {len(self.clusters)} clusters, " \
               f"{self.num_frames} frames at {self.height}x{self.width}, contexts {self.contexts}"
        if self.dropped:
            text += f"; dropped {self.dropped}"
        return text
