"""Reliability of `prepare` and `train`: interrupted saves and runs, earlier runs in the output folder, every
option checked for its real range, adapter configs, defaults of the built-in bases, weights that cannot be had
offline, non-finite training. Tiny base, few steps."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from storymem.lora import StoryMemLoraConfig
from storymem.training import TrainConfig, train
from storymem.training.checkpoints import CHECKPOINT_MARKER, resolve_checkpoint
from storymem.training.cli import main_prepare, main_train
from storymem.training.errors import DataError, TrainingDivergedError
from storymem.video import write_video

ROOT = Path(__file__).resolve().parents[1]
SIZE, FRAMES = 32, 9


def _clip(colour, k, n=14, size=40):
    frames = np.zeros((n, size, size, 3), np.uint8)
    frames[:] = np.array(colour) // 4
    for t in range(n):
        frames[t, 12:28, 2 + t + k:14 + t + k] = colour
    return frames


def _write_clips(root: Path, n: int, size: int = 40) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, colour in {"red": (220, 40, 40), "blue": (40, 60, 220)}.items():
        for k in range(3):
            write_video(root / f"{name}{k}.mp4", _clip(colour, k, n=n, size=size), fps=16)
            (root / f"{name}{k}.txt").write_text(f"a {name} square moves right")
    return root


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    return _write_clips(tmp_path_factory.mktemp("clips"), n=14)


@pytest.fixture(scope="module")
def prepared(clips_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    assert main_prepare(["--clips", str(clips_dir), "--out", str(out), "--base", "tiny", "--height", str(SIZE),
                         "--width", str(SIZE), "--num-frames", str(FRAMES), "--embedder", "pixel",
                         "--cluster-size", "3", "--memory-candidates", "3", "--cache-dtype", "float32",
                         "--no-progress", "--overwrite"]) == 0
    return out


@pytest.fixture(scope="module")
def lora_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "adapter.json"
    StoryMemLoraConfig(rank=4, alpha=4.0, dropout=0.0, conditioning="mi2v").save(path)
    return path


def _config(prepared, lora_config_file, out, **kw):
    args = dict(lora_config=str(lora_config_file), data_dir=str(prepared), output_dir=str(out), base="tiny",
                report_to="none", learning_rate=1e-3, checkpointing_steps=2, max_train_steps=4,
                gradient_checkpointing=False)
    args.update(kw)
    return TrainConfig(**args)


def _train_argv(prepared, lora_config_file, out, *extra):
    return ["--config", str(lora_config_file), "--data", str(prepared), "--output", str(out), "--base", "tiny",
            "--report-to", "none", "--learning-rate", "1e-3", "--no-gradient-checkpointing", *extra]


def _one_line_error(code, capsys, expected_code=2) -> str:
    """The error line of a command that failed: the one line it printed besides progress bars, its last."""
    err = capsys.readouterr().err
    assert code == expected_code, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("steps:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and err.endswith(lines[0] + "\n"), err
    return lines[0] + "\n"


# ---------------------------------------------------------------------------------------------- checkpoints
class _Killed(BaseException):
    """Stands for a kill -9: nothing after it runs (not even ``except Exception`` handlers)."""


def test_a_save_cut_short_leaves_no_checkpoint_and_resume_latest_takes_the_last_complete_one(
        prepared, lora_config_file, tmp_path, monkeypatch):
    full = train(_config(prepared, lora_config_file, tmp_path / "full"))
    import storymem.training.checkpoints as checkpoints

    original, calls = checkpoints.save_storymem_lora, []

    def dies_in_the_second_save(folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:  # the adapter of checkpoint-4: write part of it, then die
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "high_noise.safetensors").write_bytes(b"\0" * 100)
            raise _Killed
        return original(folder, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save_storymem_lora", dies_in_the_second_save)
    run = tmp_path / "run"
    with pytest.raises(_Killed):
        train(_config(prepared, lora_config_file, run))
    monkeypatch.setattr(checkpoints, "save_storymem_lora", original)
    # The partial save is a .tmp folder, never checkpoint-4.
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4.tmp"]
    assert (run / "checkpoint-2" / CHECKPOINT_MARKER).is_file()
    resumed = train(_config(prepared, lora_config_file, run, resume_from_checkpoint="latest"))
    assert resumed.global_step == 4 and resumed.losses == full.losses[2:]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # .tmp cleared


def test_resume_latest_skips_incomplete_checkpoints_naming_them(prepared, lora_config_file, tmp_path, caplog):
    run = tmp_path / "run"
    full = train(_config(prepared, lora_config_file, run, max_train_steps=2))
    # An incomplete newer checkpoint, as a save killed before its marker leaves one (older versions, a copy).
    broken = run / "checkpoint-6"
    broken.mkdir()
    (broken / "optimizer.bin").write_bytes(b"\0" * 10)
    assert resolve_checkpoint(run, "latest") == run / "checkpoint-2"
    assert "checkpoint-6" in caplog.text and "incomplete" in caplog.text
    with pytest.raises(DataError, match="checkpoint-6: incomplete checkpoint"):
        resolve_checkpoint(run, str(broken))
    resumed = train(_config(prepared, lora_config_file, run, max_train_steps=3, resume_from_checkpoint="latest"))
    assert resumed.global_step == 3 and len(resumed.losses) == 1 and len(full.losses) == 2


def test_a_checkpoint_that_cannot_be_loaded_is_one_line(prepared, lora_config_file, tmp_path, capsys):
    run = tmp_path / "run"
    train(_config(prepared, lora_config_file, run, max_train_steps=2))
    (run / "checkpoint-2" / "optimizer.bin").write_bytes(b"not a torch file")
    err = _one_line_error(main_train(_train_argv(prepared, lora_config_file, run, "--max-train-steps", "3",
                                                 "--resume", "latest")), capsys)
    assert "checkpoint-2: cannot be resumed" in err


def _complete_checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*")
                  if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name) and (p / CHECKPOINT_MARKER).is_file())


def _start_training(prepared, lora_config_file, run, *extra) -> tuple[subprocess.Popen, list[str]]:
    """`train_lora.py train` in a subprocess, with a thread collecting its stderr."""
    argv = [sys.executable, str(ROOT / "train_lora.py"), "train",
            *_train_argv(prepared, lora_config_file, run, *extra)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    chunks: list[str] = []

    def read():
        for chunk in iter(lambda: proc.stderr.read(64), ""):
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.reader = reader
    return proc, chunks


def _finish(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    """Wait for the subprocess; its stdout (its stderr is in the chunks the reader collected)."""
    proc.wait(timeout=timeout)
    proc.reader.join(timeout=10)
    return proc.stdout.read()


def _wait_for(condition, proc, chunks, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("training ended or stalled before the condition: " + "".join(chunks)[-2000:])
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_a_checkpoint_and_resume_latest_continues(prepared, lora_config_file, tmp_path, signum,
                                                                      capsys, caplog):
    run = tmp_path / "run"
    proc, chunks = _start_training(prepared, lora_config_file, run, "--max-train-steps", "100000",
                                   "--checkpointing-steps", "100000")
    # The progress bar has counted a step: send the signal in the middle of the run.
    _wait_for(lambda: re.search(r"\b[1-9]\d*/100000\b", "".join(chunks)), proc, chunks)
    proc.send_signal(signum)
    _finish(proc)
    err = "".join(chunks)
    assert proc.returncode == 128 + signum, err[-2000:]
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(rf"stopped by {signal.Signals(signum).name} at step (\d+): saved (\S+); continue with the "
                         r"same command and --resume latest", last)
    assert match, last
    step = int(match.group(1))
    assert Path(match.group(2)) == run / f"checkpoint-{step}" and _complete_checkpoints(run) == [step]
    assert "Traceback" not in err and not (run / "adapter").exists()
    if signum != signal.SIGTERM:
        return
    # The same command with --resume latest continues from the saved step.
    caplog.set_level(logging.INFO, logger="storymem.training")
    code = main_train(_train_argv(prepared, lora_config_file, run, "--max-train-steps", str(step + 2),
                                  "--resume", "latest"))
    assert code == 0 and f"trained {step + 2} steps" in capsys.readouterr().out
    assert f"resumed from {run / f'checkpoint-{step}'} (step {step})" in caplog.text


def test_kill_9_in_the_middle_of_checkpointing_leaves_only_complete_checkpoints(prepared, lora_config_file,
                                                                             tmp_path):
    run = tmp_path / "run"
    proc, chunks = _start_training(prepared, lora_config_file, run, "--max-train-steps", "100000",
                                   "--checkpointing-steps", "1", "--checkpoints-total-limit", "2")
    _wait_for(lambda: len(_complete_checkpoints(run)) >= 2, proc, chunks)
    proc.kill()  # SIGKILL: no handler runs; most of a step here is spent saving
    _finish(proc)
    saved = _complete_checkpoints(run)
    every = sorted(p.name for p in run.glob("checkpoint-*"))
    assert all(name.endswith(".tmp") or name.endswith(".old") or int(name.split("-")[1]) in saved for name in every)
    resumed = train(_config(prepared, lora_config_file, run, max_train_steps=saved[-1] + 1,
                            resume_from_checkpoint="latest", checkpointing_steps=1, checkpoints_total_limit=2))
    assert resumed.global_step == saved[-1] + 1 and len(resumed.losses) == 1


def test_sigterm_before_the_first_step_exits_143_in_one_line(monkeypatch, tmp_path, capsys):
    import storymem.training.trainer as trainer

    def terminated_while_loading(config):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(trainer, "train", terminated_while_loading)
    code = main_train(["--config", "c.json", "--data", str(tmp_path), "--output", str(tmp_path / "r")])
    assert code == 143 and capsys.readouterr().err == "stopped by SIGTERM; nothing saved\n"


# ---------------------------------------------------------------------------------------------- earlier runs
def test_an_earlier_run_in_the_output_is_refused_resumed_or_overwritten(prepared, lora_config_file, tmp_path,
                                                                        capsys):
    run = tmp_path / "run"
    assert main_train(_train_argv(prepared, lora_config_file, run, "--max-train-steps", "4",
                                  "--checkpointing-steps", "1")) == 0
    (run / "notes.txt").write_text("mine")
    capsys.readouterr()
    err = _one_line_error(main_train(_train_argv(prepared, lora_config_file, run, "--max-train-steps", "2")), capsys)
    assert f"error: --output: {run} holds an earlier run (checkpoint-1, checkpoint-2" in err
    assert "--resume latest" in err and "--overwrite" in err
    err = _one_line_error(main_train(_train_argv(prepared, lora_config_file, run, "--overwrite", "--resume",
                                                 "latest")), capsys)
    assert err.startswith("error: --overwrite: ")
    # --overwrite starts clean: the old checkpoints go, the user's own files stay.
    assert main_train(_train_argv(prepared, lora_config_file, run, "--max-train-steps", "2", "--overwrite")) == 0
    assert sorted(p.name for p in run.iterdir() if p.name != ".storymem.lock") == [
        "adapter", "checkpoint-2", "notes.txt", "train_config.json", "train_summary.json"]
    assert json.loads((run / "train_summary.json").read_text())["global_step"] == 2
    # A run with nothing to resume from is not silently replaced by --resume latest either.
    import shutil

    shutil.rmtree(run / "checkpoint-2")
    err = _one_line_error(main_train(_train_argv(prepared, lora_config_file, run, "--resume", "latest")), capsys)
    assert err.startswith("error: --resume: ") and "no complete checkpoint to continue from" in err
    assert "--overwrite" in err
    err = _one_line_error(main_train(_train_argv(prepared, lora_config_file, run)), capsys)
    assert "it has no complete checkpoint to continue from: start clean with --overwrite" in err
    # Settings and logs alone (a run stopped before its first checkpoint) are no results: a new run starts.
    for name in ("adapter", "train_summary.json"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    assert main_train(_train_argv(prepared, lora_config_file, run, "--max-train-steps", "1")) == 0


def test_a_run_folder_in_use_is_refused_naming_its_holder(prepared, lora_config_file, tmp_path, capsys):
    from storymem.locking import FolderLock

    run = tmp_path / "run"
    with FolderLock(run, owner="storymem train", purpose="training (high)"):
        err = _one_line_error(main_train(_train_argv(prepared, lora_config_file, run, "--max-train-steps", "1")),
                              capsys)
    assert f"{run} is in use by storymem train (pid {os.getpid()}" in err
    assert main_train(_train_argv(prepared, lora_config_file, run, "--max-train-steps", "1")) == 0


# ---------------------------------------------------------------------------------------------- options
TRAIN_BAD_VALUES = {
    "--seed": ["-1", str(2 ** 40)],
    "--train-batch-size": ["0", "-1"],
    "--gradient-accumulation-steps": ["0", "-2"],
    "--max-train-steps": ["0", "-5", "nan", "1.5"],
    "--max-train-minutes": ["0", "-1", "nan", "inf"],
    "--learning-rate": ["0", "-1", "nan", "inf", "1000"],
    "--lr-warmup-steps": ["-1"],
    "--lr-num-cycles": ["0"],
    "--lr-power": ["0", "-1", "nan"],
    "--adam-beta1": ["-0.1", "1", "nan"],
    "--adam-beta2": ["1.5", "inf"],
    "--adam-weight-decay": ["-1", "inf", "nan"],
    "--adam-epsilon": ["0", "1", "nan"],
    "--max-grad-norm": ["-1", "nan", "inf"],
    "--dataloader-num-workers": ["-1", "100000"],
    "--flow-shift": ["0", "-3", "inf", "nan"],
    "--boundary-ratio": ["0", "1", "nan"],
    "--min-memory": ["-1"],
    "--max-memory": ["0", "-1"],
    "--mi2v-prob": ["-0.1", "1.5", "nan"],
    "--caption-dropout": ["2", "nan"],
    "--no-memory-prob": ["-1", "inf"],
    "--distractor-prob": ["1.01", "nan"],
    "--subject-loss-weight": ["0", "-1", "nan", "inf"],
    "--preserve-base-weight": ["-1", "nan"],
    "--checkpointing-steps": ["0", "-1"],
    "--checkpoints-total-limit": ["0", "-1"],
    "--validation-steps": ["-1"],
    "--validation-shots": ["0"],
    "--validation-inference-steps": ["0", "100000"],
    "--validation-guidance-scale": ["-1", "nan"],
    "--validation-cluster": ["-1"],
}


@pytest.mark.parametrize("flag,value", [(f, v) for f, values in TRAIN_BAD_VALUES.items() for v in values])
def test_every_train_option_is_checked_for_its_range(flag, value, lora_config_file, tmp_path, capsys):
    argv = ["--config", str(lora_config_file), "--data", str(tmp_path / "data"), "--output", str(tmp_path / "r"),
            "--base", "tiny", "--report-to", "none", flag, value]
    err = _one_line_error(main_train(argv), capsys)
    assert flag in err and value in err, err
    assert not (tmp_path / "r").exists()


def test_train_paths_and_model_limits_are_checked(prepared, lora_config_file, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    err = _one_line_error(main_train(_train_argv(prepared, lora_config_file, a_file)), capsys)
    assert err == f"error: --output: {a_file} is a file, not a folder\n"
    err = _one_line_error(main_train(_train_argv(prepared, lora_config_file, prepared)), capsys)
    assert err.startswith("error: --output: is the prepared dataset folder")
    err = _one_line_error(main_train(_train_argv(prepared, lora_config_file, a_file / "run")), capsys)
    assert err.startswith(f"error: --output: cannot write to {a_file / 'run'} (")
    # More memory frames than the tiny base's rope table (64 positions at stride 5) can place.
    err = _one_line_error(main_train(_train_argv(prepared, lora_config_file, tmp_path / "r", "--max-memory", "13")),
                          capsys)
    assert err.startswith("error: --max-memory: 13 memory frames at rope stride 5 exceed the rope table (64)")
    # Settings bounded by the data (6 clips in 2 clusters) or by what accelerate knows.
    for flag, value, expected in [("--train-batch-size", "7", "7 is more than the 6 clips of"),
                                  ("--validation-cluster", "2", "has 2 clusters (0 to 1), got 2"),
                                  ("--report-to", "nowhere", "must be none or one of")]:
        extra = ["--validation-steps", "1"] if flag == "--validation-cluster" else []
        err = _one_line_error(main_train(_train_argv(prepared, lora_config_file, tmp_path / "r", flag, value,
                                                     *extra)), capsys)
        assert err.startswith(f"error: {flag}: ") and expected in err, err
    assert not (tmp_path / "r").exists()


def _prepare_argv(clips, out, *extra):
    return ["--clips", str(clips), "--out", str(out), "--base", "tiny", "--embedder", "pixel", "--no-progress",
            *extra]


PREPARE_BAD_VALUES = {
    "--height": ["0", "-16", "40", "nan", "99999984"],
    "--width": ["0", "30", "16384"],
    "--num-frames": ["0", "-3", "8", "100001"],
    "--fps": ["0", "-1", "nan", "inf", "1e9"],
    "--memory-candidates": ["0", "1000"],
    "--cluster-size": ["1", "0"],
    "--max-cluster-size": ["1"],
    "--seed": ["-1", str(2 ** 40)],
    "--shard-size": ["0"],
    "--max-sequence-length": ["0", "100000"],
    "--decode-workers": ["0", "100000"],
    "--encode-batch-size": ["0", "-1"],
    "--shot-threshold": ["0", "-1", "nan", "1000"],
    "--min-shot-seconds": ["-1", "nan", "inf"],
    "--caption-ext": ["", "txt"],
}


@pytest.mark.parametrize("flag,value", [(f, v) for f, values in PREPARE_BAD_VALUES.items() for v in values])
def test_every_prepare_option_is_checked_for_its_range(flag, value, tmp_path, capsys):
    # An empty clips folder: a value that slipped through would end in "no videos found" instead.
    (tmp_path / "clips").mkdir()
    err = _one_line_error(main_prepare(_prepare_argv(tmp_path / "clips", tmp_path / "o", flag, value)), capsys)
    assert flag in err, err


def test_prepare_paths_are_checked(tmp_path, capsys):
    (tmp_path / "clips").mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    err = _one_line_error(main_prepare(_prepare_argv(tmp_path / "clips", a_file)), capsys)
    assert err == f"error: --out: {a_file} is a file, not a folder\n"
    err = _one_line_error(main_prepare(_prepare_argv(tmp_path / "nope", tmp_path / "o")), capsys)
    assert err == f"error: --clips: {tmp_path / 'nope'}: folder not found\n"
    _write_clips(tmp_path / "clips", n=14)
    err = _one_line_error(main_prepare(_prepare_argv(tmp_path / "clips", a_file / "o")), capsys)
    assert err.startswith(f"error: --out: cannot create {a_file / 'o'} (")
    # One writer per folder: a prepare into a folder in use is refused, naming the holder.
    from storymem.locking import FolderLock

    with FolderLock(tmp_path / "busy", owner="storymem prepare", purpose="prepare"):
        err = _one_line_error(main_prepare(_prepare_argv(tmp_path / "clips", tmp_path / "busy")), capsys)
    assert f"{tmp_path / 'busy'} is in use by storymem prepare (pid {os.getpid()}" in err


ADAPTER_BAD_FIELDS = [
    ("rank", "abc"), ("rank", 0), ("rank", -4), ("rank", 1.5), ("rank", True), ("rank", None),
    ("alpha", "x"), ("alpha", 0), ("alpha", float("nan")), ("dropout", 1.0), ("dropout", -0.1),
    ("use_rslora", "yes"), ("target_modules", []), ("target_modules", "attn1.to_q"), ("target_modules", [1]),
    ("memory_rope", "sideways"), ("memory_rope_stride", 0), ("memory_rope_stride", "5"), ("conditioning", "t2v"),
    ("experts", ["transformer_3"]), ("experts", "transformer"), ("base_model", 3), ("ranks", 4),
]


@pytest.mark.parametrize("field,value", ADAPTER_BAD_FIELDS)
def test_adapter_config_fields_are_checked_naming_the_file_and_field(field, value, tmp_path, capsys):
    data = StoryMemLoraConfig(rank=4, alpha=4.0).to_dict()
    data[field] = value
    path = tmp_path / "adapter.json"
    path.write_text(json.dumps(data))
    argv = ["--config", str(path), "--data", str(tmp_path / "d"), "--output", str(tmp_path / "r"), "--base", "tiny"]
    err = _one_line_error(main_train(argv), capsys)
    assert err.startswith(f"error: {path}: ") and repr(field) in err, err


def test_a_refused_flag_is_one_line_naming_it(capsys):
    code = main_train(["--config", "c.json", "--data", "d", "--output", "o", "--max-train-steps", "nan"])
    assert _one_line_error(code, capsys) == ("error: argument --max-train-steps: invalid int value: 'nan' "
                                             "(see storymem train --help)\n")


# ---------------------------------------------------------------------------------------------- prepare defaults
def test_prepare_sizes_follow_the_built_in_base_and_too_short_names_the_frames(tmp_path, capsys):
    from storymem.builtin import BUILTIN_SAMPLING

    clips = _write_clips(tmp_path / "clips", n=20, size=64)
    out = tmp_path / "prepared"
    assert main_prepare(["--clips", str(clips), "--out", str(out), "--base", "tiny", "--cluster-size", "3",
                         "--encode-batch-size", "6", "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert (index["height"], index["width"], index["num_frames"]) == (
        BUILTIN_SAMPLING["height"], BUILTIN_SAMPLING["width"], BUILTIN_SAMPLING["frames"])
    assert index["embedder"].startswith("PixelEmbedder")  # the built-in bases' embedder: no weights to download
    capsys.readouterr()
    short = _write_clips(tmp_path / "short", n=10, size=64)
    err = _one_line_error(main_prepare(["--clips", str(short), "--out", str(tmp_path / "o"), "--base", "toy",
                                        "--no-progress"]), capsys)
    assert "nothing to train on" in err and "6 too short" in err
    assert "10 frames at 16 fps, need 17 (--num-frames)" in err


def test_prepare_with_clip_weights_not_downloaded_says_which_and_how(clips_dir, tmp_path, capsys):
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache("timm/vit_base_patch32_clip_224.openai",
                                                         "open_clip_pytorch_model.bin"), str):
        pytest.skip("the open_clip weights are in this machine's cache")
    err = _one_line_error(main_prepare(["--clips", str(clips_dir), "--out", str(tmp_path / "o"), "--base", "tiny",
                                        "--embedder", "clip", "--no-progress"]), capsys)
    assert err.startswith("error: --embedder: the open_clip weights ViT-B-32 / openai are not downloaded")
    assert "open_clip.create_model('ViT-B-32', pretrained='openai')" in err and "--embedder pixel" in err
    assert "config.json" not in err


def test_train_on_the_default_base_offline_names_it_and_how_to_get_it(prepared, lora_config_file, tmp_path, capsys):
    argv = ["--config", str(lora_config_file), "--data", str(prepared), "--output", str(tmp_path / "r"),
            "--report-to", "none"]
    err = _one_line_error(main_train(argv), capsys)
    assert err.startswith("error: Wan-AI/Wan2.2-I2V-A14B-Diffusers: the base model is not in the local Hugging "
                          "Face cache")
    assert "hf download Wan-AI/Wan2.2-I2V-A14B-Diffusers" in err and "config.json" not in err


# ---------------------------------------------------------------------------------------------- non-finite
def test_a_loss_that_becomes_nan_stops_the_run_before_anything_is_saved(prepared, lora_config_file, tmp_path,
                                                                      monkeypatch, capsys):
    import storymem.training.trainer as trainer

    original, calls = trainer.flow_matching_loss, []

    def nan_from_the_third_step(model, batch, **kw):
        loss, info = original(model, batch, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= 3 else loss), info

    monkeypatch.setattr(trainer, "flow_matching_loss", nan_from_the_third_step)
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"the loss became nan at step 3; nothing from this step on"):
        train(_config(prepared, lora_config_file, run))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"] and not (run / "adapter").exists()
    calls.clear()
    err = _one_line_error(main_train(_train_argv(prepared, lora_config_file, run, "--max-train-steps", "4",
                                                 "--checkpointing-steps", "2", "--overwrite")), capsys)
    assert f"the last checkpoint, {run / 'checkpoint-2'}, is intact" in err and "--learning-rate" in err


def test_adapter_weights_that_stop_being_finite_are_never_saved(prepared, lora_config_file, tmp_path, monkeypatch):
    import storymem.training.trainer as trainer

    original = trainer._log_step

    def poison_at_step_2(run, progress, global_step, mean_loss, info):
        if global_step == 2:
            lora = next(p for p in run.transformer.parameters() if p.requires_grad)
            with torch.no_grad():
                lora.view(-1)[0] = float("inf")
        return original(run, progress, global_step, mean_loss, info)

    monkeypatch.setattr(trainer, "_log_step", poison_at_step_2)
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match="the adapter weights stopped being finite numbers at step 2"):
        train(_config(prepared, lora_config_file, run))
    assert not list(run.glob("checkpoint-*")) and not (run / "adapter").exists()
