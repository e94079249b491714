"""storymem: multi-shot video storytelling with visual memory (StoryMem's Memory-to-Video) for diffusers."""

__version__ = "0.1.0"

# Heavy imports (diffusers, open_clip) are deferred until a name is used.
_LAZY = {
    "StoryMemPipeline": "storymem.pipeline",
    "size_from_area": "storymem.pipeline",
    "WAN_NEGATIVE_PROMPT": "storymem.defaults",
    "RELEASE_DEFAULTS": "storymem.defaults",
    "StoryMemLoraConfig": "storymem.lora",
    "load_storymem_lora": "storymem.lora",
    "save_storymem_lora": "storymem.lora",
    "build_memory_condition": "storymem.conditioning",
    "MemoryRotaryPosEmbed": "storymem.rope",
    "load_story": "storymem.story",
    "Story": "storymem.story",
    "MemoryBank": "storymem.memory",
    "KeyframeSelector": "storymem.memory",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'storymem' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
