"""Parsers generated from option dataclasses (storymem.arguments)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import pytest

from storymem.arguments import add_arguments, from_args, option


@dataclass
class _Options:
    out: Path = option(Path("out"), help="output folder", group="files")
    steps: Optional[int] = option(None, help="denoising steps (default: the model's)")
    guidance: float = option(3.5, help="guidance")
    mode: Literal["a", "b"] = option("a", help="a mode")
    images: list[Path] = option(help="images", default_factory=list)
    force: bool = option(False, help="start over")
    progress: bool = option(True, help="progress bars")
    internal: int = option(7, help="set from Python only", cli=False)


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser, _Options)
    return parser, from_args(_Options, parser.parse_args(argv))


def test_defaults_types_and_switches_come_from_the_fields():
    _, options = _parse([])
    assert options == _Options()
    _, options = _parse(["--out", "x", "--steps", "4", "--guidance", "1", "--mode", "b", "--images", "a.png",
                         "b.png", "--force", "--no-progress"])
    assert options.out == Path("x") and options.steps == 4 and options.guidance == 1.0 and options.mode == "b"
    assert options.images == [Path("a.png"), Path("b.png")] and options.force and not options.progress
    assert options.internal == 7


def test_bad_values_are_refused_by_the_parser(capsys):
    for argv, message in ((["--mode", "c"], "invalid choice"), (["--steps", "x"], "invalid int value"),
                          (["--internal", "3"], "unrecognized arguments")):
        with pytest.raises(SystemExit):
            _parse(argv)
        assert message in capsys.readouterr().err


def test_help_lists_each_default_once_and_the_groups():
    parser, _ = _parse([])
    text = parser.format_help()
    assert text.count("(default: 3.5)") == 1 and "files:" in text and "(default: None)" not in text
    assert "--no-progress" in text
