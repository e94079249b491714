import os
import subprocess
import sys

import numpy as np
import pytest

from storymem.video import VideoError, concat_videos, probe_video, read_video, write_video


def gradient_video(frames=6, height=32, width=48, shift=0):
    """Smooth content (H.264 keeps it close) that changes from frame to frame."""
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        out[t, ..., 0] = (x * 4 + t * 10 + shift) % 256
        out[t, ..., 1] = (y * 6) % 256
        out[t, ..., 2] = 128 + shift
    return out


def test_write_read_round_trip(tmp_path):
    frames = gradient_video()
    path = write_video(tmp_path / "sub" / "a.mp4", frames, fps=16, crf=0)
    assert path.is_file()
    decoded, fps = read_video(path)
    assert decoded.dtype == np.uint8 and decoded.shape == frames.shape and fps == 16
    # yuv420p subsampling costs a little even at crf 0; the content and frame order survive.
    assert np.abs(decoded.astype(int) - frames).mean() < 3
    assert [int(np.argmin([np.abs(d.astype(int) - f).mean() for f in frames])) for d in decoded] == list(range(6))
    info = probe_video(path)
    assert (info.width, info.height, info.fps, info.codec, info.pix_fmt) == (48, 32, 16.0, "h264", "yuv420p")
    assert not [p for p in path.parent.iterdir() if p.name != "a.mp4"]  # no temp files left


def test_float_frames_and_overwrite(tmp_path):
    path = tmp_path / "f.mp4"
    write_video(path, np.zeros((3, 16, 16, 3), np.uint8), fps=8)
    write_video(path, np.full((4, 16, 16, 3), 1.5, np.float32), fps=8)  # clipped to white, replaces the file
    decoded, fps = read_video(path)
    assert decoded.shape == (4, 16, 16, 3) and fps == 8 and decoded.min() >= 250


def test_write_errors_leave_no_file(tmp_path):
    path = tmp_path / "bad.mp4"
    with pytest.raises(VideoError, match=r"even frame size, got 33x32"):
        write_video(path, np.zeros((2, 32, 33, 3), np.uint8))
    with pytest.raises(VideoError, match=r"shape \[N, H, W, 3\]"):
        write_video(path, np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(VideoError, match="at least one frame"):
        write_video(path, np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(VideoError, match="dtype int64"):
        write_video(path, np.zeros((1, 32, 32, 3), np.int64))
    with pytest.raises(VideoError, match="fps must be a positive number"):
        write_video(path, np.zeros((1, 32, 32, 3), np.uint8), fps=0)
    with pytest.raises(VideoError, match="ffmpeg failed"):
        write_video(path, np.zeros((1, 32, 32, 3), np.uint8), preset="no-such-preset")
    assert list(tmp_path.iterdir()) == []


def test_pad_to_even(tmp_path):
    frames = gradient_video(frames=2, height=31, width=33)
    path = write_video(tmp_path / "odd.mp4", frames, pad_to_even=True, crf=0)
    decoded, _ = read_video(path)
    assert decoded.shape == (2, 32, 34, 3)
    assert np.abs(decoded[:, :31, :33].astype(int) - frames).mean() < 3


def test_read_errors(tmp_path):
    with pytest.raises(VideoError, match="missing.mp4: video file not found"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="not a file"):
        read_video(tmp_path)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty.mp4: video file is empty"):
        probe_video(tmp_path / "empty.mp4")
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(VideoError, match="text.mp4: cannot read video"):
        read_video(tmp_path / "text.mp4")


def test_read_a_time_range(tmp_path):
    frames = gradient_video(frames=32)
    path = write_video(tmp_path / "long.mp4", frames, fps=16, crf=0)
    part, fps = read_video(path, start=0.5, end=1.25)  # frames 8 .. 19 at 16 fps
    assert fps == 16 and part.shape == (12, 32, 48, 3)
    nearest = [int(np.argmin([np.abs(d.astype(int) - f).mean() for f in frames])) for d in part]
    assert nearest == list(range(8, 20))
    assert len(read_video(path, end=0.25)[0]) == 4 and len(read_video(path, start=1.75)[0]) == 4
    with pytest.raises(VideoError, match="end \\(0.5s\\) must come after start \\(1.0s\\)"):
        read_video(path, start=1.0, end=0.5)
    with pytest.raises(VideoError, match="start must be a number of seconds >= 0"):
        read_video(path, start=-1)
    with pytest.raises(VideoError, match="no frames between 5.00s and 6.0s"):
        read_video(path, start=5.0, end=6.0)


def test_concat_stream_copy(tmp_path):
    a = write_video(tmp_path / "a.mp4", gradient_video(frames=5), crf=0)
    b = write_video(tmp_path / "b.mp4", gradient_video(frames=3, shift=100), crf=0)
    out = concat_videos([a, b], tmp_path / "story" / "all.mp4")
    joined, fps = read_video(out)
    parts = np.concatenate([read_video(a)[0], read_video(b)[0]])
    # Stream copy: the decoded frames are bit-identical to the inputs'.
    assert fps == 16 and np.array_equal(joined, parts)


def test_concat_reencodes_mismatched_inputs(tmp_path):
    a = write_video(tmp_path / "a.mp4", gradient_video(frames=4), fps=16)
    b = write_video(tmp_path / "b.mp4", gradient_video(frames=4, height=64, width=48), fps=8)
    out = concat_videos([a, b], tmp_path / "mixed.mp4")
    joined, fps = read_video(out)
    assert fps == 16 and joined.shape[1:] == (32, 48, 3)
    assert len(joined) == 4 + 8  # b resampled from 8 to 16 fps
    assert probe_video(out).codec == "h264"


def test_concat_errors(tmp_path):
    a = write_video(tmp_path / "a.mp4", gradient_video(frames=2))
    with pytest.raises(VideoError, match="no videos"):
        concat_videos([], tmp_path / "out.mp4")
    with pytest.raises(VideoError, match="nope.mp4: video file not found"):
        concat_videos([a, tmp_path / "nope.mp4"], tmp_path / "out.mp4")
    assert not (tmp_path / "out.mp4").exists()


def test_reads_start_ffmpeg_without_a_preexec_fn(tmp_path, monkeypatch):
    # A preexec_fn makes Python fork the whole process (page tables of every loaded model) for each read.
    from storymem.training.sources import read_clip

    path = write_video(tmp_path / "clip.mp4", gradient_video(frames=8), fps=8)
    seen = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        seen.append(kwargs.get("preexec_fn"))
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    assert read_video(path)[0].shape == (8, 32, 48, 3)
    assert read_clip(path, 0.0, 0.5)[0].shape[0] == 4
    assert len(seen) == 2 and seen == [None, None]


def test_an_explicit_ffmpeg_sigint_setting_is_kept():
    code = "import os, storymem.video; print(os.environ['IMAGEIO_FFMPEG_NO_PREVENT_SIGINT'])"
    for given, expected in (("0", "0"), (None, "1")):
        env = {k: v for k, v in os.environ.items() if k != "IMAGEIO_FFMPEG_NO_PREVENT_SIGINT"}
        if given is not None:
            env["IMAGEIO_FFMPEG_NO_PREVENT_SIGINT"] = given
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
