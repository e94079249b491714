"""Two benchmark tables side by side: ``storymem eval --compare A B`` (each a ``benchmark.json``, a batch folder
holding one, or one story's ``metrics.json``).

The means are compared over the stories both tables scored (recomputed from their rows when the sets differ),
then story by story. Numbers are comparable only under the same encoders and evaluation settings: a
difference there is a warning. The render settings that differ are listed: they are what is compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from .benchmark import BENCHMARK_FORMAT, BENCHMARK_NAME, EVAL_SETTING_KEYS, METRIC_KEYS, SHORT_LABELS
from .encoders import EvalError
from .report import METRIC_LABELS

__all__ = ["load_table", "compare_tables", "format_comparison"]


def _from_story_report(report: dict, path: Path) -> dict:
    """One story's ``metrics.json`` as a one-row table (its render settings from the manifest beside it)."""
    try:
        manifest = json.loads((path.parent / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    settings = report.get("settings", {})
    story = report.get("story", {})
    return {"format": BENCHMARK_FORMAT, "batch_dir": str(path.parent), "metrics": METRIC_KEYS,
            "mean": dict(report["metrics"]),
            "stories": [{"name": path.parent.name, "story_name": story.get("name"), "shots": story.get("shots"),
                         "metrics": report["metrics"]}],
            "missing": [], "encoders": report.get("encoders", {}),
            "produced_by": {"render": {"settings": manifest.get("settings")},
                            "eval": {"settings": {key: settings.get(key) for key in EVAL_SETTING_KEYS}}}}


def load_table(path) -> dict:
    """A benchmark table from a ``benchmark.json``, a folder holding one, or one story's ``metrics.json``; an
    :class:`EvalError` naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / BENCHMARK_NAME
    if not path.is_file():
        raise EvalError(f"--compare {path}: not found (run `storymem eval BATCH` first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EvalError(f"--compare {path}: unreadable ({err})") from None
    if isinstance(data, dict) and data.get("format") == BENCHMARK_FORMAT and isinstance(data.get("stories"), list):
        return dict(data, source=str(path))
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict) and "shots" in data:
        return dict(_from_story_report(data, path), source=str(path))
    raise EvalError(f"--compare {path}: not a storymem benchmark table or story report")


def _means(table: dict, names: list[str]) -> dict:
    rows = {row["name"]: row for row in table["stories"]}
    out = {}
    for key in METRIC_KEYS:
        values = [rows[n]["metrics"].get(key) for n in names]
        values = [v for v in values if v is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def _differences(a: Optional[dict], b: Optional[dict], prefix: str = "") -> list[str]:
    a, b = a or {}, b or {}
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            lines.append(f"{prefix}{key}: {json.dumps(a.get(key))} -> {json.dumps(b.get(key))}")
    return lines


def compare_tables(a: dict, b: dict) -> dict:
    """What :func:`format_comparison` prints: the means over the common stories, per-story rows, warnings
    (encoders, evaluation settings, story sets) and the render settings that differ."""
    names_a = [row["name"] for row in a["stories"]]
    names_b = {row["name"] for row in b["stories"]}
    common = [n for n in names_a if n in names_b]
    warnings = [f"the encoders differ, so the numbers are not comparable: {line}"
                for line in _differences(a.get("encoders"), b.get("encoders"))]
    eval_a = (a.get("produced_by") or {}).get("eval", {}).get("settings")
    eval_b = (b.get("produced_by") or {}).get("eval", {}).get("settings")
    warnings += [f"the evaluation settings differ: {line}" for line in _differences(eval_a, eval_b)]
    only_a, only_b = sorted(set(names_a) - names_b), sorted(names_b - set(names_a))
    if only_a or only_b:
        warnings.append(f"the tables scored different stories: the means below are over the {len(common)} both "
                        f"have (only in A: {', '.join(only_a) or '-'}; only in B: {', '.join(only_b) or '-'})")
    if not common:
        raise EvalError("--compare: the two tables have no story in common")
    render_a = (a.get("produced_by") or {}).get("render") or {}
    render_b = (b.get("produced_by") or {}).get("render") or {}
    rows_a = {row["name"]: row["metrics"] for row in a["stories"]}
    rows_b = {row["name"]: row["metrics"] for row in b["stories"]}
    settings_a, settings_b = render_a.get("settings"), render_b.get("settings")
    if not (settings_a and settings_b):
        warnings.append("the render settings of " + ("A" if not settings_a else "B") + " are not recorded")
    return {"a": a.get("source"), "b": b.get("source"), "common": common,
            "mean_a": _means(a, common), "mean_b": _means(b, common),
            "stories": [{"name": n, "a": rows_a[n], "b": rows_b[n]} for n in common],
            "warnings": warnings,
            "render_differences": _differences(settings_a, settings_b) if settings_a and settings_b else []}


def _cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_comparison(a: dict, b: dict) -> str:
    """The two tables side by side: means (A, B, B - A), then each common story's figures as ``A / B``."""
    result = compare_tables(a, b)
    k = ((a.get("produced_by") or {}).get("eval", {}).get("settings") or {}).get("top_k") or 10
    lines = [f"A: {result['a']}  ({len(a['stories'])} stories; {a.get('encoders', {}).get('video_text')})",
             f"B: {result['b']}  ({len(b['stories'])} stories; {b.get('encoders', {}).get('video_text')})", ""]
    lines += [f"warning: {w}" for w in result["warnings"]]
    if result["render_differences"]:
        lines += ["render settings that differ (A -> B):"] + [f"  {d}" for d in result["render_differences"]]
    if result["warnings"] or result["render_differences"]:
        lines.append("")
    width = max(len(label.format(k=k)) for label in METRIC_LABELS.values())
    lines.append(f"  {'metric (mean over ' + str(len(result['common'])) + ' stories)':<{width}}"
                 f"{'A':>10}{'B':>10}{'B - A':>10}")
    for key in METRIC_KEYS:
        va, vb = result["mean_a"][key], result["mean_b"][key]
        delta = "-" if va is None or vb is None else f"{vb - va:+.4f}"
        lines.append(f"  {METRIC_LABELS[key].format(k=k):<{width}}{_cell(va):>10}{_cell(vb):>10}{delta:>10}")
    if len(result["common"]) > 1:
        name_width = max([len(n) for n in result["common"]] + [13]) + 2
        lines += ["", f"  {'story (A / B)':<{name_width}}"
                  + "".join(f"{SHORT_LABELS[key].format(k=k):>17}" for key in METRIC_KEYS)]
        for row in result["stories"]:
            cells = [f"{_cell(row['a'].get(key))}/{_cell(row['b'].get(key))}" for key in METRIC_KEYS]
            lines.append(f"  {row['name']:<{name_width}}" + "".join(f"{c:>17}" for c in cells))
    return "\n".join(lines)
