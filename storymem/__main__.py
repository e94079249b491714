"""`python -m storymem {render,eval} ...`: the command-line entry points."""

from __future__ import annotations

import sys

USAGE = "usage: python -m storymem {render,eval} [options]  (see `python -m storymem COMMAND --help`)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    # Imported lazily so `eval` does not pay for the pipeline's imports and vice versa.
    if command == "render":
        from storymem.render import main as command_main
    elif command == "eval":
        from storymem.evaluation import main as command_main
    else:
        print(f"storymem: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    return command_main(rest)


if __name__ == "__main__":
    sys.exit(main())
