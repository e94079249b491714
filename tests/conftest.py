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
    from storymem.toy import build_tiny_components

    return build_tiny_components(seed=0)


@pytest.fixture
def tiny_pipe(tiny_components):
    from storymem import StoryMemPipeline

    pipe = StoryMemPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe
