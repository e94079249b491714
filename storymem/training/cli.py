"""The ``storymem prepare`` and ``storymem train`` commands (``train_lora.py prepare|train`` is the same).

Their flags are generated from :class:`~storymem.training.PrepareConfig` and :class:`~storymem.training.TrainConfig`
(:mod:`storymem.arguments`): the fields' help texts are the ``--help``. Each entry point returns an exit code:
0 done, 2 bad input (one line ``error: ...`` naming the flag or file at fault), 130 stopped by Ctrl-C, 143 by
SIGTERM (training saves a checkpoint first and says where; ``--resume latest`` continues).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Callable, Optional, Sequence

from ..arguments import add_arguments, from_args
from .config import PrepareConfig, TrainConfig
from .errors import DataError, TrainingConfigError, TrainingDivergedError, TrainingInterrupted

__all__ = ["main", "main_prepare", "main_train", "build_prepare_parser", "build_train_parser"]

PREPARE_DESCRIPTION = """\
Cache latents and text embeddings of captioned single-shot clips, grouped into clusters of related clips.

  storymem prepare --clips data/clips --out data/prepared
  storymem prepare --manifest clips.jsonl --out data/prepared --contexts mi2v,mm2v

--base toy / --base tiny try the whole flow on the CPU with a built-in base."""

TRAIN_DESCRIPTION = """\
Train a StoryMem (Memory-to-Video) adapter on one expert of Wan2.2-I2V, on a prepared dataset.

  accelerate launch -m storymem train --config lora_configs/mi2v_rank128.json --data data/prepared \\
      --expert high --output runs/mi2v-high
  (then --expert low --output runs/mi2v-low: each expert trains on its side of the timestep boundary)

Multi-GPU: accelerate launch --config_file configs/accelerate_fsdp.yaml ...
Ctrl-C or SIGTERM ends the current step, saves a checkpoint and stops; --resume latest continues. An --output
that holds an earlier run is refused unless --resume latest continues it or --overwrite starts it again."""


class _OneLineParser(argparse.ArgumentParser):
    """A parser whose refusals are one line (the flag and why, and where the help is), not the whole usage."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _parser(prog: str, description: str, config_class) -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, config_class)
    return parser


def build_prepare_parser(prog: str = "storymem prepare") -> argparse.ArgumentParser:
    return _parser(prog, PREPARE_DESCRIPTION, PrepareConfig)


def build_train_parser(prog: str = "storymem train") -> argparse.ArgumentParser:
    return _parser(prog, TRAIN_DESCRIPTION, TrainConfig)


def main_prepare(argv: Optional[Sequence[str]] = None, prog: str = "storymem prepare") -> int:
    """``storymem prepare``: build a prepared dataset; print its summary."""
    def prepare(args) -> None:
        from .prepare import prepare_dataset

        print(prepare_dataset(from_args(PrepareConfig, args)).format())

    return _run(build_prepare_parser(prog), PrepareConfig, prepare, argv)


def main_train(argv: Optional[Sequence[str]] = None, prog: str = "storymem train") -> int:
    """``storymem train``: train (or resume) an adapter; the first process prints where it is."""
    def train_adapter(args) -> None:
        from .trainer import train

        result = train(from_args(TrainConfig, args))
        if _is_main_process():
            print(f"trained {result.global_step} steps; adapter: {result.adapter_dir}")

    return _run(build_train_parser(prog), TrainConfig, train_adapter, argv)


COMMANDS: dict[str, Callable[..., int]] = {"prepare": main_prepare, "train": main_train}


def main(argv: Optional[Sequence[str]] = None, prog: str = "train_lora.py") -> int:
    """``prepare ...`` or ``train ...``: the command named by the first word."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: {prog} {{prepare,train}} [options]  (see `{prog} COMMAND --help`)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage if not argv else f"{prog}: unknown command {argv[0]!r}\n{usage}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:], prog=f"{prog} {argv[0]}")


# ---------------------------------------------------------------------------------------------- running
def _is_main_process() -> bool:
    # Under `accelerate launch` / torchrun, only the first process reports.
    return int(os.environ.get("RANK", "0")) == 0


def _run(parser: argparse.ArgumentParser, config_class, command: Callable, argv) -> int:
    """Parse ``argv`` and run ``command(args)``, turning bad input into exit code 2 and a stop signal into
    128 + its number (130 Ctrl-C, 143 SIGTERM), each with one line on stderr."""
    from ..lora import AdapterError
    from ..video import VideoError
    from .signals import terminate_as_interrupt

    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a flag the parser refused (2, after printing why)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if _is_main_process() else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with terminate_as_interrupt():
            command(args)
    except TrainingInterrupted as e:
        print(e.message, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except TrainingConfigError as e:
        flag = _flag_of(config_class, e.option) if e.option else None
        _error(f"{flag}: {e.detail}" if flag else str(e))
        return 2
    except (DataError, AdapterError, VideoError, TrainingDivergedError, FileNotFoundError, ImportError) as e:
        _error(str(e))
        return 2
    except OSError as e:  # a folder that cannot be written, a full disk
        _error(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
        return 2
    return 0


def _flag_of(config_class, name: str) -> Optional[str]:
    """The command-line flag of a config field, as :func:`storymem.arguments.add_arguments` names it."""
    for f in dataclasses.fields(config_class):
        if f.name == name and f.metadata.get("cli", False):
            return f.metadata.get("flag") or "--" + name.replace("_", "-")
    return None


def _error(message: str) -> None:
    """One line on stderr, whatever the message holds (ffmpeg's output, a multi-line library error)."""
    print("error: " + "; ".join(line.strip() for line in message.splitlines() if line.strip()), file=sys.stderr)
