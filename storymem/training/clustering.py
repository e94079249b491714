"""Grouping clips into clusters of related clips by embedding similarity.

StoryMem trains each target clip with memory frames drawn from ~15 related clips. Clusters here come from
spherical k-means on L2-normalised clip embeddings (k-means++ seeding from a fixed seed, so the result is a
pure function of the embeddings, the target size and the seed); clusters larger than ``max_size`` are split
again, recursively.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["cluster_embeddings", "clusters_from_groups"]


def _kmeans_pp_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    # Squared chordal distance on the sphere: 2 - 2 cos.
    dist = (2 - 2 * x @ centres[0]).clamp_min(0)
    for _ in range(1, k):
        total = float(dist.sum())
        if total <= 1e-12:  # every point coincides with a centre: pick any unused point
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial(dist / total, 1, generator=generator))
        centres.append(x[idx])
        dist = torch.minimum(dist, (2 - 2 * x @ x[idx]).clamp_min(0))
    return torch.stack(centres)


def _spherical_kmeans(x: torch.Tensor, k: int, seed: int, iterations: int) -> torch.Tensor:
    """Labels ``[N]`` of spherical k-means on unit rows of ``x``."""
    generator = torch.Generator().manual_seed(seed)
    centres = _kmeans_pp_init(x, k, generator)
    labels = None
    for _ in range(iterations):
        new_labels = (x @ centres.T).argmax(dim=1)
        if labels is not None and torch.equal(new_labels, labels):
            break
        labels = new_labels
        for c in range(k):
            members = x[labels == c]
            if len(members) == 0:
                # Re-seed an empty cluster with the point farthest from its centre.
                far = int((x * centres[labels]).sum(1).argmin())
                centres[c] = x[far]
            else:
                mean = members.sum(0)
                centres[c] = mean / mean.norm().clamp_min(1e-12)
    return labels


def cluster_embeddings(embeddings: torch.Tensor, target_size: int = 16, max_size: Optional[int] = None,
                       seed: int = 0, iterations: int = 50) -> list[list[int]]:
    """Partition rows of ``embeddings`` (``[N, D]``, normalised here) into clusters of about ``target_size``.

    Returns clusters as sorted lists of row indices, ordered by their first index. Every row is in exactly
    one cluster; a cluster never exceeds ``max_size`` (default ``2 * target_size``). Singletons can occur
    (an outlier clip); callers decide what to do with them.
    """
    if target_size < 2:
        raise ValueError(f"target cluster size must be >= 2, got {target_size}")
    max_size = max_size or 2 * target_size
    if max_size < target_size:
        raise ValueError(f"max cluster size ({max_size}) must be >= the target size ({target_size})")
    n = embeddings.shape[0]
    if n == 0:
        return []
    x = torch.nn.functional.normalize(embeddings.detach().to(torch.float64).cpu(), dim=1)

    done: list[list[int]] = []
    pending = [(list(range(n)), max(1, round(n / target_size)))]
    while pending:
        members, k = pending.pop()
        if k <= 1 or len(members) <= 1:
            groups = [members]
        else:
            labels = _spherical_kmeans(x[members], k, seed, iterations)
            groups = [[members[i] for i in (labels == c).nonzero().flatten().tolist()] for c in range(k)]
            groups = [g for g in groups if g]
            if len(groups) == 1:  # identical embeddings: k-means cannot split, cut in index order
                size = math.ceil(len(members) / k)
                groups = [members[i:i + size] for i in range(0, len(members), size)]
        for group in groups:
            if len(group) > max_size:
                pending.append((group, math.ceil(len(group) / target_size)))
            else:
                done.append(sorted(group))
    return sorted(done, key=lambda g: g[0])


def clusters_from_groups(groups: list[str]) -> list[list[int]]:
    """Clusters given by labels (one per clip), ordered by first member."""
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(groups):
        by_label.setdefault(label, []).append(i)
    return sorted(by_label.values(), key=lambda g: g[0])
