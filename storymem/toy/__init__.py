"""The small built-in world: tiny Wan-architecture models built from code (no download), used by the demo
(`infer_story.py --demo`) and the tests. Same classes and code path as the real Wan2.2 model."""

from .models import TinyConfig, build_tiny_components, build_tokenizer

__all__ = ["TinyConfig", "build_tiny_components", "build_tokenizer"]
