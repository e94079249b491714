"""Training data pieces without models: timesteps, clustering, the memory sampler, clip sources."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from storymem.training.clustering import cluster_embeddings, clusters_from_groups
from storymem.training.data import MemoryBatchSampler
from storymem.training.errors import DataError
from storymem.training.flow import expert_timestep_range, sample_timesteps, shift_sigma, unshift_sigma
from storymem.training.sources import (
    discover_sources,
    memory_candidate_positions,
    resample_indices,
    resize_and_crop,
    select_window,
)


# ---------------------------------------------------------------------------------------------- timesteps
def test_shift_matches_wan_formula_and_inverts():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(shift_sigma(s, 5.0), 5 * s / (1 + 4 * s))
    assert torch.allclose(unshift_sigma(shift_sigma(s, 5.0), 5.0), s)


@pytest.mark.parametrize("expert,lo,hi", [("high", 900, 1000), ("low", 1, 899)])
def test_timesteps_stay_on_the_expert_side(expert, lo, hi):
    assert expert_timestep_range(expert, 0.9) == (lo, hi)
    t, sigma = sample_timesteps(20000, expert, shift=5.0, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= lo and t.max() <= hi
    assert torch.equal(sigma, t.float() / 1000)
    # The shifted-uniform law restricted to the side: unshifted, the samples are uniform on the side's u-range.
    u = unshift_sigma(sigma.double(), 5.0)
    u_lo, u_hi = unshift_sigma(torch.tensor([(lo - 0.5) / 1000, min(1.0, (hi + 0.5) / 1000)],
                                            dtype=torch.float64), 5.0).tolist()
    assert abs(float(u.mean()) - (u_lo + u_hi) / 2) < 0.01 * (u_hi - u_lo) + 2e-3
    # Both ends of the range are reached.
    assert t.min() <= lo + 5 and t.max() >= hi - 5


def test_high_side_is_most_of_the_shifted_mass():
    # With shift 5, sigma' >= 0.9 holds for u >= 0.9 / (5 - 4 * 0.9) = 0.643: the high expert sees about a third
    # of uniform u; its samples must still spread over all of 900..1000.
    t, _ = sample_timesteps(5000, "high", shift=5.0, generator=torch.Generator().manual_seed(1))
    assert len(torch.unique(t)) > 80


def test_bad_expert_and_boundary():
    with pytest.raises(ValueError, match="expert"):
        expert_timestep_range("middle")
    with pytest.raises(ValueError, match="boundary_ratio"):
        expert_timestep_range("high", 1.5)


# ---------------------------------------------------------------------------------------------- clustering
def _blobs(sizes, dim=8, seed=0, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(len(sizes), dim, generator=g), dim=1)
    rows, labels = [], []
    for k, n in enumerate(sizes):
        rows.append(centres[k] + spread * torch.randn(n, dim, generator=g))
        labels += [k] * n
    perm = torch.randperm(sum(sizes), generator=g)
    return torch.cat(rows)[perm], [labels[i] for i in perm.tolist()]


def test_clusters_recover_separated_groups_deterministically():
    x, labels = _blobs([10, 12, 8])
    clusters = cluster_embeddings(x, target_size=10, seed=0)
    assert sorted(i for c in clusters for i in c) == list(range(30))
    assert all(len({labels[i] for i in c}) == 1 for c in clusters), clusters
    assert sorted(len(c) for c in clusters) == [8, 10, 12]
    assert cluster_embeddings(x, target_size=10, seed=0) == clusters


def test_clusters_respect_max_size_and_identical_embeddings():
    x = torch.ones(37, 4)  # nothing to separate: cut in order
    clusters = cluster_embeddings(x, target_size=8, max_size=10)
    assert sorted(i for c in clusters for i in c) == list(range(37))
    assert max(len(c) for c in clusters) <= 10
    x, _ = _blobs([50], seed=3, spread=0.5)
    assert max(len(c) for c in cluster_embeddings(x, target_size=6, max_size=9)) <= 9


def test_clusters_from_groups():
    assert clusters_from_groups(["b", "a", "b", "c"]) == [[0, 2], [1], [3]]


# ---------------------------------------------------------------------------------------------- sampler
CLUSTERS = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15]]


def _sampler(**kw):
    args = dict(clusters=CLUSTERS, memory_counts=[3] * 16, batch_size=2, min_memory=1, max_memory=10,
                context="mi2v", context_prob=0.5, seed=0)
    args.update(kw)
    return MemoryBatchSampler(**args)


def test_memory_never_comes_from_the_target_clip():
    sampler = _sampler()
    cluster_of = {i: set(c) for c in CLUSTERS for i in c}
    counts, contexts, seen_targets = Counter(), Counter(), Counter()
    for epoch in range(60):
        sampler.epoch = epoch
        batches = list(sampler)
        assert len(batches) == len(sampler) == 8
        for batch in batches:
            assert len({len(s.memory) for s in batch}) == 1  # one memory count per batch
            assert len({s.context for s in batch}) == 1
            contexts[batch[0].context] += 1
            for spec in batch:
                seen_targets[spec.clip] += 1
                clips = [c for c, _ in spec.memory]
                assert spec.clip not in clips, spec
                assert set(clips) <= cluster_of[spec.clip] - {spec.clip}
                assert len(set(spec.memory)) == len(spec.memory)  # no frame twice
                assert all(0 <= j < 3 for _, j in spec.memory)
                assert 1 <= len(spec.memory) <= 10
                counts[len(spec.memory)] += 1
    assert set(seen_targets) == set(range(16))
    # Every count 1..10 occurs, but a batch is capped by its smallest pool (3 frames of the one other clip of [5, 6]).
    assert set(counts) == set(range(1, 11))
    assert 0.35 < contexts["mi2v"] / sum(contexts.values()) < 0.65


def test_sampler_is_a_function_of_seed_and_epoch():
    a, b = _sampler(), _sampler()
    a.epoch = b.epoch = 3
    assert list(a) == list(b)
    b.epoch = 4
    assert list(a) != list(b)
    assert list(_sampler(seed=1)) != list(_sampler(seed=0))


def test_memory_ordered_by_clip_then_time():
    sampler = _sampler(batch_size=1, min_memory=6, max_memory=6, clusters=[list(range(10))], memory_counts=[4] * 10)
    for spec in [s for batch in sampler for s in batch]:
        clips = [c for c, _ in spec.memory]
        # Frames of one clip are adjacent and in time order.
        for c in set(clips):
            where = [i for i, x in enumerate(clips) if x == c]
            assert where == list(range(where[0], where[-1] + 1))
            frames = [spec.memory[i][1] for i in where]
            assert frames == sorted(frames)


def test_no_memory_batches_and_distractors_from_another_cluster():
    cluster_of = {i: set(c) for c in CLUSTERS for i in c}
    sampler = _sampler(min_memory=4, max_memory=10, no_memory_prob=0.3, distractor_prob=0.5)
    batches, counts, with_distractor, eligible = [], Counter(), 0, 0
    for epoch in range(40):
        sampler.epoch = epoch
        batches += list(sampler)
    for batch in batches:
        n = len(batch[0].memory)
        counts[n == 0] += 1
        for spec in batch:
            assert len(spec.memory) == n and len(set(spec.memory)) == n
            clips = [c for c, _ in spec.memory]
            assert spec.clip not in clips
            foreign = [c for c in clips if c not in cluster_of[spec.clip]]
            assert len(foreign) <= 1  # at most one distractor, always from another cluster
            if n >= 3:
                eligible += 1
                with_distractor += bool(foreign)
            else:
                assert not foreign
    assert 0.2 < counts[True] / sum(counts.values()) < 0.4
    assert 0.4 < with_distractor / eligible < 0.6
    # Without the options a run draws exactly the batches it drew before they existed.
    plain, off = _sampler(), _sampler(no_memory_prob=0.0, distractor_prob=0.0)
    assert list(plain) == list(off)
    with pytest.raises(ValueError, match="no_memory_prob"):
        _sampler(no_memory_prob=1.5)
    with pytest.raises(ValueError, match="two or more clusters"):
        _sampler(clusters=[list(range(6))], memory_counts=[3] * 6, distractor_prob=0.5)


def test_sampler_rejects_bad_settings():
    with pytest.raises(ValueError, match="two or more"):
        MemoryBatchSampler([[0], [1]], [1, 1])
    with pytest.raises(ValueError, match="context"):
        MemoryBatchSampler(CLUSTERS, [3] * 16, context=None, context_prob=0.5)
    with pytest.raises(ValueError, match="min_memory"):
        MemoryBatchSampler(CLUSTERS, [3] * 16, min_memory=4, max_memory=2)


# ---------------------------------------------------------------------------------------------- sources
def test_resample_indices_and_window():
    # 30 fps -> 16 fps: timestamps k/16 s, nearest earlier source frame.
    idx = resample_indices(60, 30.0, 16.0)
    assert idx[:5] == [0, 1, 3, 5, 7] and len(idx) == 32
    assert resample_indices(10, 0.0, 16.0) == list(range(10))  # unknown rate: every frame
    assert select_window(20, 9, "center") == 5 and select_window(20, 9, "start") == 0
    assert select_window(8, 9) is None


def test_resize_and_crop_covers_and_centres():
    frames = np.zeros((2, 40, 80, 3), np.uint8)
    frames[:, :, 38:42] = 255  # a vertical bar in the middle
    out = resize_and_crop(frames, 32, 32)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    column = out[0, 16].astype(int).sum(-1)
    assert column[15:17].min() > 300 and column[:8].max() == 0  # bar stays centred, sides cropped


def test_memory_candidate_positions():
    assert memory_candidate_positions(81, 4) == [10, 30, 50, 70]
    assert memory_candidate_positions(9, 1) == [4]


def test_manifest_errors_name_the_line(tmp_path):
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text(json.dumps({"file": "a.mp4", "caption": "x"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"clips.jsonl:2"):
        discover_sources(manifest=manifest)
    manifest.write_text(json.dumps({"caption": "x"}) + "\n")
    with pytest.raises(DataError, match=r"clips.jsonl:1: field 'file'"):
        discover_sources(manifest=manifest)
    manifest.write_text(json.dumps({"file": "a.mp4", "caption": "x", "start": 3, "end": 1}) + "\n")
    with pytest.raises(DataError, match="'end'"):
        discover_sources(manifest=manifest)
    manifest.write_text(json.dumps({"file": "a.mp4", "caption": "x", "group": "g"}) + "\n"
                        + json.dumps({"file": "b.mp4", "caption": "y"}) + "\n")
    with pytest.raises(DataError, match="every entry or on none"):
        discover_sources(manifest=manifest)


def test_sidecar_captions(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "a.txt").write_text("  a red circle  \n")
    (tmp_path / "b.mp4").write_bytes(b"")
    (tmp_path / "c.txt").write_text("orphan caption")
    sources = discover_sources(tmp_path)
    assert [(s.path.name, s.caption) for s in sources] == [("a.mp4", "a red circle"), ("b.mp4", None)]


def test_split_shots_without_pyscenedetect_is_a_clear_error(tmp_path):
    try:
        import scenedetect  # noqa: F401
        pytest.skip("PySceneDetect is installed")
    except ImportError:
        pass
    from storymem.training import PrepareConfig, prepare_dataset

    (tmp_path / "a.mp4").write_bytes(b"")
    config = PrepareConfig(output_dir=tmp_path / "out", clips_dir=tmp_path, height=32, width=32, num_frames=9,
                           split_shots=True, embedder="pixel")
    with pytest.raises(ImportError, match="pip install scenedetect"):
        prepare_dataset(config, progress=False)
