"""``storymem render`` (also ``storymem demo`` and ``infer_story.py``): the parser is generated from
:class:`RenderOptions` (and the story's two flags below), so names, defaults and help live on the fields."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..arguments import add_arguments, from_args, option
from .options import GROUP_TITLES, RenderError, RenderOptions

__all__ = ["StoryArguments", "build_parser", "options_from_args", "main"]

DEMO_OUT = "storymem_demo"


@dataclass
class StoryArguments:
    """What to render: a story file, or the bundled demo story."""

    story: Optional[Path] = option(
        None, group="story", metavar="FILE",
        help="story script: ST-Bench JSON, a JSON list of prompts, or a .txt (one prompt a line)")
    demo: bool = option(
        False, group="story",
        help="render the bundled demo story with the small world's trained model and its M2V adapter on the CPU "
             "(--base toy --lora toy; `storymem demo`)")


class _Parser(argparse.ArgumentParser):
    """argparse with its refusals as one line (``error: ...``, exit code 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message} ({self.prog} --help lists the flags)\n")


def build_parser(prog: str = "storymem render") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="Render a story script shot by shot with StoryMem's visual memory (Wan2.2-I2V-A14B + M2V "
                    "LoRA). Rerun the same command to resume an interrupted render.")
    add_arguments(parser, StoryArguments, GROUP_TITLES)
    add_arguments(parser, RenderOptions, GROUP_TITLES)
    return parser


def options_from_args(args: argparse.Namespace) -> tuple[Any, RenderOptions]:
    """(story, options) from parsed flags; the story is loaded (and validated) here. ``--demo`` renders the
    bundled story with the built-in toy model and its adapter on the CPU unless told otherwise."""
    from ..builtin import DEMO_STORY, is_builtin
    from ..story import load_story

    chosen = from_args(StoryArguments, args)
    if chosen.demo and chosen.story:
        raise RenderError("pass --story or --demo, not both")
    if not chosen.demo and not chosen.story:
        raise RenderError("no story: pass --story FILE (or --demo for the bundled demo)")
    if chosen.demo and args.base is not None and not is_builtin(args.base):
        raise RenderError("--demo renders with the small world's built-in model; drop --base or use --story")
    story_path = DEMO_STORY if chosen.demo else Path(chosen.story)
    story = load_story(story_path)

    overrides: dict = {}
    if args.out_dir is None:
        overrides["out_dir"] = Path(DEMO_OUT if chosen.demo else Path("outputs") / story_path.stem)
    if chosen.demo:  # (an empty --base or --device is refused by the options, not replaced here)
        base = "toy" if args.base is None else args.base
        overrides.update(base=base, device="cpu" if args.device is None else args.device)
        if args.lora is None and base == "toy":
            overrides["lora"] = "toy"  # the demo is the small world's model with its M2V adapter
    return story, from_args(RenderOptions, args, **overrides)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``storymem render``; returns the exit code (0 ok; 2 bad input, nothing loaded or written, or a render that
    cannot go on - the folder in use, a model that does not load, a shot that decodes to nothing; 1 a failed
    write; 130 interrupted). Every error is one line on stderr."""
    from ..memory import MemoryBankError
    from ..story import StoryError
    from .plan import MANIFEST_NAME, prepare
    from .renderer import StoryRenderer

    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        story, options = options_from_args(args)
        plan = prepare(story, options)
    except (RenderError, StoryError, MemoryBankError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2

    renderer = StoryRenderer(plan)
    try:
        manifest = renderer.run()
    except KeyboardInterrupt:
        done = len(renderer.manifest.get("shots", []))
        if renderer.is_main:
            print(f"\ninterrupted: {done} of {len(story)} shots are finished in {plan.options.out_dir}; rerun the "
                  "same command to continue", file=sys.stderr)
        return 130
    except RenderError as err:  # the folder is in use, a model that cannot load, a broken shot
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # writing failed (a full disk, a folder made read-only meanwhile): finished shots stay
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"error: {where}{err.strerror or _one_line(err)}; the shots listed in {plan.options.out_dir}/"
              f"{MANIFEST_NAME} are complete, rerun the same command to continue", file=sys.stderr)
        return 1
    if renderer.is_main:
        out = Path(plan.options.out_dir)
        done = len(manifest["shots"])
        print(f"{done} of {len(story)} shots of {story.name!r} rendered in {out}/")
        if done:
            print(f"  story video:   {out / 'story.mp4'}\n  page:          {out / 'index.html'}\n"
                  f"  contact sheet: {out / 'contact_sheet.png'}\n  shots:         {out / 'shots'}/\n"
                  f"  manifest:      {out / MANIFEST_NAME}")
    return 0
