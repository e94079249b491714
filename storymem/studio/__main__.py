"""``python -m storymem.studio``: the same as ``storymem studio``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
