"""``storymem eval RENDER_DIR [...]``: ST-Bench metrics of a rendered story, printed as a table and written as
JSON (atomically) with a shot x shot similarity chart beside it. Over a batch folder (``storymem render`` with
several stories) it scores every story with the same models and writes the benchmark table
(:mod:`~storymem.evaluation.benchmark`); ``--compare A B`` prints two such tables side by side
(:mod:`~storymem.evaluation.compare`).

The flags are generated from :class:`EvalOptions` (help text on its fields). Every input is checked before any
model loads; a bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from storymem.arguments import add_arguments, from_args, option
from storymem.devices import DTYPE_NAMES

from .encoders import (
    EvalError,
    FrameScorer,
    HPSv3FrameScorer,
    LaionAestheticScorer,
    OpenCLIPVideoEncoder,
    ViCLIPEncoder,
    VideoTextEncoder,
)
from .benchmark import BENCHMARK_NAME, collect_batch, evaluate_batch, format_benchmark, is_batch_folder, write_benchmark
from .metrics import EvalConfig, collect_shots, evaluate
from .report import format_report, write_report

__all__ = ["EvalOptions", "build_aesthetic", "build_encoder", "build_parser", "main", "parse_options"]

PROG = "storymem eval"
_TITLES = {"encoder": "video-text encoder", "aesthetic": "aesthetic quality", "sampling": "sampling",
           "runtime": "runtime"}


@dataclass
class EvalOptions:
    """What ``storymem eval`` computes and with which models."""

    out_dir: Path = option(Path("."), help="the render folder", cli=False)  # the positional RENDER_DIR
    compare: list[Path] = option(
        default_factory=list, metavar="TABLE",
        help="print two benchmark tables side by side: --compare A B, each a benchmark.json, a batch folder "
             "holding one, or one story's metrics.json (RENDER_DIR is then not given)")
    story: Optional[Path] = option(None, help="story script (required without manifest.json; overrides the "
                                              "manifest's)")
    output: Optional[Path] = option(None, help="report JSON path (default RENDER_DIR/metrics.json, or "
                                               "BATCH/benchmark.json for a batch folder); the chart goes beside it")
    plot: bool = option(True, help="write the similarity chart")
    encoder: Optional[str] = option(None, choices=("openclip", "viclip"), group="encoder",
                                    help="video-text encoder (default: viclip when --viclip-checkpoint is given, "
                                         "else openclip)")
    clip_model: str = option("ViT-L-14", group="encoder", help="open_clip architecture")
    clip_pretrained: str = option("openai", group="encoder",
                                  help="open_clip weights: a tag, a local file, or 'none' (random weights)")
    viclip_checkpoint: Optional[Path] = option(None, group="encoder",
                                               help="ViCLIP checkpoint (ViClip-InternVid-10M-FLT.pth or .safetensors)")
    aesthetic_head: Optional[Path] = option(None, group="aesthetic",
                                            help="LAION aesthetic head sa_0_4_vit_l_14_linear.pth (or .safetensors)")
    aesthetic_clip_model: str = option("ViT-L-14", group="aesthetic", help="CLIP for the LAION head")
    aesthetic_clip_pretrained: str = option("openai", group="aesthetic", help="its weights")
    hpsv3: Optional[str] = option(None, group="aesthetic",
                                  help="HPSv3 checkpoint (HPSv3.safetensors, its folder, or a Hub id) instead of LAION")
    hpsv3_base: Optional[str] = option(None, group="aesthetic",
                                       help="Qwen2-VL-7B-Instruct processor/config for HPSv3 (Hub id or folder)")
    frames: int = option(8, group="sampling", help="frames sampled per shot for the video embeddings")
    aesthetic_frames: Optional[int] = option(None, group="sampling",
                                             help="frames per shot for the aesthetic score (default: all)")
    top_k: int = option(10, group="sampling", help="prompt-matched pairs for the top-k consistency")
    device: Optional[str] = option(None, group="runtime", help="torch device (default cuda when available)")
    batch_size: int = option(32, group="runtime", help="frames per CLIP batch")
    dtype: str = option("float32", choices=DTYPE_NAMES, group="runtime", help="model dtype")
    quiet: bool = option(False, group="runtime", help="no progress bar")

    def __post_init__(self) -> None:
        if self.encoder is None:
            self.encoder = "viclip" if self.viclip_checkpoint else "openclip"
        for flag, value in (("--frames", self.frames), ("--top-k", self.top_k), ("--batch-size", self.batch_size),
                            ("--aesthetic-frames", self.aesthetic_frames)):
            if value is not None and value < 1:
                raise EvalError(f"{flag} {value}: must be >= 1")
        for flag, path in (("--viclip-checkpoint", self.viclip_checkpoint), ("--aesthetic-head", self.aesthetic_head)):
            if path is not None and not Path(path).is_file():
                raise EvalError(f"{flag} {path}: file not found")
        if self.aesthetic_head and self.hpsv3:
            raise EvalError("give one aesthetic model: --aesthetic-head (LAION) or --hpsv3, not both")
        if self.compare and len(self.compare) != 2:
            raise EvalError(f"--compare takes two tables (A B), got {len(self.compare)}")
        if self.encoder == "viclip" and not self.viclip_checkpoint:
            raise EvalError("--encoder viclip needs --viclip-checkpoint PATH (ViClip-InternVid-10M-FLT.pth)")

    def config(self) -> EvalConfig:
        return EvalConfig(frames_per_shot=self.frames, aesthetic_frames=self.aesthetic_frames, top_k=self.top_k)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="ST-Bench metrics of a rendered story: cross-shot consistency, prompt following, aesthetics.",
    )
    parser.add_argument("out_dir", metavar="RENDER_DIR", nargs="?",
                        help="folder written by `storymem render` (shots/SS_NN.mp4, manifest.json), or any folder "
                             "of SS_NN.mp4 shot videos together with --story, or a batch folder (one sub-folder "
                             "per story): then every story is scored and the benchmark table written")
    add_arguments(parser, EvalOptions, _TITLES)
    return parser


def parse_options(argv: Sequence[str]) -> EvalOptions:
    """The options of a command line (argparse exits on unknown flags; bad values raise :class:`EvalError`)."""
    args = build_parser().parse_args(list(argv))
    if args.out_dir is None and not args.compare:
        raise EvalError("give RENDER_DIR (a render or batch folder), or --compare A B")
    if args.out_dir is not None and args.compare:
        raise EvalError("--compare A B compares two tables already written; drop RENDER_DIR")
    return from_args(EvalOptions, args, out_dir=Path(args.out_dir or "."))


def _pretrained(value: Optional[str]) -> Optional[str]:
    return None if value is None or value.lower() == "none" else value


def build_encoder(options: EvalOptions) -> VideoTextEncoder:
    """The video-text encoder the options ask for (each model is loaded once)."""
    if options.encoder == "viclip":
        return ViCLIPEncoder(options.viclip_checkpoint, device=options.device, dtype=options.dtype)
    return OpenCLIPVideoEncoder.load(options.clip_model, _pretrained(options.clip_pretrained), device=options.device,
                                     batch_size=options.batch_size, dtype=options.dtype)


def build_aesthetic(options: EvalOptions, encoder: VideoTextEncoder) -> Optional[FrameScorer]:
    """The aesthetic scorer the options ask for, or None when no aesthetic weights were given. The LAION head
    reuses the similarity encoder's CLIP when both name the same model."""
    if options.aesthetic_head:
        same_clip = (options.clip_model, _pretrained(options.clip_pretrained)) == (
            options.aesthetic_clip_model, _pretrained(options.aesthetic_clip_pretrained))
        shared = encoder.embedder if isinstance(encoder, OpenCLIPVideoEncoder) and same_clip else None
        return LaionAestheticScorer.load(options.aesthetic_head, options.aesthetic_clip_model,
                                         _pretrained(options.aesthetic_clip_pretrained), device=options.device,
                                         batch_size=options.batch_size, dtype=options.dtype, embedder=shared)
    if options.hpsv3:
        from storymem.memory.hpsv3 import HPSv3Scorer

        kwargs = {"device": options.device}
        if options.hpsv3_base:
            kwargs["base"] = options.hpsv3_base
        scorer = HPSv3Scorer.from_pretrained(options.hpsv3, **kwargs)
        return HPSv3FrameScorer(scorer, name=f"HPSv3 {options.hpsv3}")
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``storymem eval``; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    try:
        options = parse_options(sys.argv[1:] if argv is None else argv)
        if options.compare:
            from .compare import format_comparison, load_table

            print(format_comparison(load_table(options.compare[0]), load_table(options.compare[1])))
            return 0
        if is_batch_folder(options.out_dir):
            return _main_batch(options)
        inputs = collect_shots(options.out_dir, options.story)  # all input checks, before any model loads
        encoder = build_encoder(options)
        aesthetic = build_aesthetic(options, encoder)
        report = evaluate(inputs, encoder, aesthetic, options.config(), progress=not options.quiet)
        output = options.output or inputs.out_dir / "metrics.json"
        written = write_report(report, output, plot=options.plot)
    except (ValueError, FileNotFoundError) as err:  # StoryError, VideoError, EvalError and bad model names
        # One line: a multi-line message (ffmpeg's stderr in a VideoError) is joined.
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(format_report(report))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def _main_batch(options: EvalOptions) -> int:
    """``storymem eval BATCH``: every story checked first, the models loaded once, each story's report written
    into its folder, then the benchmark table (JSON, chart, printed)."""
    if options.story:
        raise EvalError("--story applies to one render folder; a batch folder's stories come from its "
                        "batch.json and manifests")
    inputs = collect_batch(options.out_dir)  # all input checks, before any model loads
    encoder = build_encoder(options)
    aesthetic = build_aesthetic(options, encoder)

    def keep(name: str, report: dict) -> None:
        try:
            write_report(report, inputs.batch_dir / name / "metrics.json", plot=options.plot)
        except ImportError:  # no matplotlib: the report without its chart
            write_report(report, inputs.batch_dir / name / "metrics.json", plot=False)

    table = evaluate_batch(inputs, encoder, aesthetic, options.config(), progress=not options.quiet,
                           device=options.device, on_story=keep)
    written, chart_notes = write_benchmark(table, options.output or inputs.batch_dir / BENCHMARK_NAME,
                                           plot=options.plot)
    print(format_benchmark(table))
    for note in chart_notes:
        print(f"note: {note}")
    print("\nwrote " + ", ".join(str(p) for p in written) + f" and {len(table['stories'])} story reports "
          "(<story>/metrics.json)")
    return 0
