"""``storymem``: the one command-line tool (``python -m storymem`` is the same).

    storymem render --story story.json --out renders/story [...]    render a story (``storymem render --help``)
    storymem demo [--out DIR]          the bundled demo story, built-in toy model + adapter, on the CPU
    storymem prepare ...               prepare a training dataset (clips -> clusters -> cached latents)
    storymem train ...                 train a StoryMem LoRA
    storymem eval RENDER_DIR ...       ST-Bench metrics of a render
    storymem studio [...]              a web page to write, render and curate a story (the ``studio`` extra)

Each command's module is imported only when it runs, so one command does not pay for another's imports.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

__all__ = ["COMMANDS", "main"]

# command -> (module, function, summary); the function takes the remaining arguments, returns an exit code.
COMMANDS = {
    "render": ("storymem.render.cli", "main", "render a story shot by shot with visual memory"),
    "demo": ("storymem.render.cli", "main", "render the bundled demo story on the CPU (= render --demo)"),
    "prepare": ("storymem.training.cli", "main_prepare", "prepare a training dataset"),
    "train": ("storymem.training.cli", "main_train", "train a StoryMem LoRA"),
    "eval": ("storymem.evaluation.cli", "main", "ST-Bench metrics of a rendered story"),
    "studio": ("storymem.studio", "main", "a web page to write a story, watch it render and curate its memory"),
}

USAGE = f"usage: storymem {{{','.join(COMMANDS)}}} [options]  (storymem COMMAND --help for a command's options)"


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    return f"{USAGE}\n\nStoryMem: multi-shot video stories with visual memory.\n\ncommands:\n" + "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a ``storymem`` command; returns its exit code (no or an unknown command: usage on stderr, 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_help())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"storymem: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    if command == "demo":
        rest = ["--demo", *rest]
    module, function, _ = COMMANDS[command]
    return getattr(importlib.import_module(module), function)(rest)


if __name__ == "__main__":
    sys.exit(main())
