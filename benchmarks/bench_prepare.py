"""`train_lora.py prepare` throughput on toy clips: how long each pass takes, how it scales with the number of
decoding threads, and what starting ffmpeg by fork instead of vfork costs a process that holds a lot of memory.

    python benchmarks/bench_prepare.py                                   # 60 characters x 4 clips, CPU
    python benchmarks/bench_prepare.py --identities 200 --masks --workers 1,14 --device cuda
    python benchmarks/bench_prepare.py --ballast-gb 6 --compare-fork     # fork vs vfork, 6 GB resident

Renders the clips once (the toy world, 64x64, 17 frames; with ``--masks`` a subject mask video per clip too),
then prepares them with each ``--workers`` count against the shipped toy base (``--embedder pixel``, mi2v
contexts, 4 memory candidates) and prints, per count: the scan pass (decode, check, embed), the encode pass
(decode again, VAE and text encoder), the whole run and clips per second. Every run must produce the same
shards (their sha256), which the script checks.

Each video read starts an ffmpeg process. imageio-ffmpeg asks for a preexec_fn, so Python forks, copying the
page tables of the whole process; `storymem.video` turns that off (IMAGEIO_FFMPEG_NO_PREVENT_SIGINT=1), so Python
vforks. ``--ballast-gb N`` first fills N GB of memory, as loaded models would; ``--compare-fork`` runs every count
both ways (the variable at 0, then at 1) and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: the small world's clips

from research.small_world.datasets import make_clip_dataset  # noqa: E402
from storymem.training import PrepareConfig, prepare_dataset  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=60)
    ap.add_argument("--clips-per-identity", type=int, default=4)
    ap.add_argument("--masks", action="store_true", help="also write and read subject masks")
    ap.add_argument("--workers", default="1,4", help="comma-separated decoding thread counts to compare")
    ap.add_argument("--render-workers", type=int, default=2, help="processes rendering the clips")
    ap.add_argument("--encode-batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ballast-gb", type=float, default=0.0, help="memory to fill first, as loaded models would")
    ap.add_argument("--compare-fork", action="store_true", help="also run with ffmpeg started by fork")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = ap.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]

    root = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        t0 = time.perf_counter()
        make_clip_dataset(root / "clips", num_identities=args.identities, clips_per_identity=args.clips_per_identity,
                          num_frames=17, height=64, width=64, seed=1, referential_prob=0.75,
                          workers=args.render_workers, subject_masks=args.masks)
        print(f"rendered {args.identities * args.clips_per_identity} clips in {time.perf_counter() - t0:.1f}s")
        ballast = bytearray(int(args.ballast_gb * 2**30)) if args.ballast_gb else None
        if ballast is not None:
            ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page so it is resident
        modes = ("fork", "vfork") if args.compare_fork else ("vfork",)
        rows, digests = [], set()
        for workers in counts:
            for mode in modes:
                os.environ["IMAGEIO_FFMPEG_NO_PREVENT_SIGINT"] = "0" if mode == "fork" else "1"
                out = root / f"prepared_{workers}_{mode}"
                config = PrepareConfig(manifest=root / "clips" / "manifest.jsonl", output_dir=out,
                                       base="toy", height=64, width=64, num_frames=17,
                                       embedder="pixel", memory_candidates=4, contexts=("mi2v",), device=args.device,
                                       decode_workers=workers, encode_batch_size=args.encode_batch_size)
                summary = prepare_dataset(config, progress=False)
                index = json.loads((out / "index.json").read_text())
                digests.add(tuple(s["sha256"] for s in index["shards"]))
                row = {"workers": workers, "ffmpeg_start": mode, "clips": summary.num_clips,
                       "scan_s": round(summary.scan_seconds, 2), "encode_s": round(summary.encode_seconds, 2),
                       "total_s": round(summary.seconds, 2),
                       "clips_per_s": round(summary.num_clips / summary.seconds, 2)}
                rows.append(row)
                print(f"workers {workers:3d}, {mode:5s}: scan {row['scan_s']:7.2f}s  encode {row['encode_s']:7.2f}s  "
                      f"total {row['total_s']:7.2f}s  {row['clips_per_s']:7.2f} clips/s", flush=True)
                shutil.rmtree(out)
            if args.compare_fork:
                fork, vfork = rows[-2]["total_s"], rows[-1]["total_s"]
                print(f"workers {workers:3d}: vfork is {fork / vfork:.2f}x as fast as fork")
        del ballast
        same = len(digests) == 1
        print("identical shards across runs:", same)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "runs": rows,
                                            "identical": same}, indent=1))
        return 0 if same else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
