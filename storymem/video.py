"""Reading, writing and joining shot videos (H.264 mp4) with the ffmpeg binary that imageio-ffmpeg ships.

Every writer is atomic: ffmpeg writes a temporary file in the destination folder which then replaces the
destination with `os.replace`, so an interrupted render never leaves a truncated ``.mp4`` behind that a
resumed run would take for a finished shot.
"""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path

# imageio-ffmpeg starts ffmpeg with a preexec_fn (to keep Ctrl-C away from it), which makes Python fork the whole
# process instead of vfork-ing it. Forking copies the page tables of everything the process holds: with models
# loaded (tens of GB when rendering, a GPU context when preparing) every read or write of a short video then
# costs a large multiple of the decoding itself (benchmarks/bench_prepare.py --ballast-gb). Without it, Ctrl-C
# also reaches ffmpeg, which stops with the run; writers are atomic, so nothing half-written is kept. Setting
# the variable to 0 beforehand keeps imageio-ffmpeg's default.
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")

__all__ = ["VideoError", "VideoInfo", "concat_videos", "probe_video", "read_video", "write_video"]


class VideoError(ValueError):
    """A video file is missing or unreadable, frames have the wrong shape, or ffmpeg failed."""


@dataclass(frozen=True)
class VideoInfo:
    """What ffmpeg reports about a video's first video stream."""

    path: Path
    width: int
    height: int
    fps: float
    codec: str
    pix_fmt: str
    duration: float


def _ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


_BANNER_PREFIXES = ("ffmpeg version", "built with", "configuration:", "lib", "Copyright")


def _stderr_tail(text: str, lines: int = 8) -> str:
    """The last lines of ffmpeg's stderr, without its version banner."""
    kept = [line for line in text.strip().splitlines() if not line.strip().startswith(_BANNER_PREFIXES)]
    return "\n".join(kept[-lines:])


def _as_uint8_frames(frames) -> np.ndarray:
    if hasattr(frames, "detach"):  # torch tensor: move to host memory without importing torch here
        frames = frames.detach().cpu().numpy()
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise VideoError(f"frames must have shape [N, H, W, 3] (RGB), got {list(array.shape)}")
    if array.shape[0] == 0:
        raise VideoError("frames is empty: a video needs at least one frame")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise VideoError("float frames contain NaN or infinite values")
        return np.ascontiguousarray(np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8))
    raise VideoError(f"frames must be uint8 in [0, 255] or float in [0, 1], got dtype {array.dtype}")


def write_video(
    path: str | Path,
    frames,
    fps: float = 16,
    crf: int = 18,
    preset: str = "medium",
    pad_to_even: bool = False,
) -> Path:
    """Write frames to an H.264 (yuv420p) mp4 file, atomically.

    Args:
        path: destination file (its folder is created).
        frames: uint8 array [N, H, W, 3] in [0, 255], or float in [0, 1] (rounded after clipping); a torch
            tensor in that layout works too.
        fps: frame rate (16 for Wan2.2).
        crf: x264 constant rate factor (0 lossless, 18 visually lossless, 23 x264's default).
        preset: x264 speed/size preset.
        pad_to_even: yuv420p needs even width and height. By default an odd size is an error; with True the
            last row/column is repeated to make it even.

    Returns:
        The path written.
    """
    path = Path(path)
    array = _as_uint8_frames(frames)
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise VideoError(f"{path}: fps must be a positive number, got {fps!r}")
    _, height, width, _ = array.shape
    if height % 2 or width % 2:
        if not pad_to_even:
            raise VideoError(
                f"{path}: H.264 yuv420p needs an even frame size, got {width}x{height} (W x H); "
                "crop or resize the frames, or pass pad_to_even=True"
            )
        array = np.pad(array, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        _, height, width, _ = array.shape

    with atomic_path(path) as tmp:
        cmd = [
            _ffmpeg_exe(), "-y", "-v", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", _fps_arg(fps), "-i", "-",
            "-an", "-c:v", "libx264", "-preset", preset, "-crf", str(int(crf)), "-pix_fmt", "yuv420p",
            "-movflags", "+faststart", str(tmp),
        ]  # fmt: skip
        # stderr goes to a file, not a pipe, so a chatty ffmpeg can never block while we feed stdin.
        with tempfile.TemporaryFile() as stderr_file:
            process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr_file)
            try:
                for frame in array:
                    process.stdin.write(frame.data)
            except BrokenPipeError:
                pass  # ffmpeg died; its exit status and stderr tell why
            finally:
                process.stdin.close()
                code = process.wait()
            if code != 0:
                stderr_file.seek(0)
                message = _stderr_tail(stderr_file.read().decode(errors="replace"))
                raise VideoError(f"{path}: ffmpeg failed to encode the video (exit {code}):\n{message}")
    return path


def _fps_arg(fps: float) -> str:
    from fractions import Fraction

    return str(Fraction(fps).limit_denominator(100000))


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise VideoError(f"{path}: video file not found")
    if not path.is_file():
        raise VideoError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: video file is empty")


def _open_reader(path: Path, input_params: Sequence[str] = (), output_params: Sequence[str] = ()):
    """Start imageio-ffmpeg's frame reader; return (generator, metadata)."""
    import imageio_ffmpeg

    _check_readable(path)
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24", input_params=list(input_params),
                                        output_params=list(output_params))
    try:
        meta = next(reader)
    except (OSError, RuntimeError, IndexError, StopIteration, AttributeError) as err:
        reader.close()
        detail = _stderr_tail(str(err)) if str(err) else type(err).__name__
        raise VideoError(f"{path}: cannot read video (not a video file, or no video stream): {detail}") from None
    return reader, meta


def probe_video(path: str | Path) -> VideoInfo:
    """Size, frame rate, codec and duration of a video, without decoding its frames."""
    path = Path(path)
    reader, meta = _open_reader(path)
    reader.close()
    width, height = meta["size"]
    return VideoInfo(
        path=path,
        width=int(width),
        height=int(height),
        fps=float(meta.get("fps") or 0.0),
        codec=str(meta.get("codec", "")),
        pix_fmt=str(meta.get("pix_fmt", "")).split("(")[0],
        duration=float(meta.get("duration") or 0.0),
    )


def read_video(path: str | Path, start: float | None = None, end: float | None = None) -> tuple[np.ndarray, float]:
    """Decode a video, or only its ``[start, end)`` seconds (ffmpeg seeks to ``start``, so a shot of a long video
    does not decode the whole file). Returns (uint8 frames [N, H, W, 3] RGB, fps)."""
    path = Path(path)
    for name, value in (("start", start), ("end", end)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise VideoError(f"{path}: {name} must be a number of seconds >= 0, got {value!r}")
    if start is not None and end is not None and end <= start:
        raise VideoError(f"{path}: end ({end}s) must come after start ({start}s)")
    input_params = ["-ss", f"{start:.6f}"] if start else []
    output_params = ["-t", f"{end - (start or 0.0):.6f}"] if end is not None else []
    reader, meta = _open_reader(path, input_params, output_params)
    width, height = meta["size"]
    try:
        frames = [np.frombuffer(buffer, dtype=np.uint8).reshape(height, width, 3) for buffer in reader]
    except RuntimeError as err:
        raise VideoError(f"{path}: video is truncated or corrupt: {err}") from None
    finally:
        reader.close()
    if not frames:
        span = "" if start is None and end is None else f" between {start or 0:.2f}s and {end}s"
        raise VideoError(f"{path}: video has no frames{span}")
    return np.stack(frames), float(meta.get("fps") or 0.0)


def _concat_list_line(path: Path) -> str:
    # The concat demuxer's quoting: a single quote is closed, escaped, and reopened.
    return "file '" + str(path.resolve()).replace("'", "'\\''") + "'\n"


def concat_videos(
    paths: Sequence[str | Path],
    out_path: str | Path,
    crf: int = 18,
    preset: str = "medium",
) -> Path:
    """Join videos end to end into `out_path`, atomically.

    When every input has the same codec, pixel format, size and frame rate (shots of one render do) the
    streams are copied without re-encoding (ffmpeg's concat demuxer). Otherwise the inputs are re-encoded
    to H.264 at the first input's size (letterboxed, aspect kept) and frame rate; audio is dropped then.
    """
    out_path = Path(out_path)
    paths = [Path(p) for p in paths]
    if not paths:
        raise VideoError(f"{out_path}: no videos to concatenate")
    infos = [probe_video(p) for p in paths]  # fails early, naming the bad input
    first = infos[0]
    same = all(
        (i.codec, i.pix_fmt, i.width, i.height) == (first.codec, first.pix_fmt, first.width, first.height)
        and abs(i.fps - first.fps) < 1e-3
        for i in infos
    )

    with atomic_path(out_path) as tmp:
        if same:
            with tempfile.NamedTemporaryFile("w", suffix=".txt", dir=out_path.parent, delete=False) as listing:
                listing.writelines(_concat_list_line(p) for p in paths)
            try:
                cmd = [_ffmpeg_exe(), "-y", "-v", "error", "-f", "concat", "-safe", "0", "-i", listing.name,
                       "-c", "copy", "-movflags", "+faststart", str(tmp)]  # fmt: skip
                result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            finally:
                os.unlink(listing.name)
        else:
            width, height, fps = first.width, first.height, first.fps or 16.0
            inputs: list[str] = []
            chains = []
            for k, p in enumerate(paths):
                inputs += ["-i", str(p)]
                chains.append(
                    f"[{k}:v:0]scale={width}:{height}:force_original_aspect_ratio=decrease,"
                    f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2,setsar=1,fps={_fps_arg(fps)},format=yuv420p[v{k}]"
                )
            graph = ";".join(chains) + ";" + "".join(f"[v{k}]" for k in range(len(paths)))
            graph += f"concat=n={len(paths)}:v=1:a=0[out]"
            cmd = [_ffmpeg_exe(), "-y", "-v", "error", *inputs, "-filter_complex", graph, "-map", "[out]",
                   "-an", "-c:v", "libx264", "-preset", preset, "-crf", str(int(crf)), "-pix_fmt", "yuv420p",
                   "-movflags", "+faststart", str(tmp)]  # fmt: skip
            result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if result.returncode != 0:
            message = _stderr_tail(result.stderr.decode(errors="replace"))
            raise VideoError(f"{out_path}: ffmpeg failed to concatenate {len(paths)} videos:\n{message}")
    return out_path
