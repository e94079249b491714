"""Multi-process training against one process at the same global batch, on the built-in tiny model.

Prepares a small clip set, trains the same adapter twice - one process with batch N, then N processes with
batch 1 each - and checks that the loss curves agree (mean over steps, within a tolerance: the processes see
different samples in a different order, so the curves are not identical) and that both adapters load into
StoryMemPipeline and change its output.

    python benchmarks/check_distributed_training.py --nproc 2                 # CPU, DDP over gloo
    python benchmarks/check_distributed_training.py --nproc 2 --fsdp          # GPUs, FSDP2 (configs/)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storymem.arguments import add_arguments, from_args, option  # noqa: E402


@dataclass
class CheckOptions:
    workdir: Path = option(Path("/tmp/storymem_distributed_check"), help="scratch folder (emptied first)")
    nproc: int = option(2, help="processes of the parallel run")
    fsdp: bool = option(False, help="FSDP2 through configs/accelerate_fsdp.yaml (GPUs)")
    steps: int = option(16, help="optimizer steps of each run")
    tolerance: float = option(0.05, help="largest relative difference of the mean losses")
    json: Optional[Path] = option(None, help="also write the results here")


COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 200, 60)}


def make_clips(root: Path, per_colour: int = 4):
    from storymem.video import write_video

    root.mkdir(parents=True, exist_ok=True)
    for name, colour in COLOURS.items():
        for k in range(per_colour):
            frames = np.zeros((14, 40, 48, 3), np.uint8)
            frames[:] = np.array(colour) // 4
            for t in range(14):
                frames[t, 12:28, 2 + 2 * t + k: 14 + 2 * t + k] = colour
            write_video(root / f"{name}{k}.mp4", frames, fps=16)
            (root / f"{name}{k}.txt").write_text(f"a {name} square moves right")


def run(cmd, env, log: Path):
    with open(log, "w") as fh:
        code = subprocess.call(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"command failed ({code}), see {log}: {' '.join(map(str, cmd))}")


def adapter_effect(adapter: Path) -> float:
    """Mean absolute change of the tiny pipeline's latents once the adapter is loaded."""
    import torch

    from storymem import StoryMemPipeline
    from storymem.builtin import builtin_components

    pipe = StoryMemPipeline(**builtin_components("tiny"))  # the weights `--base tiny` trained on
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red square moves right", memory_images=[np.full((32, 32, 3), 128, np.uint8)],
                  height=32, width=32, num_frames=9, num_inference_steps=2, output_type="latent")
    base = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe.load_storymem_lora(adapter)
    tuned = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    return float((tuned - base).abs().mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, CheckOptions)
    args = from_args(CheckOptions, parser.parse_args())

    from storymem.lora import StoryMemLoraConfig

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    make_clips(work / "clips")
    StoryMemLoraConfig(rank=8, alpha=8.0, dropout=0.0).save(work / "adapter.json")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    py = sys.executable
    run([py, "train_lora.py", "prepare", "--clips", work / "clips", "--out", work / "prepared", "--base", "tiny",
         "--height", "32", "--width", "32", "--num-frames", "9", "--embedder", "pixel", "--cluster-size", "4",
         "--memory-candidates", "3", "--contexts", "mi2v", "--cache-dtype", "float32", "--no-progress"],
        env, work / "prepare.log")

    common = ["train_lora.py", "train", "--config", work / "adapter.json", "--data", work / "prepared", "--base",
              "tiny", "--expert", "high", "--max-train-steps", str(args.steps), "--learning-rate", "1e-3",
              "--report-to", "none", "--checkpointing-steps", "1000", "--seed", "0"]
    if args.fsdp:
        launch = [py, "-m", "accelerate.commands.launch", "--config_file", REPO / "configs" / "accelerate_fsdp.yaml"]
        single = [py, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "bf16"]
        parallel = [*launch, "--num_processes", str(args.nproc)]
        precision = ["--mixed-precision", "bf16"]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        single = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
        parallel = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)]
        precision = ["--mixed-precision", "no"]
    run([*single, *common, *precision, "--train-batch-size", str(args.nproc), "--output", work / "single"],
        env, work / "single.log")
    run([*parallel, *common, *precision, "--train-batch-size", "1", "--output", work / "parallel"],
        env, work / "parallel.log")

    one = json.loads((work / "single" / "train_summary.json").read_text())
    many = json.loads((work / "parallel" / "train_summary.json").read_text())
    mean_one, mean_many = statistics.mean(one["losses"]), statistics.mean(many["losses"])
    rel = abs(mean_many - mean_one) / mean_one
    effects = {name: adapter_effect(work / name / "adapter") for name in ("single", "parallel")}
    result = dict(nproc=args.nproc, fsdp=args.fsdp, steps=args.steps, distributed_type=many["distributed_type"],
                  processes=many["num_processes"], mean_loss_single=mean_one, mean_loss_parallel=mean_many,
                  relative_difference=rel, adapter_effect=effects,
                  losses_single=one["losses"], losses_parallel=many["losses"])
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("losses")}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    ok = many["num_processes"] == args.nproc and rel <= args.tolerance and all(e > 0 for e in effects.values())
    print("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
