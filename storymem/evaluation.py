"""ST-Bench metrics over a rendered story: ``python -m storymem eval OUT_DIR [--story FILE]``.

Metrics (StoryMem, ST-Bench):

* **cross-shot consistency**: cosine similarity of the shots' video embeddings, averaged over all shot
  pairs, and over the `top_k` (10) pairs whose *prompts* are most similar (text-text similarity with the
  same encoder's text tower): shots meant to show the same thing should look alike;
* **prompt following**: single-shot (each shot's video vs its prompt) and global (the whole story as one
  video vs `story_overview`);
* **aesthetic quality**: the LAION aesthetic predictor on CLIP ViT-L/14 frame embeddings, divided by 10
  and averaged over each shot's frames, as VBench does (or HPSv3 when that is what is available).

Video-text encoders sit behind `VideoTextEncoder`: open_clip with frame-averaged embeddings (default),
ViCLIP (the paper's encoder) from its released checkpoint, or - where CLIP knows nothing of the pictures, as
in the toy world - `PixelBagOfWordsEncoder` (not CLIP; cross-shot consistency only). Frames are sampled like
VBench: the video is cut into equal segments and the middle frame of each is taken.

Inputs are checked before any model is loaded (`collect_shots`); the report is printed as a table and
written atomically as JSON with a shot x shot similarity chart beside it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storymem.atomic import atomic_write
from storymem.story import Shot, Story, StoryError, load_story
from storymem.eval_models import (  # noqa: F401  (re-exported: the evaluation API in one place)
    CLIP_MEAN,
    CLIP_STD,
    EvalError,
    FrameScorer,
    HPSv3FrameScorer,
    LaionAestheticScorer,
    OpenCLIPVideoEncoder,
    PixelBagOfWordsEncoder,
    ViCLIPEncoder,
    VideoTextEncoder,
    clip_center_crop,
    load_aesthetic_head,
    sample_frame_indices,
)
from storymem.video import probe_video, read_video

__all__ = [
    "EvalConfig",
    "EvalError",
    "EvalInputs",
    "FrameScorer",
    "HPSv3FrameScorer",
    "LaionAestheticScorer",
    "OpenCLIPVideoEncoder",
    "PixelBagOfWordsEncoder",
    "ShotVideo",
    "ViCLIPEncoder",
    "VideoTextEncoder",
    "clip_center_crop",
    "collect_shots",
    "consistency_pairs",
    "cross_shot_consistency",
    "evaluate",
    "format_report",
    "load_aesthetic_head",
    "main",
    "plot_similarity",
    "sample_frame_indices",
    "write_report",
]

SHOT_STEM = re.compile(r"^(\d{2,})_(\d{2,})$")


# ---------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ShotVideo:
    """A story shot and the video file rendered for it."""

    shot: Shot
    path: Path


@dataclass
class EvalInputs:
    """A validated evaluation job: the story and one video per shot, in story order."""

    out_dir: Path
    story: Story
    videos: list[ShotVideo]
    notes: list[str] = field(default_factory=list)


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise EvalError(f"{path}: cannot read manifest: {err}") from None
    if not isinstance(manifest, dict):
        raise EvalError(f"{path}: the manifest must be a JSON object")
    return manifest


def _story_from_manifest(manifest: dict, manifest_path: Path, out_dir: Path) -> Story:
    entry = manifest.get("story")
    if not isinstance(entry, dict):
        raise EvalError(f"{manifest_path}: missing 'story' object (pass --story FILE)")
    if "scenes" in entry or "prompts" in entry:
        try:
            return Story.from_dict(entry, source=None)
        except StoryError as err:
            raise EvalError(f"{manifest_path}: field 'story': {err}") from None
    story_path = entry.get("path")
    if not isinstance(story_path, str):
        raise EvalError(f"{manifest_path}: field 'story' has neither the script nor its 'path' (pass --story FILE)")
    candidate = Path(story_path)
    if not candidate.is_absolute() and not candidate.exists():
        candidate = out_dir / candidate
    return load_story(candidate)


def _manifest_videos(manifest: dict, manifest_path: Path, out_dir: Path, count: int) -> dict[int, Path]:
    shots = manifest.get("shots")
    if not isinstance(shots, list):
        raise EvalError(f"{manifest_path}: missing 'shots' list")
    files: dict[int, Path] = {}
    for position, entry in enumerate(shots):
        where = f"{manifest_path}: shots[{position}]"
        if not isinstance(entry, dict):
            raise EvalError(f"{where}: expected an object with 'index' and 'file'")
        index, file = entry.get("index"), entry.get("file")
        if isinstance(index, bool) or not isinstance(index, int):
            raise EvalError(f"{where}: field 'index' must be an integer, got {index!r}")
        if not isinstance(file, str) or not file:
            raise EvalError(f"{where}: field 'file' must be a path string, got {file!r}")
        if index in files:
            raise EvalError(f"{where}: shot index {index} is listed twice")
        if not 0 <= index < count:
            raise EvalError(f"{where}: shot index {index} is outside the story's {count} shots")
        files[index] = out_dir / file
    return files


def collect_shots(out_dir: str | Path, story_path: str | Path | None = None) -> EvalInputs:
    """Find the story and each shot's video, and check that they agree, without loading any model.

    With ``OUT_DIR/manifest.json`` (written by the renderer) the story comes from the manifest (or
    `story_path`, which overrides it) and the files from its ``shots`` list. Without one, `story_path` is
    required and videos ``SS_NN.mp4`` are matched to shots by file stem, in ``OUT_DIR/shots/`` if that
    folder exists, else in ``OUT_DIR``. Every video is probed, so an unreadable file fails here too.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists():
        raise EvalError(f"{out_dir}: output folder not found")
    if not out_dir.is_dir():
        raise EvalError(f"{out_dir}: not a folder")
    notes: list[str] = []
    manifest_path = out_dir / "manifest.json"

    if manifest_path.is_file():
        manifest = _read_manifest(manifest_path)
        story = (
            load_story(story_path)
            if story_path is not None
            else _story_from_manifest(manifest, manifest_path, out_dir)
        )
        listed = manifest.get("shots")
        if isinstance(listed, list) and len(listed) > len(story):
            raise EvalError(
                f"story and folder disagree: {manifest_path} lists {len(listed)} shots but the story "
                f"{story.path or story.name!r} has {len(story)}"
            )
        files = _manifest_videos(manifest, manifest_path, out_dir, len(story))
        missing = [shot for shot in story if shot.index not in files]
        if missing:
            raise EvalError(
                f"{manifest_path}: {len(missing)} of the story's {len(story)} shots have no video (render not "
                f"finished?): {', '.join(shot.file_stem for shot in missing[:10])}"
            )
        for entry in listed:
            prompt = entry.get("prompt")
            if story_path is not None and isinstance(prompt, str) and prompt != story[entry["index"]].prompt:
                notes.append(
                    f"shot {story[entry['index']].file_stem}: the prompt in {manifest_path.name} differs from "
                    f"{story_path}; the story file's prompt is used"
                )
        videos = [ShotVideo(shot, files[shot.index]) for shot in story]
    else:
        if story_path is None:
            raise EvalError(f"{out_dir}: no manifest.json; pass --story FILE to say which story the videos are")
        story = load_story(story_path)
        folder = out_dir / "shots" if (out_dir / "shots").is_dir() else out_dir
        found = {p.stem: p for p in sorted(folder.glob("*.mp4")) if SHOT_STEM.match(p.stem)}
        if not found:
            raise EvalError(f"{folder}: no shot videos (SS_NN.mp4, e.g. {story[0].file_stem}.mp4) found")
        expected = {shot.file_stem for shot in story}
        missing = sorted(expected - found.keys())
        unexpected = sorted(found.keys() - expected)
        if missing or unexpected:
            detail = []
            if missing:
                detail.append("missing " + ", ".join(f"{stem}.mp4" for stem in missing[:10]))
            if unexpected:
                detail.append("not in the story " + ", ".join(f"{stem}.mp4" for stem in unexpected[:10]))
            raise EvalError(
                f"story and folder disagree: {story.path} has {len(story)} shots, {folder} has {len(found)} shot "
                f"videos ({'; '.join(detail)})"
            )
        videos = [ShotVideo(shot, found[shot.file_stem]) for shot in story]

    for video in videos:
        probe_video(video.path)  # raises VideoError naming the file
    if not story.overview.strip():
        notes.append("the story has no story_overview: global prompt following is skipped")
    return EvalInputs(out_dir=out_dir, story=story, videos=videos, notes=notes)


# ---------------------------------------------------------------------------------------------- metrics


@dataclass
class EvalConfig:
    """Evaluation settings.

    Attributes:
        frames_per_shot: frames sampled per shot for the video embedding (encoders with a fixed frame count,
            like ViCLIP, use theirs).
        aesthetic_frames: frames per shot the aesthetic scorer sees; None scores every frame (VBench).
        top_k: pairs in the prompt-matched cross-shot consistency (10 in the paper).
    """

    frames_per_shot: int = 8
    aesthetic_frames: int | None = None
    top_k: int = 10

    def __post_init__(self) -> None:
        if self.frames_per_shot < 1:
            raise EvalError(f"frames_per_shot must be >= 1, got {self.frames_per_shot}")
        if self.aesthetic_frames is not None and self.aesthetic_frames < 1:
            raise EvalError(f"aesthetic_frames must be >= 1 (or None for all), got {self.aesthetic_frames}")
        if self.top_k < 1:
            raise EvalError(f"top_k must be >= 1, got {self.top_k}")


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def consistency_pairs(prompt_sim: torch.Tensor, top_k: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(all shot pairs i < j, the `top_k` pairs whose prompts are most alike) from the [n, n] prompt similarity;
    ties go to the earlier pair."""
    n = prompt_sim.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    ranked = sorted(pairs, key=lambda p: (-float(prompt_sim[p]), p))
    return pairs, ranked[: min(top_k, len(pairs))]


def cross_shot_consistency(
    shot_frames: Sequence[np.ndarray],
    prompts: Sequence[str],
    encoder: VideoTextEncoder,
    config: EvalConfig | None = None,
) -> dict[str, Any]:
    """Cross-shot consistency of shots already in memory (uint8 [N, H, W, 3] each), as `evaluate` computes it:
    frames sampled the same way, mean video similarity over all pairs and over the `top_k` pairs whose
    prompts are most alike. Returns ``{"all", "top_k", "top_k_pairs_used", "top_pairs"}`` (None when n < 2)."""
    config = config or EvalConfig()
    if len(shot_frames) != len(prompts):
        raise EvalError(f"got {len(shot_frames)} shots but {len(prompts)} prompts")
    count = encoder.num_frames or config.frames_per_shot
    V = torch.stack([encoder.embed_video(f[sample_frame_indices(len(f), count)]).float().cpu() for f in shot_frames])
    T = encoder.embed_text(list(prompts)).float().cpu()
    video_sim = (V @ V.T).clamp(-1, 1)
    pairs, top = consistency_pairs((T @ T.T).clamp(-1, 1), config.top_k)
    return {
        "all": _mean([float(video_sim[p]) for p in pairs]),
        "top_k": _mean([float(video_sim[p]) for p in top]),
        "top_k_pairs_used": len(top),
        "top_pairs": [list(p) for p in top],
    }


def evaluate(
    inputs: EvalInputs,
    encoder: VideoTextEncoder,
    aesthetic: FrameScorer | None = None,
    config: EvalConfig | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Compute the ST-Bench metrics for `inputs`; returns the report as a JSON-ready dict."""
    config = config or EvalConfig()
    story, videos = inputs.story, inputs.videos
    notes = list(inputs.notes)
    n = len(videos)
    shot_count = encoder.num_frames or config.frames_per_shot
    global_count = encoder.num_frames or config.frames_per_shot * n

    iterator = videos
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(videos, desc="shots", unit="shot")

    embeddings, frame_counts, rows = [], [], []
    for video in iterator:
        frames, fps = read_video(video.path)
        frame_counts.append(len(frames))
        embeddings.append(encoder.embed_video(frames[sample_frame_indices(len(frames), shot_count)]).float().cpu())
        row: dict[str, Any] = {
            "index": video.shot.index,
            "file": _relative(video.path, inputs.out_dir),
            "scene": video.shot.scene,
            "shot_in_scene": video.shot.shot_in_scene,
            "frames": len(frames),
            "fps": fps,
            "prompt": video.shot.prompt,
        }
        if aesthetic is not None:
            picked = (
                frames
                if config.aesthetic_frames is None
                else frames[sample_frame_indices(len(frames), config.aesthetic_frames)]
            )
            row["aesthetic"] = _mean(aesthetic.score_frames(picked, video.shot.prompt))
        rows.append(row)
        del frames

    V = torch.stack(embeddings)  # [n, D]
    T = encoder.embed_text(story.prompts).float().cpu()  # [n, D]
    video_sim = (V @ V.T).clamp(-1, 1)
    prompt_sim = (T @ T.T).clamp(-1, 1)
    # Prompt following needs one space for videos and texts; an encoder without it says so.
    aligned = getattr(encoder, "aligned", True)
    single = (V * T).sum(-1) if aligned else None
    if not aligned:
        notes.append(f"{encoder.name}: videos and texts do not share one embedding space; prompt following is "
                     "skipped")
    for i, row in enumerate(rows):
        row["prompt_following"] = float(single[i]) if aligned else None
        others = [float(video_sim[i, j]) for j in range(n) if j != i]
        row["consistency_mean"] = _mean(others)

    pairs, top = consistency_pairs(prompt_sim, config.top_k)
    k = len(top)
    if n < 2:
        notes.append("the story has one shot: cross-shot consistency is undefined")
    elif k < config.top_k:
        notes.append(f"the story has {n} shots, so only {len(pairs)} pairs: top-{config.top_k} uses all {k} of them")

    # Global prompt following: the whole story as one video (shots end to end), sampled like one shot.
    global_score = None
    if story.overview.strip() and aligned:
        wanted = sample_frame_indices(sum(frame_counts), global_count)
        offsets = np.cumsum([0] + frame_counts)
        collected = []
        for s, video in enumerate(videos):
            local = [i - offsets[s] for i in wanted if offsets[s] <= i < offsets[s + 1]]
            if local:
                frames, _ = read_video(video.path)
                collected.append(frames[local])
                del frames
        story_video = np.concatenate(collected)
        overview = encoder.embed_text([story.overview]).float().cpu()[0]
        global_score = float(encoder.embed_video(story_video).float().cpu() @ overview)

    aesthetic_scores = [row["aesthetic"] for row in rows if row.get("aesthetic") is not None]
    if aesthetic is None:
        notes.append("no aesthetic model given (--aesthetic-head or --hpsv3): aesthetic quality is skipped")

    metrics = {
        "aesthetic_quality": _mean(aesthetic_scores) if aesthetic is not None else None,
        "prompt_following_global": global_score,
        "prompt_following_single_shot": _mean(single.tolist()) if aligned else None,
        "cross_shot_consistency": _mean([float(video_sim[p]) for p in pairs]),
        "cross_shot_consistency_top_k": _mean([float(video_sim[p]) for p in top]),
    }
    return {
        "story": {"name": story.name, "path": str(story.path) if story.path else None, "shots": n},
        "out_dir": str(inputs.out_dir),
        "encoders": {
            "video_text": encoder.name,
            "aesthetic": aesthetic.name if aesthetic is not None else None,
            "aesthetic_scale": aesthetic.scale if aesthetic is not None else None,
        },
        "settings": {
            "frames_per_shot": shot_count,
            "global_frames": global_count,
            "aesthetic_frames": config.aesthetic_frames or "all",
            "top_k": config.top_k,
            "top_k_pairs_used": k,
            "frame_sampling": "middle of equal segments (VBench)",
        },
        "metrics": metrics,
        "top_pairs": [
            {
                "shots": [rows[i]["file"], rows[j]["file"]],
                "indices": [i, j],
                "prompt_similarity": float(prompt_sim[i, j]),
                "video_similarity": float(video_sim[i, j]),
            }
            for i, j in top
        ],
        "shots": rows,
        "similarity_matrix": [[round(float(x), 6) for x in r] for r in video_sim],
        "prompt_similarity_matrix": [[round(float(x), 6) for x in r] for r in prompt_sim],
        "notes": notes,
    }


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------- report


METRIC_LABELS = {
    "aesthetic_quality": "Aesthetic quality",
    "prompt_following_global": "Prompt following (global)",
    "prompt_following_single_shot": "Prompt following (single-shot)",
    "cross_shot_consistency": "Cross-shot consistency (all pairs)",
    "cross_shot_consistency_top_k": "Cross-shot consistency (top-{k})",
}


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table (metrics, then one row per shot)."""
    k = report["settings"]["top_k"]
    lines = [
        f"Story: {report['story']['name']} ({report['story']['shots']} shots)  {report['out_dir']}",
        f"Video-text encoder: {report['encoders']['video_text']}",
        f"Aesthetic scorer:   {report['encoders']['aesthetic'] or '-'}",
        "",
    ]
    width = max(len(label.format(k=k)) for label in METRIC_LABELS.values())
    for key, label in METRIC_LABELS.items():
        value = report["metrics"][key]
        lines.append(f"  {label.format(k=k):<{width}}  {'-' if value is None else f'{value:.4f}'}")
    lines += ["", f"  {'shot':<14}{'prompt':>8}{'consist.':>10}{'aesthetic':>11}  prompt"]
    for row in report["shots"]:
        aesthetic = row.get("aesthetic")
        prompt = row["prompt"] if len(row["prompt"]) <= 48 else row["prompt"][:45] + "..."
        lines.append(
            f"  {Path(row['file']).stem:<14}"
            f"{'-' if row['prompt_following'] is None else format(row['prompt_following'], '.4f'):>8}"
            f"{'-' if row['consistency_mean'] is None else format(row['consistency_mean'], '.4f'):>10}"
            f"{'-' if aesthetic is None else format(aesthetic, '.4f'):>11}  {prompt}"
        )
    if report["notes"]:
        lines += [""] + [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def plot_similarity(report: dict[str, Any], path: str | Path) -> Path:
    """Shot x shot video-similarity heatmap with the top-k prompt-matched pairs outlined (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    path = Path(path)
    matrix = np.asarray(report["similarity_matrix"], dtype=float)
    labels = [Path(row["file"]).stem for row in report["shots"]]
    n = len(labels)
    size = max(4.0, 0.55 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    # Colour range from the lowest pair similarity: CLIP-like cosines bunch up well above 0.
    off_diagonal = matrix[~np.eye(n, dtype=bool)]
    low = float(np.floor(off_diagonal.min() * 20) / 20) if off_diagonal.size else 0.0
    image = ax.imshow(matrix, cmap="viridis", vmin=min(low, 0.95), vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{matrix[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if matrix[i, j] < (low + 1) / 2 else "black",
                )
    for pair in report["top_pairs"]:
        i, j = pair["indices"]
        for r, c in ((i, j), (j, i)):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    k = report["settings"]["top_k_pairs_used"]
    ax.set_title(f"{report['story']['name']}: shot similarity (red: top-{k} prompt-matched pairs)", fontsize=9)
    ax.set_xlabel(report["encoders"]["video_text"], fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], json_path: str | Path, plot: bool = True) -> list[Path]:
    """Write the report JSON (atomically) and, with `plot`, the similarity chart beside it."""
    json_path = Path(json_path)
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    written = [json_path]
    if plot:
        written.append(plot_similarity(report, json_path.with_name(json_path.stem + "_similarity.png")))
    return written


# ---------------------------------------------------------------------------------------------- CLI


def _pretrained(value: str | None) -> str | None:
    return None if value is None or value.lower() == "none" else value


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_encoder(args: argparse.Namespace) -> VideoTextEncoder:
    """The video-text encoder the command line asks for (each model is loaded once)."""
    if args.encoder == "viclip":
        if not args.viclip_checkpoint:
            raise EvalError("--encoder viclip needs --viclip-checkpoint PATH (ViClip-InternVid-10M-FLT.pth)")
        return ViCLIPEncoder(args.viclip_checkpoint, device=args.device, dtype=_DTYPES[args.precision])
    return OpenCLIPVideoEncoder.load(
        args.clip_model,
        _pretrained(args.clip_pretrained),
        device=args.device,
        batch_size=args.batch_size,
        precision=args.precision,
    )


def build_aesthetic(args: argparse.Namespace, encoder: VideoTextEncoder) -> FrameScorer | None:
    """The aesthetic scorer the command line asks for, or None when no aesthetic weights were given. The LAION
    head reuses the similarity encoder's CLIP when both name the same model."""
    if args.aesthetic_head:
        shared = None
        same_clip = (args.clip_model, _pretrained(args.clip_pretrained)) == (
            args.aesthetic_clip_model,
            _pretrained(args.aesthetic_clip_pretrained),
        )
        if isinstance(encoder, OpenCLIPVideoEncoder) and same_clip:
            shared = encoder.embedder
        return LaionAestheticScorer.load(
            args.aesthetic_head,
            args.aesthetic_clip_model,
            _pretrained(args.aesthetic_clip_pretrained),
            device=args.device,
            batch_size=args.batch_size,
            precision=args.precision,
            embedder=shared,
        )
    if args.hpsv3:
        from storymem.memory.scorers import HPSv3Scorer

        kwargs = {"device": args.device}
        if args.hpsv3_base:
            kwargs["base"] = args.hpsv3_base
        return HPSv3FrameScorer(HPSv3Scorer.from_pretrained(args.hpsv3, **kwargs), name=f"HPSv3 {args.hpsv3}")
    return None


def _check_model_flags(args: argparse.Namespace) -> None:
    """Fail on missing model files and conflicting flags before anything heavy starts."""
    for flag, value in (("--viclip-checkpoint", args.viclip_checkpoint), ("--aesthetic-head", args.aesthetic_head)):
        if value and not Path(value).is_file():
            raise EvalError(f"{flag} {value}: file not found")
    if args.aesthetic_head and args.hpsv3:
        raise EvalError("give one aesthetic model: --aesthetic-head (LAION) or --hpsv3, not both")
    if args.encoder == "viclip" and not args.viclip_checkpoint:
        raise EvalError("--encoder viclip needs --viclip-checkpoint PATH (ViClip-InternVid-10M-FLT.pth)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m storymem eval",
        description="ST-Bench metrics of a rendered story: cross-shot consistency, prompt following, aesthetics.",
    )
    parser.add_argument(
        "out_dir",
        help="folder written by `storymem render` (shots/SS_NN.mp4, manifest.json), "
        "or any folder of SS_NN.mp4 shot videos together with --story",
    )
    parser.add_argument("--story", help="story script (required without manifest.json; overrides the manifest's)")
    parser.add_argument("--output", help="report JSON path (default OUT_DIR/metrics.json); the chart goes beside it")
    parser.add_argument("--no-plot", action="store_true", help="do not write the similarity chart")
    group = parser.add_argument_group("video-text encoder")
    group.add_argument(
        "--encoder",
        choices=["openclip", "viclip"],
        help="default: viclip when --viclip-checkpoint is given, else openclip",
    )
    group.add_argument("--clip-model", default="ViT-L-14", help="open_clip architecture (default ViT-L-14)")
    group.add_argument(
        "--clip-pretrained",
        default="openai",
        help="open_clip weights: tag, local file, or 'none' (random weights); default openai",
    )
    group.add_argument("--viclip-checkpoint", help="ViCLIP checkpoint (ViClip-InternVid-10M-FLT.pth or .safetensors)")
    group = parser.add_argument_group("aesthetic quality")
    group.add_argument("--aesthetic-head", help="LAION aesthetic head sa_0_4_vit_l_14_linear.pth (or .safetensors)")
    group.add_argument("--aesthetic-clip-model", default="ViT-L-14", help="CLIP for the LAION head (default ViT-L-14)")
    group.add_argument("--aesthetic-clip-pretrained", default="openai", help="its weights (default openai)")
    group.add_argument(
        "--hpsv3", help="HPSv3 checkpoint (HPSv3.safetensors, its folder, or a Hub id) instead of LAION"
    )
    group.add_argument("--hpsv3-base", help="Qwen2-VL-7B-Instruct processor/config for HPSv3 (Hub id or folder)")
    group = parser.add_argument_group("sampling")
    group.add_argument("--frames", type=int, default=8, help="frames sampled per shot for embeddings (default 8)")
    group.add_argument("--aesthetic-frames", type=int, help="frames per shot for the aesthetic score (default: all)")
    group.add_argument("--top-k", type=int, default=10, help="prompt-matched pairs for top-k consistency (default 10)")
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", help="torch device (default cuda when available)")
    group.add_argument("--batch-size", type=int, default=32, help="frames per CLIP batch (default 32)")
    group.add_argument("--precision", choices=sorted(_DTYPES), default="fp32", help="model precision (default fp32)")
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m storymem eval``; returns the exit code (0 ok, 2 bad input)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.encoder is None:
        args.encoder = "viclip" if args.viclip_checkpoint else "openclip"
    try:
        config = EvalConfig(frames_per_shot=args.frames, aesthetic_frames=args.aesthetic_frames, top_k=args.top_k)
        _check_model_flags(args)
        inputs = collect_shots(args.out_dir, args.story)  # all input checks, before any model loads
        encoder = build_encoder(args)
        aesthetic = build_aesthetic(args, encoder)
        report = evaluate(inputs, encoder, aesthetic, config, progress=not args.quiet)
        output = Path(args.output) if args.output else inputs.out_dir / "metrics.json"
        written = write_report(report, output, plot=not args.no_plot)
    except (ValueError, FileNotFoundError) as err:  # StoryError, VideoError, EvalError and bad model names
        print(f"storymem eval: error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
