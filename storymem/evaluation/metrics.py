"""ST-Bench metrics over a rendered story (StoryMem, ST-Bench).

* **cross-shot consistency**: cosine similarity of the shots' video embeddings, averaged over all shot
  pairs, and over the `top_k` (10) pairs whose *prompts* are most similar (text-text similarity with the
  same encoder's text tower): shots meant to show the same thing should look alike;
* **prompt following**: single-shot (each shot's video vs its prompt) and global (the whole story as one
  video vs `story_overview`);
* **aesthetic quality**: the LAION aesthetic predictor on CLIP ViT-L/14 frame embeddings, divided by 10
  and averaged over each shot's frames, as VBench does (or HPSv3 when that is what is available).

Video-text encoders sit behind `VideoTextEncoder` (:mod:`storymem.evaluation.encoders`). Frames are sampled
like VBench: the video is cut into equal segments and the middle frame of each is taken. Inputs are checked
before any model is loaded (`collect_shots`); videos are read with :func:`storymem.video.read_video`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storymem.story import Shot, Story, StoryError, load_story
from storymem.video import probe_video, read_video

from .encoders import EvalError, FrameScorer, VideoTextEncoder, sample_frame_indices

__all__ = [
    "EvalConfig",
    "EvalInputs",
    "ShotVideo",
    "collect_shots",
    "consistency_pairs",
    "cross_shot_consistency",
    "evaluate",
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


def _shots_from_manifest(manifest_path: Path, out_dir: Path, story_path,
                         notes: list[str]) -> tuple[Story, list[ShotVideo]]:
    """The story (the manifest's, or `story_path`) and the files its ``shots`` list names."""
    manifest = _read_manifest(manifest_path)
    story = load_story(story_path) if story_path is not None else _story_from_manifest(manifest, manifest_path, out_dir)
    listed = manifest.get("shots")
    if isinstance(listed, list) and len(listed) > len(story):
        raise EvalError(
            f"story and folder disagree: {manifest_path} lists {len(listed)} shots but the story "
            f"{story.path or repr(story.name)} has {len(story)}"
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
    return story, [ShotVideo(shot, files[shot.index]) for shot in story]


def _shots_from_folder(out_dir: Path, story_path) -> tuple[Story, list[ShotVideo]]:
    """Videos ``SS_NN.mp4`` matched to the story's shots by file stem, in ``out_dir/shots`` or ``out_dir``."""
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
    return story, [ShotVideo(shot, found[shot.file_stem]) for shot in story]


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
        story, videos = _shots_from_manifest(manifest_path, out_dir, story_path, notes)
    else:
        story, videos = _shots_from_folder(out_dir, story_path)
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


def _read_shots(inputs: EvalInputs, encoder: VideoTextEncoder, aesthetic: FrameScorer | None, config: EvalConfig,
                frame_count: int, progress: bool) -> tuple[torch.Tensor, list[int], list[dict[str, Any]]]:
    """Each shot read once: (video embeddings [n, D], frame counts, report rows with the aesthetic score)."""
    iterator = inputs.videos
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(inputs.videos, desc="shots", unit="shot")
    embeddings, frame_counts, rows = [], [], []
    for video in iterator:
        frames, fps = read_video(video.path)
        frame_counts.append(len(frames))
        embeddings.append(encoder.embed_video(frames[sample_frame_indices(len(frames), frame_count)]).float().cpu())
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
    return torch.stack(embeddings), frame_counts, rows


def _global_prompt_following(videos: Sequence[ShotVideo], frame_counts: list[int], overview: str,
                             encoder: VideoTextEncoder, frame_count: int) -> float:
    """The whole story as one video (shots end to end, sampled like one shot) against its overview."""
    wanted = sample_frame_indices(sum(frame_counts), frame_count)
    offsets = np.cumsum([0] + frame_counts)
    collected = []
    for s, video in enumerate(videos):
        local = [i - offsets[s] for i in wanted if offsets[s] <= i < offsets[s + 1]]
        if local:
            frames, _ = read_video(video.path)
            collected.append(frames[local])
            del frames
    text = encoder.embed_text([overview]).float().cpu()[0]
    return float(encoder.embed_video(np.concatenate(collected)).float().cpu() @ text)


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
    V, frame_counts, rows = _read_shots(inputs, encoder, aesthetic, config, shot_count, progress)  # V: [n, D]

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

    global_score = None
    if story.overview.strip() and aligned:
        global_score = _global_prompt_following(videos, frame_counts, story.overview, encoder, global_count)

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
