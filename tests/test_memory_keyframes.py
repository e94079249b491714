"""KeyframeSelector vs the release's algorithm restated literally (storymem.memory.reference)."""

import math

import numpy as np
import pytest
import torch

from _memory_helpers import CountingEmbedder, CountingScorer, FixedScorer, cut_video, pan_video
from storymem.memory import KeyframeSelector, NullScorer, PixelEmbedder
from storymem.memory.images import resize_for_scoring, smart_resize
from storymem.memory.reference import release_keyframes


def run_both(video, scores, memory=(), **options):
    """Our selection and the reference's on the same inputs, each with its own counting scorer/embedder."""
    ours_scorer, ref_scorer = CountingScorer(video, scores), CountingScorer(video, scores)
    ours_embedder, ref_embedder = CountingEmbedder(PixelEmbedder(8)), CountingEmbedder(PixelEmbedder(8))
    selector = KeyframeSelector(embedder=ours_embedder, scorer=ours_scorer, batch_size=16, **options)
    ours = selector.extract(video, memory)
    ref_options = {k: v for k, v in options.items() if k in ("threshold", "max_keyframes", "threshold_step")}
    ref = release_keyframes(video, ref_embedder, ref_scorer, memory, **ref_options)
    return ours, ref, (ours_scorer, ours_embedder), (ref_scorer, ref_embedder)


def check_counts(video, ours, ref, ours_tools, ref_tools, memory_images=0):
    ours_scorer, ours_embedder = ours_tools
    ref_scorer, _ = ref_tools
    # Every frame is scored at most once, and exactly the frames the release scores.
    assert len(ours_scorer.scored) == len(set(ours_scorer.scored))
    assert set(ours_scorer.scored) == set(ref_scorer.scored)
    assert all(len(call) == 1 for call in ours_scorer.calls)
    assert ours.stats.score_calls == len(ours_scorer.calls) == len(set(ref_scorer.scored))
    assert ref.score_calls == len(ref_scorer.calls) >= ours.stats.score_calls
    # Embeddings: every frame once, in batches of 16, then the full-size keyframes and the memory once.
    n = len(video)
    expected_calls = math.ceil(n / 16) + (1 if ref.candidates else 0) + (1 if ref.candidates and memory_images else 0)
    assert ours_embedder.calls == ours.stats.embed_calls == expected_calls
    assert ours.stats.embedded_images == n + len(ref.candidates) + (memory_images if ref.candidates else 0)


@pytest.mark.parametrize("threshold", [0.98, 0.9, 0.8])
@pytest.mark.parametrize("speed", [0.5, 0.7])
def test_parity_pan_across_thresholds(threshold, speed):
    video = pan_video(num_frames=16, speed=speed, seed=1)
    scores = [2.0 + 3.0 * ((7 * i) % 5) / 4 for i in range(len(video))]  # a mix of frames above / below 3.0
    ours, ref, ours_tools, ref_tools = run_both(video, scores, threshold=threshold)
    assert ours.indices == ref.indices
    assert ours.candidates == ref.candidates
    assert ours.threshold == ref.threshold  # same float: the threshold is lowered by repeated subtraction
    check_counts(video, ours, ref, ours_tools, ref_tools)
    assert ref.embed_calls > 4 * ours.stats.embed_calls


@pytest.mark.parametrize("step", [0.01, 0.05])
def test_adaptive_threshold_kicks_in(step):
    # At 0.9 the pan yields more than three candidates: the threshold has to come down.
    video = pan_video(num_frames=20, speed=0.7, seed=1)
    ours, ref, ours_tools, ref_tools = run_both(video, [5.0] * len(video), threshold_step=step)
    assert ours.indices == ref.indices
    assert ours.threshold == ref.threshold
    assert ours.stats.passes > 1 and ours.threshold < 0.9
    assert len(ours.indices) <= 3
    check_counts(video, ours, ref, ours_tools, ref_tools)
    # The reference rescans (and re-scores) on every pass; we score each frame at most once.
    assert ref.score_calls > ours.stats.score_calls


def test_no_frame_passes_the_aesthetic_bar():
    video = pan_video(num_frames=12, speed=3.0, seed=2)
    ours, ref, ours_tools, ref_tools = run_both(video, [1.0] * len(video))
    assert ours.indices == ref.indices == []
    assert ours.embeddings.shape[0] == 0
    assert ours_tools[0].scored == list(range(len(video)))  # each frame once, in order, as the release
    check_counts(video, ours, ref, ours_tools, ref_tools)


def test_all_frames_identical():
    frame = pan_video(num_frames=1, seed=4)[0]
    video = np.repeat(frame[None], 10, axis=0)
    ours, ref, _, _ = run_both(video, [9.0] * 10)
    assert ours.indices == ref.indices == [0]
    assert ours.stats.passes == 1


def test_first_keyframe_late_and_frames_before_never_picked():
    video = pan_video(num_frames=12, speed=3.0, seed=5)
    scores = [0.0] * 5 + [4.0] * 7  # frames 0..4 fail the bar
    ours, ref, ours_tools, ref_tools = run_both(video, scores)
    assert ours.indices == ref.indices
    assert ours.indices[0] == 5
    check_counts(video, ours, ref, ours_tools, ref_tools)


def test_memory_dedup_matches_release():
    video = cut_video([5, 5, 5], seed=6)
    first = run_both(video, [6.0] * len(video))[0]
    assert len(first.indices) >= 2
    remembered = [video[first.indices[1]].copy(), cut_video([1], seed=77)[0]]
    ours, ref, ours_tools, ref_tools = run_both(video, [6.0] * len(video), memory=remembered)
    assert ours.candidates == first.indices
    assert ours.indices == ref.indices == [i for i in first.indices if i != first.indices[1]]
    check_counts(video, ours, ref, ours_tools, ref_tools, memory_images=len(remembered))
    # Precomputed memory embeddings give the same answer without embedding the memory frames.
    embeddings = PixelEmbedder(8).embed(remembered)
    selector = KeyframeSelector(embedder=PixelEmbedder(8), scorer=NullScorer(), batch_size=16)
    assert selector.select(video, memory=embeddings) == ours.indices
    assert selector.last_stats.embedded_images == len(video) + len(ours.candidates)


def test_returned_embeddings_are_the_full_frames():
    video = cut_video([4, 4, 4], seed=8)
    embedder = PixelEmbedder(8)
    selection = KeyframeSelector(embedder=embedder, scorer=NullScorer()).extract(video)
    torch.testing.assert_close(selection.embeddings, embedder.embed(video[selection.indices]))
    assert selection.stats.embed_forwards == 2  # one batch of frames, one of keyframes


def test_score_batching_picks_the_same_frames_with_fewer_calls():
    video = pan_video(num_frames=20, speed=0.7, seed=9)
    scores = [1.0 if i % 3 else 6.0 for i in range(len(video))]
    reference = release_keyframes(video, PixelEmbedder(8), CountingScorer(video, scores))
    single = KeyframeSelector(embedder=PixelEmbedder(8), scorer=CountingScorer(video, scores))
    batched_scorer = CountingScorer(video, scores)
    batched = KeyframeSelector(embedder=PixelEmbedder(8), scorer=batched_scorer, score_batch_size=4)
    assert single.select(video) == batched.select(video) == reference.indices
    assert batched.last_stats.score_calls < single.last_stats.score_calls
    assert len(batched_scorer.scored) == len(set(batched_scorer.scored))  # still never scored twice
    assert max(len(c) for c in batched_scorer.calls) <= 4


def test_second_frame_quirk_option():
    # Frame 1 is a cut away from frame 0: the release's scan never looks at it.
    video = np.concatenate([cut_video([1], seed=10), cut_video([5], seed=11), cut_video([1], seed=10)])
    release_like = KeyframeSelector(embedder=PixelEmbedder(8), scorer=NullScorer())
    fixed = KeyframeSelector(embedder=PixelEmbedder(8), scorer=NullScorer(), skip_second_frame=False)
    assert release_like.select(video) == release_keyframes(video, PixelEmbedder(8), NullScorer()).indices
    assert 1 not in release_like.select(video)
    assert fixed.select(video)[:2] == [0, 1]


def test_scoring_resize_rule():
    assert smart_resize(480, 832) == (336, 588)  # 197,568 px <= 256*28*28
    h, w = smart_resize(720, 1280)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 256 * 28 * 28
    assert smart_resize(40, 56)[0] * smart_resize(40, 56)[1] >= 48 * 28 * 28  # small frames grow (Qwen's rule)
    frames = pan_video(num_frames=2, height=60, width=100)
    resized = resize_for_scoring(frames)
    assert resized.dtype == np.uint8 and resized.shape[1:3] == smart_resize(60, 100)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(2, 1000)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def selector():
    return KeyframeSelector(embedder=PixelEmbedder(8), scorer=NullScorer())


def test_empty_video(selector):
    with pytest.raises(ValueError, match="no frames"):
        selector.select(np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="no frames"):
        selector.select([])


def test_mixed_frame_sizes(selector):
    frames = [np.zeros((32, 32, 3), np.uint8), np.zeros((32, 40, 3), np.uint8)]
    with pytest.raises(ValueError, match=r"frames\[1\] is 32x40"):
        selector.select(frames)


@pytest.mark.parametrize(
    "frames, message",
    [
        (np.zeros((4, 32, 32, 4), np.uint8), r"\[N, H, W, 3\]"),
        (np.full((4, 32, 32, 3), 255.0, np.float32), r"\[0, 1\] \(uint8 images: 0..255\)"),
        (np.zeros((4, 3, 32, 32), np.uint8), r"\[N, H, W, 3\]"),
        (np.zeros((32, 32, 3), np.uint8), r"\[N, H, W, 3\]"),
    ],
)
def test_non_rgb_frames(selector, frames, message):
    with pytest.raises(ValueError, match=message):
        selector.select(frames)


def test_frames_in_every_form_of_the_image_contract(selector):
    from PIL import Image

    video = pan_video(num_frames=6)
    expected = selector.select(video)
    assert selector.select([Image.fromarray(f) for f in video]) == expected
    assert selector.select([Image.fromarray(f).convert("RGBA") for f in video]) == expected  # converted to RGB
    assert selector.select(video.astype(np.float32) / 255.0) == expected  # float in [0, 1]
    assert selector.select(torch.from_numpy(video).permute(0, 3, 1, 2)) == expected  # tensors are [N, 3, H, W]


@pytest.mark.parametrize(
    "values, message", [([float("nan")], "non-finite"), ([], "0 scores for 1"), ("x", "not numbers")]
)
def test_bad_scores(values, message):
    video = pan_video(num_frames=6)
    selector = KeyframeSelector(embedder=PixelEmbedder(8), scorer=FixedScorer(values))
    with pytest.raises(ValueError, match=message):
        selector.select(video)


def test_bad_embeddings():
    class NaNEmbedder:
        def embed(self, images):
            return torch.full((len(images), 4), float("nan"))

    with pytest.raises(ValueError, match="non-finite embeddings"):
        KeyframeSelector(embedder=NaNEmbedder(), scorer=NullScorer()).select(pan_video(num_frames=4))
    selector = KeyframeSelector(embedder=PixelEmbedder(8), scorer=NullScorer())
    with pytest.raises(ValueError, match="7 dims but the embedder gives 192"):
        selector.select(pan_video(num_frames=4), memory=torch.zeros(2, 7))


@pytest.mark.parametrize(
    "options",
    [{"threshold_step": 0.0}, {"max_keyframes": 0}, {"threshold": 1.5}, {"aesthetic_threshold": float("nan")},
     {"batch_size": 0}],  # fmt: skip
)
def test_bad_options(options):
    with pytest.raises(ValueError):
        KeyframeSelector(embedder=PixelEmbedder(8), scorer=NullScorer(), **options)
