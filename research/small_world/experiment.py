"""The small world's memory experiment: does StoryMem's visual memory keep a character consistent across shots?

**Setting.** Held-out toy stories (:func:`~research.small_world.datasets.make_story_set`, by default 20 stories of 6-8
shots whose main characters no other story of the set uses; they are held out when the base and the adapter
were trained on clips that exclude the set's identities, ``exclude=`` of the clip makers): a main character
appears and is continued for a shot or two, another character takes over for a scene, then the main
character *returns* in a new scene, and the two alternate. Many prompts do not name the character ("the same
character spins around ..."), so only memory or continuation can tell the model who to draw. Every story is
rendered shot by shot under each condition below, with the same seeds (shot seed = ``render_seed`` + shot
index), and every shot is judged by the toy world's ground-truth
:class:`~research.small_world.detector.IdentityDetector`.

**Conditions** (rows of the table; ``--conditions`` picks a subset):

* ``ground_truth`` - reference renders of the ground truth (:func:`~research.small_world.datasets.render_story_truth`),
  written and read back as H.264 like every render: the detector's ceiling, no model;
* ``independent`` - the base model alone, no adapter, no memory, no continuation: each shot from its prompt;
* ``m2v`` - base + M2V adapter, keyframe memory with sink + window (render defaults: 10 frames, sink 3);
* ``base_memory`` - the base alone with m2v's memory and continuation: what the adapter adds to what the base
  makes of memory by itself;
* ``first_frame_memory`` - base + adapter, the memory holds each finished shot's first frame instead;
* ``no_sink`` - base + adapter, sink 0 (a pure sliding window: the first shots fall out of memory);
* ``contiguous_rope`` - base + an adapter trained with contiguous RoPE, rendered with contiguous RoPE (needs
  ``--contiguous-adapter``; left out with a note when all conditions are asked for and none is given);
* ``negative_adapter_contiguous_rope`` - the (negative-RoPE) ``--adapter`` rendered with contiguous RoPE: a
  train/inference mismatch ablation;
* ``m2v_retrieval`` / ``base_memory_retrieval`` - m2v and base_memory with text-aware retrieval of memory frames
  instead of the sink + window (``--memory-retrieval prompt``, takes below relevance 0.3 or below half the best
  take's left out; :mod:`storymem.memory.retrieval`): a shot sees the frames of the takes whose prompts read
  like its own, so another character's frames stay out of memory.

**Metrics** per condition, pooled over the shots (or shot pairs) of all stories:

* ``identity`` - share of shots whose detected character (the most prominent one) is the ground-truth
  identity (``truth/story_NNN.json`` ``shots[i].identity``); a shot with no detection counts as wrong;
* ``returns`` - the same over the shots where the main character returns (``truth["returns"]``);
* ``after 1st`` - the same over shots 2..N (shot 1 never has memory);
* ``intro.`` / ``continued`` - the same over the shots that introduce a character (its first shot in the story:
  only the prompt can say who it is, memory can only mislead) and over the shots that continue the previous
  one (``cut: false``: the previous shot's last frame starts them, their prompts mostly say "the same
  character"). Together with ``returns`` they separate the three ways a shot learns who to draw;
* ``shape`` / ``colour`` / ``pattern`` / ``accessory`` - per-attribute accuracy;
* ``self-cons.`` - share of shot pairs meant to show the same character whose detections are the same
  character (all four attributes; needs no identity, only which shots share a character);
* ``distinct`` - share of pairs meant to show different characters where both shots show a character and
  the two differ (a model that draws one character everywhere scores 1 on self-consistency but 0 here);
* ``pixel all`` / ``pixel top-10`` - ST-Bench cross-shot consistency computed by
  :func:`storymem.evaluation.cross_shot_consistency` (what ``storymem eval`` reports) with a CLIP-free encoder,
  :class:`~storymem.evaluation.PixelBagOfWordsEncoder` (pixel thumbnails for the shots, a bag of words over
  the toy vocabulary to pick the 10 most similar prompt pairs); mean over stories;
* ``s/shot`` - mean wall seconds of the pipeline call per shot, as the renderer times it (model loading
  excluded, the first shot after loading included), on the device the table names.

**Outputs** in ``OUT``: ``renders/<condition>/<story>/`` (render folders: an interrupted experiment resumes
with the same command, finished stories are not rendered again), ``results.json`` (settings, per story per
condition per shot detections, aggregates), ``results.md`` (the table) and ``contact_sheets/<condition>.png``
(the first story). Every input is checked, and every render folder planned, before a model loads.

    python -m research.small_world.experiment --base runs/toy-base/base --adapter runs/m2v/adapter \\
        --stories runs/toy-stories --out runs/experiment --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from storymem.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

from .detection import ATTRIBUTES
from .experiment_plan import (
    CONDITIONS,
    HELD_OUT_STORY_SEED,
    Condition,
    ExperimentConfig,
    ExperimentError,
    ExperimentPlan,
    StoryCase,
    load_story_cases,
    plan_experiment,
    read_json,
)

# The plan's names are re-exported: ``experiment`` is the one import for running it.
__all__ = [
    "CONDITIONS",
    "HELD_OUT_STORY_SEED",
    "Condition",
    "ExperimentConfig",
    "ExperimentError",
    "ExperimentPlan",
    "StoryCase",
    "aggregate_scores",
    "build_parser",
    "format_table",
    "load_story_cases",
    "main",
    "plan_experiment",
    "run_experiment",
    "score_story",
]

RESULTS_FORMAT = "storymem-toy-experiment"
RESULTS_VERSION = 1
TOP_K = 10
TRUTH_MARKER = "truth_render.json"


# ---------------------------------------------------------------------------------------------- rendering
def _render_truth(plan: ExperimentPlan, case: StoryCase) -> Path:
    """The ground truth of one story as shot videos in ``renders/ground_truth/<story>/shots/`` (kept when a
    previous run wrote them at the same size)."""
    from storymem.video import write_video

    from .datasets import render_story_truth

    folder = plan.render_dir("ground_truth", case)
    settings = {"frames": plan.config.frames, "height": plan.height, "width": plan.width, "fps": 16,
                "truth": case.truth["shots"]}
    marker = folder / TRUTH_MARKER
    files = [folder / "shots" / f"{shot.file_stem}.mp4" for shot in case.story]
    if marker.is_file() and all(f.is_file() for f in files):
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == settings:
                return folder
        except (OSError, json.JSONDecodeError):
            pass
    shots = render_story_truth(case.truth, plan.config.frames, plan.height, plan.width)
    for path, frames in zip(files, shots):
        write_video(path, frames, fps=16)
    atomic_write_json(marker, settings)
    return folder


def _load_pipeline_for(options):
    from storymem.render import load_render_pipeline

    pipe = load_render_pipeline(options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def render_all(plan: ExperimentPlan) -> None:
    """Render every planned (condition, story) that is not finished, loading each pipeline once: the
    conditions that share a model (base, base + adapter, base + contiguous adapter) run back to back."""
    from tqdm.auto import tqdm

    from storymem.render import StoryRenderer

    if "ground_truth" in [c.name for c in plan.conditions]:
        for case in plan.cases:
            _render_truth(plan, case)
    groups: dict[Optional[str], list[Condition]] = {}
    for condition in plan.conditions:
        if condition.generated:
            groups.setdefault(condition.adapter, []).append(condition)
    todo = sum(1 for c in plan.jobs for case, p in plan.jobs[c] if p.start < len(case.story))
    bar = tqdm(total=todo, desc="stories", unit="story", disable=not plan.config.progress, file=sys.stderr)
    try:
        for conditions in groups.values():
            pending = [(c, case, p) for c in conditions for case, p in plan.jobs[c.name]
                       if p.start < len(case.story)]
            if not pending:
                continue
            pipe = _load_pipeline_for(pending[0][2].options)
            try:
                for condition, case, render_plan in pending:
                    bar.set_postfix_str(f"{condition.name} {case.stem}")
                    with warnings.catch_warnings():
                        # Shot 1 of every story is text-only by design here.
                        warnings.filterwarnings("ignore", message="shot 1 is generated from text alone")
                        StoryRenderer(render_plan, pipe=pipe).run()
                    bar.update(1)
            finally:
                del pipe  # the next group's model loads into the memory this one held
                _release_memory()
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------- metrics
def _same(a, b) -> bool:
    """Both shots show a character and it is the same one (all four attributes, as ``same_character``)."""
    return a is not None and b is not None and a.character == b.character


def score_story(detections: Sequence, truth: dict) -> dict:
    """Per-shot records and counts of one story from its shots' detections (``IdentityDetector.identify`` of
    each shot, None where nothing was found) and its ground truth.

    Returns ``{"shots": [...], "counts": {...}, "metrics": {...}}``; the counts pool across stories
    (:func:`aggregate_scores`), the metrics are this story's shares (None where a set is empty)."""
    from .detector import as_character

    shots = truth["shots"]
    if len(detections) != len(shots):
        raise ExperimentError(f"got {len(detections)} detections for the {len(shots)} shots of the ground truth")
    returns = set(truth.get("returns", []))
    records = []
    counts = {"shots": 0, "correct": 0, "detected": 0, "returns": 0, "returns_correct": 0, "after_first": 0,
              "after_first_correct": 0, "introductions": 0, "introductions_correct": 0, "continued": 0,
              "continued_correct": 0, "same_pairs": 0, "same_pairs_agree": 0, "different_pairs": 0,
              "different_pairs_distinct": 0, **{f"{a}_correct": 0 for a in ATTRIBUTES}}
    for i, (found, shot) in enumerate(zip(detections, shots)):
        want = as_character(shot["identity"])
        correct = found is not None and found.character == want
        attributes = {a: found is not None and getattr(found.character, a) == getattr(want, a) for a in ATTRIBUTES}
        records.append({"index": i, "role": shot.get("role"), "identity": want.key,
                        "detected": None if found is None else found.key,
                        "confidence": None if found is None else round(float(found.confidence), 4),
                        "correct": bool(correct), "attributes": attributes, "return": i in returns})
        counts["shots"] += 1
        counts["correct"] += correct
        counts["detected"] += found is not None
        for a in ATTRIBUTES:
            counts[f"{a}_correct"] += attributes[a]
        if i in returns:
            counts["returns"] += 1
            counts["returns_correct"] += correct
        if i > 0:
            counts["after_first"] += 1
            counts["after_first_correct"] += correct
        if all(shots[j]["identity"] != shot["identity"] for j in range(i)):
            counts["introductions"] += 1
            counts["introductions_correct"] += correct
        elif i > 0 and shot.get("cut") is False:
            counts["continued"] += 1
            counts["continued_correct"] += correct
    for i in range(len(shots)):
        for j in range(i + 1, len(shots)):
            if shots[i]["identity"] == shots[j]["identity"]:
                counts["same_pairs"] += 1
                counts["same_pairs_agree"] += _same(detections[i], detections[j])
            else:
                counts["different_pairs"] += 1
                # Told apart: both shots show a character and they differ (two blank shots tell nothing apart).
                counts["different_pairs_distinct"] += (detections[i] is not None and detections[j] is not None
                                                       and not _same(detections[i], detections[j]))
    return {"shots": records, "counts": counts, "metrics": _shares(counts)}


def _share(hits: int, total: int) -> Optional[float]:
    return hits / total if total else None


def _shares(counts: dict) -> dict:
    return {
        "identity_consistency": _share(counts["correct"], counts["shots"]),
        "identity_consistency_returns": _share(counts["returns_correct"], counts["returns"]),
        "identity_consistency_after_first": _share(counts["after_first_correct"], counts["after_first"]),
        # .get: results written before these counts existed still pool and print.
        "identity_consistency_introductions": _share(counts.get("introductions_correct", 0),
                                                     counts.get("introductions", 0)),
        "identity_consistency_continued": _share(counts.get("continued_correct", 0), counts.get("continued", 0)),
        "attribute_accuracy": {a: _share(counts[f"{a}_correct"], counts["shots"]) for a in ATTRIBUTES},
        "self_consistency": _share(counts["same_pairs_agree"], counts["same_pairs"]),
        "distinct": _share(counts["different_pairs_distinct"], counts["different_pairs"]),
        "detection_rate": _share(counts["detected"], counts["shots"]),
    }


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def aggregate_scores(stories: dict[str, dict]) -> dict:
    """Pool the counts of :func:`score_story` results (``{story: score}``, optionally with ``pixel`` and
    ``generate_s`` entries) into one row: pooled shares, the spread of identity consistency over stories,
    mean pixel consistencies and mean seconds per shot."""
    total: dict[str, int] = {}
    for score in stories.values():
        for key, value in score["counts"].items():
            total[key] = total.get(key, 0) + int(value)
    row = _shares(total) if total else {}
    per_story = [s["metrics"]["identity_consistency"] for s in stories.values()]
    row["identity_consistency_story_stderr"] = (float(np.std(per_story, ddof=1) / math.sqrt(len(per_story)))
                                                if len(per_story) > 1 else None)
    row["pixel_consistency_all"] = _mean(s.get("pixel", {}).get("all") for s in stories.values())
    row["pixel_consistency_top_k"] = _mean(s.get("pixel", {}).get("top_k") for s in stories.values())
    times = [t for s in stories.values() for t in s.get("generate_s", []) if t is not None]
    row["seconds_per_shot"] = float(np.mean(times)) if times else None
    row["counts"] = dict(total, stories=len(stories), timed_shots=len(times))
    return row


def _shot_files(folder: Path, case: StoryCase, condition: Condition) -> tuple[list[Path], list, list]:
    """Shot videos of one story under one condition, with the render's per-shot timings and modes."""
    files = [folder / "shots" / f"{shot.file_stem}.mp4" for shot in case.story]
    times: list[Optional[float]] = [None] * len(files)
    modes: list = [None] * len(files)
    if condition.generated:
        manifest = read_json(folder / "manifest.json", "render manifest")
        entries = manifest.get("shots", [])
        if len(entries) != len(case.story) or not manifest.get("finished"):
            raise ExperimentError(f"{folder}: the render is not finished ({len(entries)} of {len(case.story)} "
                                  "shots); run the experiment again to finish it")
        files = [folder / e["file"] for e in entries]
        times = [e.get("timings", {}).get("generate_s") for e in entries]
        modes = [e.get("mode") for e in entries]
    return files, times, modes


def score_condition(plan: ExperimentPlan, condition: Condition, detector, encoder) -> dict:
    """Detections, scores and pixel consistency of every story under one condition (each video decoded once)."""
    from storymem.evaluation import EvalConfig, cross_shot_consistency
    from storymem.video import read_video

    stories = {}
    for case in plan.cases:
        folder = plan.render_dir(condition.name, case)
        files, times, modes = _shot_files(folder, case, condition)
        shots = [read_video(f)[0] for f in files]
        score = score_story([detector.identify(frames) for frames in shots], case.truth)
        for record, file, seconds, mode in zip(score["shots"], files, times, modes):
            record.update(file=str(file.relative_to(Path(plan.config.out))), generate_s=seconds, mode=mode)
        score["pixel"] = cross_shot_consistency(shots, case.story.prompts, encoder, EvalConfig(top_k=TOP_K))
        score["generate_s"] = [t for t in times if t is not None]
        stories[case.stem] = score
    return stories


def _write_contact_sheet(plan: ExperimentPlan, condition: Condition) -> Optional[Path]:
    """``OUT/contact_sheets/<condition>.png`` for the first story (the render's own sheet, or for the ground
    truth one drawn from its frames)."""
    from storymem.render.report import SheetRow, write_contact_sheet
    from storymem.video import read_video

    case = plan.cases[0]
    folder = plan.render_dir(condition.name, case)
    target = Path(plan.config.out) / "contact_sheets" / f"{condition.name}.png"
    if condition.generated:
        sheet = folder / "contact_sheet.png"
        if not sheet.is_file():
            return None
        atomic_write_bytes(target, sheet.read_bytes())
        return target
    rows = []
    for shot, truth in zip(case.story, case.truth["shots"]):
        frames, _ = read_video(folder / "shots" / f"{shot.file_stem}.mp4")
        picks = sorted(set(np.linspace(0, len(frames) - 1, min(6, len(frames))).round().astype(int)))
        rows.append(SheetRow(label=f"{shot.file_stem}  {truth['identity']}  |  {shot.prompt}",
                             samples=[frames[i] for i in picks]))
    return write_contact_sheet(target, rows, title=f"{case.name}: ground truth")


# ---------------------------------------------------------------------------------------------- report
def _device_info(device: str) -> dict:
    import torch

    info = {"device": device, "kind": "gpu" if device.startswith("cuda") else "cpu", "name": None}
    if info["kind"] == "gpu" and torch.cuda.is_available():
        info["name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["name"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    return info


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


TABLE_COLUMNS = ("identity", "returns", "after 1st", "intro.", "continued", "self-cons.", "distinct", "shape", "colour", "pattern",
                 "accessory", "pixel all", "pixel top-10", "s/shot")


def format_table(results: dict) -> str:
    """The results as a markdown table (conditions as rows) with its notes."""
    lines = ["| condition | " + " | ".join(TABLE_COLUMNS) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for name in results["conditions"]:
        row = results["rows"][name]
        if row["status"] != "done":
            lines.append(f"| {name} | " + " | ".join(["-"] * len(TABLE_COLUMNS)) + " |")
            continue
        a = row["aggregate"]
        identity = _fmt(a["identity_consistency"])
        if a.get("identity_consistency_story_stderr") is not None:
            identity += f" ± {a['identity_consistency_story_stderr']:.3f}"
        cells = [identity, _fmt(a["identity_consistency_returns"]), _fmt(a["identity_consistency_after_first"]),
                 _fmt(a.get("identity_consistency_introductions")), _fmt(a.get("identity_consistency_continued")),
                 _fmt(a["self_consistency"]), _fmt(a["distinct"]),
                 *(_fmt(a["attribute_accuracy"][k]) for k in ATTRIBUTES),
                 _fmt(a["pixel_consistency_all"]), _fmt(a["pixel_consistency_top_k"]), _fmt(a["seconds_per_shot"], 2)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    settings, device = results["settings"], results["device"]
    counts = next((r["aggregate"]["counts"] for r in results["rows"].values() if r["status"] == "done"), None)
    lines += [""]
    if counts:
        lines.append(f"{counts['stories']} stories, {counts['shots']} shots ({counts['returns']} returns), "
                     f"{counts['same_pairs']} same-character and {counts['different_pairs']} different-character "
                     "shot pairs per condition.")
    lines += [
        f"Renders: {settings['height']}x{settings['width']}, {settings['frames']} frames, {settings['steps']} steps, "
        f"guidance {settings['guidance']}, "
        + (f"memory guidance {settings['memory_guidance']}, " if "memory_guidance" in settings else "")
        + ("shot 1 from the base alone, " if settings.get("first_shot") == "base" else "")
        + (f"adapter weighed {settings['lora_scale']}, " if "lora_scale" in settings else "")
        + f"shift {settings['shift']}, empty negative prompt, seed "
        f"{settings['render_seed']} + shot index.",
        "identity: share of shots whose detected character is the ground truth (± standard error over stories); "
        "returns: shots where the main character returns; after 1st: shots 2..N; intro.: a character's first "
        "shot; continued: shots that continue the previous one (cut: false); self-cons.: pairs meant to "
        "show one character detected as the same; distinct: pairs meant to differ detected as different; "
        "shape..accessory: per-attribute accuracy.",
        f"pixel all / top-10: cross-shot consistency (all pairs / the {TOP_K} pairs with the most similar "
        f"prompts) with {results['encoder']}, mean over stories.",
        f"s/shot: wall seconds of the pipeline call per shot on {device['kind'].upper()} ({device['device']}: "
        f"{device['name']}), model loading excluded.",
    ]
    for name in results["conditions"]:
        row = results["rows"][name]
        if row["status"] != "done":
            lines.append(f"{name}: {row['status']} ({row['note']}).")
    lines += [f"note: {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def _settings(plan: ExperimentPlan) -> dict:
    config = plan.config
    return {"base": str(config.base), "adapter": plan.adapters.get("adapter"),
            "contiguous_adapter": plan.adapters.get("contiguous_adapter"), "stories": str(config.stories),
            "num_stories": len(plan.cases), "height": plan.height, "width": plan.width, "frames": config.frames,
            "steps": config.steps, "guidance": config.guidance,
            **({"memory_guidance": config.memory_guidance} if config.memory_guidance != 1.0 else {}),
            **({"first_shot": config.first_shot} if config.first_shot != "m2v" else {}),
            **({"lora_scale": config.lora_scale} if config.lora_scale != 1.0 else {}),
            "shift": plan.shift, "dtype": config.dtype,
            "render_seed": config.render_seed, "negative_prompt": "", "embedder": "pixel", "aesthetic": "none"}


def run_experiment(config: ExperimentConfig, plan: Optional[ExperimentPlan] = None) -> dict:
    """Plan (unless given), render, score and write the results; returns the results dict."""
    from storymem.builtin.tiny import TOY_VOCABULARY
    from storymem.evaluation import PixelBagOfWordsEncoder

    from .detector import IdentityDetector

    plan = plan or plan_experiment(config)
    t0 = time.perf_counter()
    render_all(plan)
    t_render = time.perf_counter() - t0
    detector = IdentityDetector()
    encoder = PixelBagOfWordsEncoder(TOY_VOCABULARY)
    rows: dict[str, dict] = {}
    names = [c.name for c in plan.conditions] + list(plan.skipped)
    order = list(CONDITIONS)
    names.sort(key=order.index)
    for name in names:
        if name in plan.skipped:
            rows[name] = {"status": "skipped", "note": plan.skipped[name],
                          "description": CONDITIONS[name].description}
    for condition in plan.conditions:
        stories = score_condition(plan, condition, detector, encoder)
        sheet = _write_contact_sheet(plan, condition)
        rows[condition.name] = {
            "status": "done", "note": None, "description": condition.description,
            "adapter": plan.adapters[condition.adapter]["path"] if condition.adapter else None,
            "render": dict(condition.render), "aggregate": aggregate_scores(stories), "stories": stories,
            "contact_sheet": None if sheet is None else str(sheet.relative_to(Path(config.out))),
        }
    results = {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": _settings(plan), "device": _device_info(plan.device), "encoder": encoder.name,
        "stories": [{"stem": c.stem, "name": c.name, "num_shots": len(c.story),
                     "returns": c.truth.get("returns", [])} for c in plan.cases],
        "conditions": names, "rows": rows, "notes": plan.notes,
        "timings": {"render_s": round(t_render, 3), "score_s": round(time.perf_counter() - t0 - t_render, 3)},
    }
    out = Path(config.out)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", format_table(results))
    return results


# ---------------------------------------------------------------------------------------------- CLI
def _csv(value: str) -> list[str]:
    return [v for v in (s.strip() for s in value.split(",")) if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m research.small_world.experiment",
        description="The small world's memory experiment: render held-out toy stories under several conditions "
                    "(no memory, M2V, ablations) and measure identity consistency with the ground-truth detector. "
                    "Rerun the same command to resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="toy base model folder (research.small_world.train_base), or 'toy'")
    p.add_argument("--adapter", help="M2V adapter folder (train_lora.py), trained with negative RoPE, or 'toy'")
    p.add_argument("--contiguous-adapter", help="adapter trained with contiguous RoPE (row contiguous_rope)")
    p.add_argument("--stories", required=True, help="toy story set folder (made there when missing or empty)")
    p.add_argument("--count", type=int, default=20, help="stories to make when --stories is missing")
    p.add_argument("--seed", type=int, default=HELD_OUT_STORY_SEED,
                   help="seed of the story set made when --stories is missing (default: the held-out set whose "
                        "characters research/small_world/train_small_world.sh keeps out of training)")
    p.add_argument("--num-shots", type=int, default=6, help="fewest shots of a made story")
    p.add_argument("--max-shots", type=int, default=8, help="most shots of a made story")
    p.add_argument("--out", required=True, help="experiment folder (renders/, results.json, results.md)")
    p.add_argument("--conditions", type=_csv, help=f"comma-separated subset of: {', '.join(CONDITIONS)} "
                                                   "(default: all)")
    p.add_argument("--limit-stories", type=int, help="use only the first K stories")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype (auto: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--area", type=int, default=64 * 64, help="pixel area of the (square) frames")
    p.add_argument("--height", type=int, help="frame height (default: the square of --area)")
    p.add_argument("--width", type=int, help="frame width")
    p.add_argument("--frames", type=int, default=17, help="frames per shot, 4n+1")
    p.add_argument("--steps", type=int, default=8, help="denoising steps")
    p.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance")
    p.add_argument("--first-shot", default="m2v", choices=["m2v", "base"],
                   help="how each story's shot 1 starts (render's --first-shot): M2V on an empty memory, or the "
                        "base alone with the adapter off, as StoryMem draws it with its T2V model")
    p.add_argument("--memory-guidance", type=float, default=1.0,
                   help="guidance towards the memory frames in the memory conditions (1 = off)")
    p.add_argument("--lora-scale", type=float, default=1.0,
                   help="weight of the adapter's LoRA layers in the adapter rows (render's --lora-scale)")
    p.add_argument("--shift", type=float, help="UniPC flow shift (default: the base's scheduler's)")
    p.add_argument("--render-seed", type=int, default=0, help="shot seed = this + shot index (every condition)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit code (2: bad input, nothing rendered)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    config = ExperimentConfig(
        base=args.base, stories=Path(args.stories), out=Path(args.out), adapter=args.adapter,
        contiguous_adapter=args.contiguous_adapter, conditions=args.conditions, device=args.device, dtype=args.dtype,
        area=args.area, height=args.height, width=args.width, frames=args.frames, steps=args.steps,
        guidance=args.guidance, memory_guidance=args.memory_guidance, first_shot=args.first_shot,
        lora_scale=args.lora_scale,
        shift=args.shift, render_seed=args.render_seed, count=args.count,
        story_seed=args.seed, num_shots=args.num_shots, max_shots=args.max_shots, limit_stories=args.limit_stories,
        progress=not args.no_progress)
    try:
        plan = plan_experiment(config)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        results = run_experiment(config, plan)
    except KeyboardInterrupt:
        print(f"\ninterrupted; rerun the same command to continue (finished stories in {config.out}/renders are "
              "kept)", file=sys.stderr)
        return 130
    print(format_table(results))
    print(f"wrote {Path(config.out) / 'results.json'} and {Path(config.out) / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
