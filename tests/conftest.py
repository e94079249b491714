"""Shared test setup: everything offline, tiny models built from code."""

import os

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_components():
    """A fresh set of tiny Wan2.2-I2V components (two experts), same weights every call."""
    from storymem.builtin.tiny import build_tiny_components

    return build_tiny_components(seed=0)


@pytest.fixture
def tiny_pipe(tiny_components):
    from storymem import StoryMemPipeline

    pipe = StoryMemPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def spy(monkeypatch):
    """Record every StoryMemPipeline call: its keyword arguments and the uint8 frames it returned."""
    import numpy as np

    from storymem.pipeline import StoryMemPipeline

    calls = []
    original = StoryMemPipeline.__call__

    def recorded(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        frames = np.round(np.clip(np.asarray(out.frames[0]), 0.0, 1.0) * 255.0).astype(np.uint8)
        calls.append({"kwargs": kwargs, "frames": frames})
        return out

    monkeypatch.setattr(StoryMemPipeline, "__call__", recorded)
    return calls
