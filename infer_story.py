#!/usr/bin/env python
"""Render a story with StoryMem's visual memory. Same as `storymem render`; see `--help`.

    python infer_story.py --demo                     # the bundled demo story, built-in toy model, CPU
    python infer_story.py --story story.json --lora Wan2.2-MI2V-A14B --out renders/story
"""

import sys

from storymem.render.cli import main

if __name__ == "__main__":
    sys.exit(main())
