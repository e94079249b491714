"""``storymem render`` (also ``storymem demo`` and ``infer_story.py``): the parser is generated from
:class:`RenderOptions` (and the story's flags below), so names, defaults and help live on the fields.

One ``--story FILE`` renders that story into ``--out``; several (``--story a.json b.json``, ``--story`` given
again, or a folder of scripts) render a batch: each story into ``--out/<file stem>/``, shared between the
processes of a torchrun launch (:mod:`storymem.render.batch`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..arguments import add_arguments, from_args, option
from .options import GROUP_TITLES, RenderError, RenderOptions

__all__ = ["StoryArguments", "build_parser", "options_from_args", "is_batch", "main"]

DEMO_OUT = "storymem_demo"
BATCH_OUT = Path("outputs") / "batch"


@dataclass
class StoryArguments:
    """What to render: a story file, or the bundled demo story."""

    # The flag is declared in build_parser: it may be given several times (argparse's "extend").
    story: list[Path] = option(
        default_factory=list, cli=False,
        help="story script: ST-Bench JSON, a JSON list of prompts, or a .txt (one prompt a line); several "
             "scripts or a folder of them render a batch, each story into --out/<file name>/")
    demo: bool = option(
        False, group="story",
        help="render the bundled demo story with the small world's trained model and its M2V adapter on the CPU "
             "(--base toy --lora toy; `storymem demo`)")
    cp_degree: Optional[int] = option(
        None, group="story", metavar="G",
        help="batch with --parallel: processes that split each shot (groups of G consecutive ranks each render "
             "their own stories; default: the processes of one machine)")


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
    story_help = next(f for f in dataclasses.fields(StoryArguments) if f.name == "story").metadata["help"]
    group = next(g for g in parser._action_groups if g.title == "story")
    group.add_argument("--story", dest="story", type=Path, nargs="+", action="extend", default=None,
                       metavar="FILE", help=story_help)
    add_arguments(parser, RenderOptions, GROUP_TITLES)
    return parser


def is_batch(stories) -> bool:
    """Several story scripts, or a folder of them: a batch render."""
    return len(stories) > 1 or any(Path(s).is_dir() for s in stories)


def options_from_args(args: argparse.Namespace) -> tuple[Any, RenderOptions]:
    """(story, options) from parsed flags; the story is loaded (and validated) here. ``--demo`` renders the
    bundled story with the built-in toy model and its adapter on the CPU unless told otherwise."""
    from ..builtin import DEMO_STORY, is_builtin
    from ..story import load_story

    chosen = from_args(StoryArguments, args, story=list(args.story or []))
    if is_batch(chosen.story):
        raise RenderError("several stories render as a batch (storymem.render.batch), not one story")
    if chosen.cp_degree is not None:
        raise RenderError("--cp-degree applies to a batch (several --story scripts or a folder); one story "
                          "splits its shots over all the processes of the launch")
    if chosen.demo and chosen.story:
        raise RenderError("pass --story or --demo, not both")
    if not chosen.demo and not chosen.story:
        raise RenderError("no story: pass --story FILE (or --demo for the bundled demo)")
    if chosen.demo and args.base is not None and not is_builtin(args.base):
        raise RenderError("--demo renders with the small world's built-in model; drop --base or use --story")
    story_path = DEMO_STORY if chosen.demo else Path(chosen.story[0])
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
    if is_batch(args.story or []):
        return _main_batch(args)
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


def _main_batch(args: argparse.Namespace) -> int:
    """``storymem render`` with several stories: every script is read first (a broken one is named and skipped),
    then this process renders its share (:func:`~storymem.render.batch.render_batch`)."""
    from .batch import find_story_files, load_batch_stories, render_batch

    chosen = from_args(StoryArguments, args, story=list(args.story))
    first = os.environ.get("RANK", "0") == "0"  # what every process finds alike, one of them says
    try:
        if chosen.demo:
            raise RenderError("--demo renders the bundled story; pass --story or --demo, not both")
        files = find_story_files(chosen.story)
        stories = load_batch_stories(files)
        overrides: dict = {}
        if args.out_dir is None:
            folders = [Path(s) for s in chosen.story if Path(s).is_dir()]
            overrides["out_dir"] = Path("outputs") / folders[0].name if len(chosen.story) == 1 else BATCH_OUT
        options = from_args(RenderOptions, args, **overrides)
        if first:
            for bad in (s for s in stories if s.story is None):
                print(f"error: story {bad.name!r} is skipped: {bad.error}", file=sys.stderr)
        return render_batch(stories, options, cp_degree=chosen.cp_degree, progress=options.progress)
    except RenderError as err:
        if first:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the stories' loop (which records what it was doing and returns 130)
        return 130
