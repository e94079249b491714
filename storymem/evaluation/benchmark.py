"""A benchmark table over a batch folder (``storymem render --story stories/ --out BATCH``): every story
scored with the same encoders (loaded once), one row per story and the mean over stories, in ST-Bench's
metrics; written as ``BATCH/benchmark.json`` with a chart ``benchmark.png`` beside it, and printed.

The table records what produced it - the batch record's render settings, seeds, versions and hardware, and
the evaluation's encoders and sampling - so that two methods' tables can be compared
(:mod:`storymem.evaluation.compare`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np

from storymem.atomic import atomic_write, atomic_write_json

from .encoders import EvalError, FrameScorer, VideoTextEncoder
from .metrics import EvalConfig, EvalInputs, collect_shots, evaluate
from .report import METRIC_LABELS

__all__ = ["BENCHMARK_NAME", "BENCHMARK_FORMAT", "BENCHMARK_VERSION", "METRIC_KEYS", "SHORT_LABELS",
           "EVAL_SETTING_KEYS", "BatchInputs", "is_batch_folder", "collect_batch", "evaluate_batch", "format_benchmark",
           "plot_benchmark", "write_benchmark"]

BENCHMARK_NAME = "benchmark.json"
BENCHMARK_FORMAT = "storymem-benchmark"
BENCHMARK_VERSION = 1
BATCH_RECORD = "batch.json"  # written by storymem render for several stories (storymem.render.batch)
MANIFEST = "manifest.json"
METRIC_KEYS = list(METRIC_LABELS)
SHORT_LABELS = {
    "aesthetic_quality": "aesthetic",
    "prompt_following_global": "PF global",
    "prompt_following_single_shot": "PF shot",
    "cross_shot_consistency": "consist.",
    "cross_shot_consistency_top_k": "top-{k}",
}


def is_batch_folder(path) -> bool:
    """A folder of story renders: it has a batch record, or (no manifest of its own and) sub-folders that hold
    render manifests."""
    path = Path(path)
    if not path.is_dir() or (path / MANIFEST).is_file():
        return False
    return (path / BATCH_RECORD).is_file() or any((d / MANIFEST).is_file() for d in path.iterdir() if d.is_dir())


@dataclass
class BatchInputs:
    """The stories of a batch folder that can be scored (checked, no model loaded) and those that cannot."""

    batch_dir: Path
    record: Optional[dict]  # batch.json, when the folder has one
    stories: list[tuple[str, EvalInputs]]
    missing: list[dict] = field(default_factory=list)  # {"name", "reason"}


def _read_record(batch_dir: Path) -> Optional[dict]:
    path = batch_dir / BATCH_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EvalError(f"{path}: unreadable batch record ({err})") from None
    if not isinstance(record, dict) or not isinstance(record.get("stories"), list):
        raise EvalError(f"{path}: not a storymem batch record (no 'stories' list)")
    return record


def collect_batch(batch_dir) -> BatchInputs:
    """Every story of the batch, checked like one render folder (:func:`collect_shots`); a story that is not
    rendered, not finished or broken is listed in ``missing`` with the reason, not scored."""
    batch_dir = Path(batch_dir)
    if not batch_dir.is_dir():
        raise EvalError(f"{batch_dir}: batch folder not found")
    record = _read_record(batch_dir)
    if record is not None:
        entries = [(e.get("name"), e) for e in record["stories"] if isinstance(e, dict) and e.get("name")]
    else:
        entries = [(d.name, {}) for d in sorted(batch_dir.iterdir()) if (d / MANIFEST).is_file()]
    stories, missing = [], []
    for name, entry in entries:
        folder = batch_dir / name
        if entry.get("status") == "invalid":
            missing.append({"name": name, "reason": f"broken story script: {entry.get('error')}"})
        elif not (folder / MANIFEST).is_file():
            missing.append({"name": name, "reason": "not rendered"})
        else:
            try:
                stories.append((name, collect_shots(folder)))
            except (ValueError, FileNotFoundError) as err:  # EvalError, StoryError, VideoError
                missing.append({"name": name, "reason": " ".join(str(err).split())})
    if not stories:
        raise EvalError(f"{batch_dir}: no story can be scored" +
                        "".join(f"; {m['name']}: {m['reason']}" for m in missing[:5]))
    return BatchInputs(batch_dir, record, stories, missing)


def _mean_over_stories(rows: list[dict]) -> tuple[dict, dict]:
    """(mean of each metric over the stories that have it, how many stories that is)."""
    means, counts = {}, {}
    for key in METRIC_KEYS:
        values = [row["metrics"][key] for row in rows if row["metrics"].get(key) is not None]
        means[key] = float(np.mean(values)) if values else None
        counts[key] = len(values)
    return means, counts


def _produced_by(inputs: BatchInputs) -> dict:
    """What rendered the stories: the batch record's settings, seeds, launch, hardware and versions; without a
    record, the first story's manifest."""
    record = inputs.record
    if record is not None:
        hardware = {k: v for k, v in (record.get("hardware") or {}).items() if k != "processes"}
        return {"source": BATCH_RECORD, **{k: record.get(k) for k in ("settings", "seeds", "launch", "versions")},
                "hardware": hardware}
    name, first = inputs.stories[0]
    try:
        manifest = json.loads((first.out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    settings = manifest.get("settings") or {}
    return {"source": f"{name}/{MANIFEST}", "settings": settings,
            "seeds": {"seed": settings.get("seed"), "seed_mode": settings.get("seed_mode")},
            "launch": None, "versions": manifest.get("versions"), "hardware": manifest.get("runtime")}


# The evaluation settings two tables must share (a story report's other settings depend on its shot count).
EVAL_SETTING_KEYS = ("frames_per_shot", "aesthetic_frames", "top_k", "frame_sampling")


def _eval_record(report_settings: dict, device: Optional[str]) -> dict:
    import importlib.metadata as md
    import platform

    versions = {"python": platform.python_version()}
    for package in ("storymem", "torch", "open_clip_torch"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {"versions": versions, "device": device or "auto", "command": list(sys.argv),
            "settings": {key: report_settings.get(key) for key in EVAL_SETTING_KEYS}}


def evaluate_batch(inputs: BatchInputs, encoder: VideoTextEncoder, aesthetic: Optional[FrameScorer] = None,
                   config: Optional[EvalConfig] = None, progress: bool = False, device: Optional[str] = None,
                   on_story=None) -> dict:
    """Score every story of ``inputs`` with the given models; returns the benchmark table as a JSON-ready dict.
    ``on_story(name, report)`` receives each story's full report (e.g. to write it into the story's folder)."""
    config = config or EvalConfig()
    iterator = inputs.stories
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(inputs.stories, desc="stories", unit="story")
    rows, story_notes = [], {}
    report: dict = {}
    for name, story_inputs in iterator:
        report = evaluate(story_inputs, encoder, aesthetic, config)
        if on_story is not None:
            on_story(name, report)
        rows.append({"name": name, "story_name": report["story"]["name"], "shots": report["story"]["shots"],
                     "metrics": report["metrics"], "report": f"{name}/metrics.json"})
        for note in report["notes"]:
            story_notes.setdefault(note, []).append(name)
    # A note every story has (e.g. no aesthetic model) is said once.
    notes = [note if len(names) == len(rows) > 1 else f"{', '.join(names)}: {note}"
             for note, names in story_notes.items()]
    means, counts = _mean_over_stories(rows)
    for key, count in counts.items():
        if 0 < count < len(rows):
            notes.append(f"{key}: the mean is over the {count} of {len(rows)} stories that have it")
    if inputs.missing:
        notes.append(f"{len(inputs.missing)} stories are not scored (see 'missing'); the means are over "
                     f"{len(rows)} stories")
    return {
        "format": BENCHMARK_FORMAT,
        "version": BENCHMARK_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "batch_dir": str(inputs.batch_dir),
        "metrics": METRIC_KEYS,
        "mean": means,
        "stories_with_metric": counts,
        "stories": rows,
        "missing": inputs.missing,
        "encoders": report["encoders"],
        "produced_by": {"render": _produced_by(inputs), "eval": _eval_record(report["settings"], device)},
        "notes": notes,
    }


def _value(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_benchmark(table: dict) -> str:
    """The benchmark as a plain-text table: one row per story, then the mean over stories."""
    k = table["produced_by"]["eval"]["settings"]["top_k"]
    heads = [SHORT_LABELS[key].format(k=k) for key in table["metrics"]]
    width = max([len("mean")] + [len(row["name"]) for row in table["stories"]]) + 2
    rows = table["stories"]
    lines = [f"Benchmark: {table['batch_dir']} ({len(rows)} stories scored"
             + (f", {len(table['missing'])} not)" if table["missing"] else ")"),
             f"Video-text encoder: {table['encoders']['video_text']}",
             f"Aesthetic scorer:   {table['encoders']['aesthetic'] or '-'}", "",
             f"  {'story':<{width}}{'shots':>6}" + "".join(f"{h:>11}" for h in heads)]
    for row in rows:
        lines.append(f"  {row['name']:<{width}}{row['shots']:>6}"
                     + "".join(f"{_value(row['metrics'][key]):>11}" for key in table["metrics"]))
    lines.append(f"  {'mean':<{width}}{'':>6}" + "".join(f"{_value(table['mean'][key]):>11}"
                                                          for key in table["metrics"]))
    lines += ["", "  " + "; ".join(f"{SHORT_LABELS[key].format(k=k)}: {METRIC_LABELS[key].format(k=k)}"
                                   for key in table["metrics"])]
    lines += [f"missing: {m['name']}: {m['reason']}" for m in table["missing"]]
    lines += [f"note: {note}" for note in table["notes"]]
    return "\n".join(lines)


def plot_benchmark(table: dict, path) -> Path:
    """One panel per metric: each story's figure as a bar, the mean over stories as a dashed line (PNG,
    atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    k = table["produced_by"]["eval"]["settings"]["top_k"]
    names = [row["name"] for row in table["stories"]]
    keys = table["metrics"]
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys) + 1.0, 0.28 * len(names) + 1.8),
                             sharey=True, squeeze=False)
    positions = np.arange(len(names))
    for ax, key in zip(axes[0], keys):
        values = [row["metrics"][key] for row in table["stories"]]
        ax.set_title(METRIC_LABELS[key].format(k=k), fontsize=8)
        if all(v is None for v in values):
            ax.text(0.5, 0.5, "not computed", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        else:
            ax.barh(positions, [np.nan if v is None else v for v in values], color="#4c72b0")
            if table["mean"][key] is not None:
                ax.axvline(table["mean"][key], color="#c44e52", linestyle="--", linewidth=1.2,
                           label=f"mean {table['mean'][key]:.4f}")
                ax.legend(fontsize=7, loc="best")
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(positions, names)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{Path(table['batch_dir']).name}: {len(names)} stories - {table['encoders']['video_text']}",
                 fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def write_benchmark(table: dict, json_path, plot: bool = True) -> tuple[list[Path], list[str]]:
    """Write the table (atomically) and, with ``plot``, its chart beside it (``benchmark.png``); returns the
    files written and notes (a chart skipped because matplotlib is missing)."""
    json_path = Path(json_path)
    atomic_write_json(json_path, table)
    written, notes = [json_path], []
    if plot:
        try:
            written.append(plot_benchmark(table, json_path.with_suffix(".png")))
        except ImportError:
            notes.append("no chart: matplotlib is not installed (pip install 'storymem[eval]')")
    return written, notes
