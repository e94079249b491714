"""StoryMem's visual memory: keyframe selection (CLIP similarity + HPSv3 aesthetic filter) and the memory bank.

    from storymem.memory import KeyframeSelector, MemoryBank, OpenCLIPEmbedder, HPSv3Scorer, story_take_texts

    selector = KeyframeSelector(embedder=OpenCLIPEmbedder(), scorer=HPSv3Scorer())
    bank = MemoryBank(max_memory=10, sink=3)
    texts = story_take_texts(story)  # each shot's take text, for retrieval by prompt
    picked = selector.extract(frames, memory=bank.history_embeddings(selector.embedder))
    bank.add(frames[picked.indices], shot=0, embeddings=picked.embeddings, frame_indices=picked.indices,
             text=texts[0])
    bank.set_last_frames(frames, shot=0)
    next_shot_memory = bank.frames()  # the release: sink + sliding window
    # or text-aware (storymem.memory.retrieval): the frames whose take reads like shot 1's
    entries = bank.retrieve(texts[1], TextRelevance(texts), min_relevance=0.3, relative_relevance=0.5)
    next_shot_memory = [e.frame for e in entries]
"""

from .bank import MemoryBank, MemoryBankError, MemoryEntry
from .embedders import FrameEmbedder, OpenCLIPEmbedder, PixelEmbedder
from .images import as_image_list, as_rgb_image, as_video, resize_for_scoring, smart_resize
from .keyframes import KeyframeSelection, KeyframeSelector, KeyframeStats
from .retrieval import RetrievalError, TextRelevance, select_relevant, story_take_texts, take_texts
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
    "RetrievalError",
    "TextRelevance",
    "as_image_list",
    "as_rgb_image",
    "as_video",
    "resize_for_scoring",
    "select_relevant",
    "smart_resize",
    "story_take_texts",
    "take_texts",
]


def __getattr__(name: str):
    # The HPSv3 module imports transformers; load it only when used.
    if name in ("HPSv3Scorer", "HPSv3CheckpointError"):
        from . import hpsv3

        return getattr(hpsv3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
