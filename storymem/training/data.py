"""Training samples: a target clip, memory frames from *other* clips of its cluster, and its conditions.

All randomness of the data lives in :class:`MemoryBatchSampler`, a pure function of ``(seed, epoch)``: every
process of a distributed run draws the same sequence (accelerate then hands each process its share of the
batches), and a resumed run draws exactly the batches the interrupted one would have.

A batch shares its number of memory frames and its conditioning (M2V, or MI2V/MM2V context frames), so its
tensors stack; each sample has its own target, memory frames, and caption dropout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..defaults import MAX_MEMORY
from .cache import CONTEXT_KINDS, PreparedDataset

__all__ = ["SampleSpec", "MemoryBatchSampler", "MemoryClipDataset", "collate_samples"]


@dataclass(frozen=True)
class SampleSpec:
    """Which tensors make one training sample."""

    clip: int  # target clip (index into PreparedDataset.clips)
    memory: tuple[tuple[int, int], ...]  # (clip, memory candidate) pairs, oldest first; never the target clip
    context: Optional[str] = None  # None (M2V) or a cached context kind ("mi2v", "mm2v")
    drop_caption: bool = False


class MemoryBatchSampler:
    """Yields batches (lists) of :class:`SampleSpec`.

    Per epoch, every clip of a cluster with two or more clips is a target once (shuffled). Per batch: a
    memory count ``n ~ U{min_memory..max_memory}`` (capped by the smallest memory pool in the batch), or none
    with probability ``no_memory_prob`` (a story's first shot has no memory), and a conditioning (``context``
    with probability ``context_prob``, else M2V). Per sample: ``n`` memory frames drawn without replacement
    from the memory candidates of the *other* clips in the target's cluster, then ordered by clip (clips in
    random order) and by time within a clip, like keyframes of successive shots. With probability
    ``distractor_prob`` a sample of three or more memory frames has one of them replaced by a frame of a clip
    from another cluster, at a random place: a story's bank also holds other characters' shots, and the
    adapter has to follow the frames that agree with the caption and with each other, not every frame.

    Set :attr:`epoch` before iterating (the trainer does); accelerate wraps this sampler for distributed runs
    (``batch_size`` and ``drop_last`` are what it reads).
    """

    def __init__(self, clusters: list[list[int]], memory_counts: list[int], batch_size: int = 1,
                 min_memory: int = 1, max_memory: int = MAX_MEMORY, context: Optional[str] = None,
                 context_prob: float = 0.0, caption_dropout: float = 0.0, no_memory_prob: float = 0.0,
                 distractor_prob: float = 0.0, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= min_memory <= max_memory:
            raise ValueError(f"need 0 <= min_memory <= max_memory, got {min_memory}, {max_memory}")
        for name, value in (("context_prob", context_prob), ("caption_dropout", caption_dropout),
                            ("no_memory_prob", no_memory_prob), ("distractor_prob", distractor_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if context_prob > 0 and context is None:
            raise ValueError("context_prob > 0 needs a context kind ('mi2v' or 'mm2v')")
        if context is not None and context not in CONTEXT_KINDS:
            raise ValueError(f"unknown context {context!r}; expected one of {sorted(CONTEXT_KINDS)}")
        self.clusters = [list(c) for c in clusters if len(c) >= 2]
        if not self.clusters:
            raise ValueError("no cluster with two or more clips")
        self.memory_counts = list(memory_counts)
        self.targets = sorted(i for c in self.clusters for i in c)
        if len(self.targets) < batch_size:
            raise ValueError(f"{len(self.targets)} target clips cannot fill one batch of {batch_size}")
        self.cluster_of = {i: c for c in self.clusters for i in c}
        self.batch_size = batch_size
        self.drop_last = True
        self.min_memory, self.max_memory = min_memory, max_memory
        self.context, self.context_prob = context, context_prob
        self.caption_dropout = caption_dropout
        self.no_memory_prob, self.distractor_prob = no_memory_prob, distractor_prob
        if distractor_prob > 0 and len(self.clusters) < 2:
            raise ValueError("distractor_prob > 0 needs two or more clusters (distractors come from another one)")
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.targets) // self.batch_size

    def memory_pool(self, target: int) -> list[tuple[int, int]]:
        """Every memory frame a sample of ``target`` may use: candidates of the other clips of its cluster."""
        return [(c, j) for c in self.cluster_of[target] if c != target for j in range(self.memory_counts[c])]

    def __iter__(self) -> Iterator[list[SampleSpec]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        order = list(self.targets)
        rng.shuffle(order)
        for b in range(len(self)):
            targets = order[b * self.batch_size:(b + 1) * self.batch_size]
            pools = [self.memory_pool(t) for t in targets]
            n = min(rng.randint(self.min_memory, self.max_memory), *(len(p) for p in pools))
            # Extra draws only when asked for, so runs without these options keep their batches.
            if self.no_memory_prob > 0 and rng.random() < self.no_memory_prob:
                n = 0
            context = self.context if self.context_prob > 0 and rng.random() < self.context_prob else None
            batch = []
            for target, pool in zip(targets, pools):
                picked = rng.sample(pool, n)
                clip_order = list(dict.fromkeys(c for c, _ in picked))
                rng.shuffle(clip_order)
                rank = {c: r for r, c in enumerate(clip_order)}
                memory = tuple(sorted(picked, key=lambda ref: (rank[ref[0]], ref[1])))
                if n >= 3 and self.distractor_prob > 0 and rng.random() < self.distractor_prob:
                    memory = self._with_distractor(memory, target, rng)
                drop = self.caption_dropout > 0 and rng.random() < self.caption_dropout
                batch.append(SampleSpec(clip=target, memory=memory, context=context, drop_caption=drop))
            yield batch

    def _with_distractor(self, memory: tuple, target: int, rng: random.Random) -> tuple:
        """``memory`` with one frame replaced by a frame of a clip of another cluster, at a random place."""
        own = self.cluster_of[target]
        cluster = own
        while cluster is own:
            cluster = self.clusters[rng.randrange(len(self.clusters))]
        clip = cluster[rng.randrange(len(cluster))]
        frame = (clip, rng.randrange(self.memory_counts[clip]))
        memory = list(memory)
        del memory[rng.randrange(len(memory))]
        memory.insert(rng.randrange(len(memory) + 1), frame)
        return tuple(memory)


class MemoryClipDataset(torch.utils.data.Dataset):
    """Loads the tensors a :class:`SampleSpec` names from a :class:`PreparedDataset` (no encoding)."""

    def __init__(self, data: PreparedDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, spec: SampleSpec) -> dict:
        data = self.data
        if any(c == spec.clip for c, _ in spec.memory):
            raise ValueError(f"sample of clip {spec.clip} lists its own frames as memory")
        if spec.context is None:
            condition = data.shared("m2v")
        else:
            if spec.context not in data.contexts:
                raise ValueError(f"{data.root}: context {spec.context!r} was not prepared (have {data.contexts})")
            condition = data.tensor(spec.clip, spec.context)
        text = data.shared("empty_text") if spec.drop_caption else data.tensor(spec.clip, "text")
        memory = [data.memory_frame(c, j) for c, j in spec.memory]
        z, _, h, w = data.latent_shape
        sample = {
            "latents": data.tensor(spec.clip, "latents"),
            "memory_latents": torch.cat(memory, dim=1) if memory else torch.zeros(z, 0, h, w, dtype=condition.dtype),
            "video_condition": condition,
            "prompt_embeds": data.pad_text(text),
            "num_context_frames": 0 if spec.context is None else CONTEXT_KINDS[spec.context],
            "num_frames": data.num_frames,
            "clip": spec.clip,
        }
        if data.has_subject_masks:
            sample["subject_mask"] = data.tensor(spec.clip, "subject")
        return sample


def collate_samples(samples: list[dict]) -> dict:
    """Stack samples of one batch (same memory count and conditioning by construction)."""
    for key in ("num_context_frames", "num_frames"):
        values = {s[key] for s in samples}
        if len(values) != 1:
            raise ValueError(f"a batch mixes {key} values {sorted(values)}")
    batch = {
        "latents": torch.stack([s["latents"] for s in samples]),
        "memory_latents": torch.stack([s["memory_latents"] for s in samples]),
        "video_condition": torch.stack([s["video_condition"] for s in samples]),
        "prompt_embeds": torch.stack([s["prompt_embeds"] for s in samples]),
        "num_context_frames": samples[0]["num_context_frames"],
        "num_frames": samples[0]["num_frames"],
        "clips": torch.tensor([s["clip"] for s in samples]),
    }
    if all("subject_mask" in s for s in samples):
        batch["subject_mask"] = torch.stack([s["subject_mask"] for s in samples])
    return batch
