"""The files of a render folder: per shot its video, keyframes, sample thumbnails and the memory bank after it;
per story the joined video, the contact sheet and ``index.html`` (:mod:`storymem.render.report`). Every file
is written atomically (folders of images are swapped in whole), so an interrupted render leaves none half
written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_folder, atomic_write_json

__all__ = ["SAMPLES_PER_SHOT", "SAMPLE_HEIGHT", "write_manifest", "write_shot_files", "write_references",
           "write_story_outputs"]

SAMPLES_PER_SHOT = 6  # thumbnails of a shot on the contact sheet and the page
SAMPLE_HEIGHT = 144


def write_manifest(out_dir: Path, manifest: dict) -> None:
    from .plan import MANIFEST_NAME, now

    manifest["updated"] = now()
    atomic_write_json(Path(out_dir) / MANIFEST_NAME, manifest)


def _sample_indices(count: int) -> list[int]:
    return sorted(set(np.linspace(0, count - 1, min(SAMPLES_PER_SHOT, count)).round().astype(int).tolist()))


def write_shot_files(out_dir: Path, stem: str, frames: np.ndarray, keyframes: list[int], bank, fps: int) -> dict:
    """Write one shot's video, keyframes (PNG), sample thumbnails (JPEG) and the memory bank after it; return
    their paths relative to ``out_dir`` as the manifest lists them."""
    from PIL import Image

    from ..video import write_video

    out_dir = Path(out_dir)
    write_video(out_dir / "shots" / f"{stem}.mp4", frames, fps=fps)
    with atomic_folder(out_dir / "keyframes" / stem) as folder:
        for i in keyframes:
            Image.fromarray(np.ascontiguousarray(frames[i])).save(folder / f"f{i:03d}.png")
    samples = _sample_indices(len(frames))
    with atomic_folder(out_dir / "samples" / stem) as folder:
        for i in samples:
            image = Image.fromarray(frames[i])
            if image.height > SAMPLE_HEIGHT:
                image = image.resize((round(image.width * SAMPLE_HEIGHT / image.height), SAMPLE_HEIGHT),
                                     Image.BICUBIC)
            image.save(folder / f"f{i:03d}.jpg", quality=90)
    bank.save(out_dir / "memory" / f"after_{stem}")
    return {
        "file": f"shots/{stem}.mp4",
        "keyframes": [{"frame": int(i), "file": f"keyframes/{stem}/f{i:03d}.png"} for i in keyframes],
        "samples": [f"samples/{stem}/f{i:03d}.jpg" for i in samples],
        "memory_state": f"memory/after_{stem}",
    }


def write_references(out_dir: Path, images: list[np.ndarray]) -> None:
    """The reference images (MR2V) as ``references/ref_NN.png``, as the manifest names them."""
    from PIL import Image

    from .report import save_image_atomic

    for i, image in enumerate(images):
        save_image_atomic(Image.fromarray(image), Path(out_dir) / "references" / f"ref_{i:02d}.png")


def write_story_outputs(out_dir: Path, manifest: dict) -> None:
    """story.mp4 (stream copy of the finished shots), the contact sheet and index.html."""
    from ..video import concat_videos
    from .report import write_report

    out_dir = Path(out_dir)
    shots = manifest["shots"]
    if shots:
        concat_videos([out_dir / s["file"] for s in shots], out_dir / "story.mp4")
    write_report(out_dir, manifest)
