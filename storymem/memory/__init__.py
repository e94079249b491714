"""StoryMem's visual memory: keyframe selection (CLIP similarity + HPSv3 aesthetic filter) and the memory bank.

    from storymem.memory import KeyframeSelector, MemoryBank, OpenCLIPEmbedder, HPSv3Scorer

    selector = KeyframeSelector(embedder=OpenCLIPEmbedder(), scorer=HPSv3Scorer())
    bank = MemoryBank(max_memory=10, sink=3)
    picked = selector.extract(frames, memory=bank.history_embeddings(selector.embedder))
    bank.add(frames[picked.indices], shot=0, embeddings=picked.embeddings, frame_indices=picked.indices)
    bank.set_last_frames(frames, shot=0)
    next_shot_memory = bank.frames()
"""

from .bank import MemoryBank, MemoryBankError, MemoryEntry
from .embedders import FrameEmbedder, OpenCLIPEmbedder, PixelEmbedder
from .images import as_image_list, as_rgb_image, as_video, resize_for_scoring, smart_resize
from .keyframes import KeyframeSelection, KeyframeSelector, KeyframeStats
from .scorers import AestheticScorer, NullScorer

__all__ = [
    "AestheticScorer",
    "FrameEmbedder",
    "HPSv3CheckpointError",
    "HPSv3Scorer",
    "KeyframeSelection",
    "KeyframeSelector",
    "KeyframeStats",
    "MemoryBank",
    "MemoryBankError",
    "MemoryEntry",
    "NullScorer",
    "OpenCLIPEmbedder",
    "PixelEmbedder",
    "as_image_list",
    "as_rgb_image",
    "as_video",
    "resize_for_scoring",
    "smart_resize",
]


def __getattr__(name: str):
    # The HPSv3 module imports transformers; load it only when used.
    if name in ("HPSv3Scorer", "HPSv3CheckpointError"):
        from . import hpsv3

        return getattr(hpsv3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
