"""``python -m storymem COMMAND ...``: the same as the ``storymem`` command (:mod:`storymem.cli`)."""

import sys

from storymem.cli import main

if __name__ == "__main__":
    sys.exit(main())
