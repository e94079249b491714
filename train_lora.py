#!/usr/bin/env python
"""Train a StoryMem (Memory-to-Video) LoRA for Wan2.2-I2V: ``train_lora.py prepare|train`` is
``storymem prepare|train`` (see ``--help`` of each)."""

import sys

from storymem.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
