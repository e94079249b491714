#!/usr/bin/env python
"""Train a StoryMem (Memory-to-Video) LoRA for Wan2.2-I2V on clusters of single-shot clips.

    # 1. cache latents / text embeddings of captioned clips, grouped into clusters of related clips
    python train_lora.py prepare --clips data/clips --out data/prepared --base Wan-AI/Wan2.2-I2V-A14B-Diffusers

    # 2. train each expert on its side of the timestep boundary (one run each)
    accelerate launch train_lora.py train --config lora_configs/mi2v_rank128.json --data data/prepared \
        --base Wan-AI/Wan2.2-I2V-A14B-Diffusers --expert high --output runs/mi2v-high

``--base toy`` uses the small world's trained base shipped with the package, ``--base tiny`` random-weight tiny
components (CPU, seconds) to try the whole flow.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _add_prepare_args(p: argparse.ArgumentParser):
    src = p.add_argument_group("clips")
    src.add_argument("--clips", type=Path, help="folder of videos with sidecar captions (<name>.txt) and, "
                     "optionally, subject masks (<name>.mask.mp4)")
    src.add_argument("--manifest", type=Path,
                     help='JSONL manifest: {"file", "caption"[, "start", "end" (s), "group"]} per line')
    src.add_argument("--caption-ext", default=".txt", help="sidecar caption extension (default .txt)")
    src.add_argument("--split-shots", action="store_true",
                     help="cut videos into shots with PySceneDetect (pip install scenedetect[opencv])")
    src.add_argument("--shot-threshold", type=float, default=27.0, help="ContentDetector threshold")
    src.add_argument("--min-shot-seconds", type=float, default=1.0)
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="prepared dataset folder")
    out.add_argument("--base", default="toy", help='Wan2.2-I2V diffusers folder or hub id, "toy" (the small world\'s base) or "tiny" '
                          '(random weights, smoke runs)')
    out.add_argument("--height", type=int, default=480)
    out.add_argument("--width", type=int, default=832)
    out.add_argument("--num-frames", type=int, default=81, help="frames per clip, 4n+1")
    out.add_argument("--fps", type=float, default=16.0, help="clips are resampled to this rate")
    out.add_argument("--window", choices=["center", "start"], default="center",
                     help="which num_frames window of a longer clip to keep")
    out.add_argument("--memory-candidates", type=int, default=4,
                     help="frames per clip cached as memory images for other clips of its cluster")
    out.add_argument("--contexts", default="mi2v",
                     help="video conditions to cache, comma separated: mi2v, mm2v (or 'none')")
    out.add_argument("--cache-dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    out.add_argument("--shard-size", type=int, default=32, help="clips per safetensors shard")
    out.add_argument("--max-sequence-length", type=int, default=512)
    out.add_argument("--device", default=None, help="encoding device (default cuda if available)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    out.add_argument("--decode-workers", type=int, default=4, help="threads decoding videos (default 4)")
    out.add_argument("--encode-batch-size", type=int, default=1,
                     help="clips per encoder call (default 1; small sizes encode much faster in batches)")
    grp = p.add_argument_group("clusters")
    grp.add_argument("--cluster-size", type=int, default=16, help="target clips per cluster")
    grp.add_argument("--max-cluster-size", type=int, default=None, help="default 2 x cluster size")
    grp.add_argument("--embedder", choices=["clip", "pixel"], default="clip",
                     help="clip: open_clip image embeddings; pixel: thumbnails (no weights)")
    grp.add_argument("--clip-model", default="ViT-B-32")
    grp.add_argument("--clip-pretrained", default="openai", help="open_clip tag or checkpoint file")
    grp.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _add_train_args(p: argparse.ArgumentParser):
    from storymem.training import TrainConfig

    d = TrainConfig(lora_config="", data_dir="", output_dir="")
    io = p.add_argument_group("run")
    io.add_argument("--config", required=True, help="adapter config (lora_configs/*.json)")
    io.add_argument("--data", required=True, help="prepared dataset folder")
    io.add_argument("--base", required=True, help='Wan2.2-I2V diffusers folder or hub id, "toy" (the small world\'s base) or "tiny" '
                          '(random weights, smoke runs)')
    io.add_argument("--output", required=True, help="run folder (adapters, checkpoints, logs)")
    io.add_argument("--expert", choices=["high", "low", "all"], default=d.expert,
                    help="high: transformer (t >= boundary); low: transformer_2 (t < boundary); all: the "
                         "transformer of a single-expert base, every t")
    io.add_argument("--seed", type=int, default=d.seed)
    io.add_argument("--resume-from-checkpoint", "--resume", dest="resume", default=None,
                    help='"latest" or a checkpoint-N folder')
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--train-batch-size", type=int, default=d.train_batch_size, help="per device")
    opt.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps)
    opt.add_argument("--max-train-steps", type=int, default=d.max_train_steps)
    opt.add_argument("--max-train-minutes", type=float, default=None,
                     help="stop after this much wall time (saving a checkpoint and the adapter), e.g. to fit a "
                          "job's time limit; --resume latest continues")
    opt.add_argument("--learning-rate", type=float, default=d.learning_rate)
    opt.add_argument("--lr-scheduler", default=d.lr_scheduler,
                     help="linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup")
    opt.add_argument("--lr-warmup-steps", type=int, default=d.lr_warmup_steps)
    opt.add_argument("--lr-num-cycles", type=int, default=d.lr_num_cycles)
    opt.add_argument("--lr-power", type=float, default=d.lr_power)
    opt.add_argument("--adam-beta1", type=float, default=d.adam_beta1)
    opt.add_argument("--adam-beta2", type=float, default=d.adam_beta2)
    opt.add_argument("--adam-weight-decay", type=float, default=d.adam_weight_decay)
    opt.add_argument("--adam-epsilon", type=float, default=d.adam_epsilon)
    opt.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes AdamW8bit")
    opt.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    opt.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None,
                     help="default: accelerate's config, else bf16 on GPU and no on CPU")
    opt.add_argument("--no-gradient-checkpointing", action="store_true")
    opt.add_argument("--allow-tf32", action="store_true")
    opt.add_argument("--dataloader-num-workers", type=int, default=d.dataloader_num_workers)
    rec = p.add_argument_group("recipe")
    rec.add_argument("--flow-shift", type=float, default=d.flow_shift, help="Wan's timestep shift")
    rec.add_argument("--boundary-ratio", type=float, default=d.boundary_ratio)
    rec.add_argument("--min-memory", type=int, default=d.min_memory)
    rec.add_argument("--max-memory", type=int, default=d.max_memory)
    rec.add_argument("--mi2v-prob", type=float, default=None,
                     help="probability of also conditioning on the target's first frame (5 frames for mm2v); "
                          "default 0.5, 0 for m2v adapters")
    rec.add_argument("--loss-on-memory", action="store_true", help="include memory positions in the loss")
    rec.add_argument("--subject-loss-weight", type=float, default=d.subject_loss_weight,
                     help="weight of the latent cells the subject masks cover (prepared from a manifest with "
                          "'mask' videos), against 1 for the rest; default 1 (a plain mean)")
    rec.add_argument("--caption-dropout", type=float, default=d.caption_dropout,
                     help="probability of training a sample on the empty prompt")
    rec.add_argument("--no-memory-prob", type=float, default=d.no_memory_prob,
                     help="share of batches without memory frames, as a story's first shot (default 0)")
    rec.add_argument("--distractor-prob", type=float, default=d.distractor_prob,
                     help="share of samples with 3+ memory frames in which one frame comes from a clip of another "
                          "cluster, as a story's bank holds other characters' shots (default 0)")
    rec.add_argument("--preserve-base-weight", type=float, default=d.preserve_base_weight,
                     help="on batches without memory, add this weight times the squared distance to the base's "
                          "own prediction (adapter off), so the adapter leaves memory-free shots as the base "
                          "draws them; needs --no-memory-prob (default 0: off)")
    ck = p.add_argument_group("checkpoints and logs")
    ck.add_argument("--checkpointing-steps", type=int, default=d.checkpointing_steps)
    ck.add_argument("--checkpoints-total-limit", type=int, default=None)
    ck.add_argument("--report-to", default=d.report_to, help='"tensorboard" or "none"')
    ck.add_argument("--validation-steps", type=int, default=d.validation_steps,
                    help="render a validation story every N steps (0: never)")
    ck.add_argument("--validation-shots", type=int, default=d.validation_shots)
    ck.add_argument("--validation-inference-steps", type=int, default=d.validation_inference_steps)
    ck.add_argument("--validation-guidance-scale", type=float, default=d.validation_guidance_scale)
    ck.add_argument("--validation-other-expert", choices=["base", "none"], default=d.validation_other_expert,
                    help="base: render with the base's other expert; none: the trained expert alone")
    ck.add_argument("--validation-cluster", type=int, default=d.validation_cluster)
    dat = p.add_argument_group("data checks")
    dat.add_argument("--skip-bad-shards", action="store_true",
                     help="drop the clips of unreadable cache shards (counted) instead of stopping")
    dat.add_argument("--verify-data", action="store_true", help="check every shard's sha256 before training")


def run_prepare(args) -> int:
    from storymem.training import PrepareConfig, prepare_dataset

    contexts = () if args.contexts.strip().lower() == "none" else \
        tuple(c.strip() for c in args.contexts.split(",") if c.strip())
    config = PrepareConfig(
        output_dir=args.out, clips_dir=args.clips, manifest=args.manifest, base=args.base,
        caption_ext=args.caption_ext, height=args.height, width=args.width, num_frames=args.num_frames,
        fps=args.fps, window=args.window, memory_candidates=args.memory_candidates, cluster_size=args.cluster_size,
        max_cluster_size=args.max_cluster_size, embedder=args.embedder, clip_model=args.clip_model,
        clip_pretrained=args.clip_pretrained, split_shots=args.split_shots, shot_threshold=args.shot_threshold,
        min_shot_seconds=args.min_shot_seconds, contexts=contexts, cache_dtype=args.cache_dtype,
        shard_size=args.shard_size, max_sequence_length=args.max_sequence_length, device=args.device,
        seed=args.seed, overwrite=args.overwrite, decode_workers=args.decode_workers,
        encode_batch_size=args.encode_batch_size,
    )
    summary = prepare_dataset(config, progress=not args.no_progress)
    print(summary.format())
    return 0


def run_train(args) -> int:
    from storymem.training import TrainConfig, train

    config = TrainConfig(
        lora_config=args.config, data_dir=args.data, output_dir=args.output, base=args.base, expert=args.expert,
        seed=args.seed, train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_train_steps=args.max_train_steps,
        max_train_minutes=args.max_train_minutes,
        learning_rate=args.learning_rate, lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps,
        lr_num_cycles=args.lr_num_cycles, lr_power=args.lr_power, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_weight_decay=args.adam_weight_decay, adam_epsilon=args.adam_epsilon,
        use_8bit_adam=args.use_8bit_adam, max_grad_norm=args.max_grad_norm, mixed_precision=args.mixed_precision,
        gradient_checkpointing=not args.no_gradient_checkpointing, allow_tf32=args.allow_tf32,
        flow_shift=args.flow_shift, boundary_ratio=args.boundary_ratio, min_memory=args.min_memory,
        max_memory=args.max_memory, mi2v_prob=args.mi2v_prob, loss_on_memory=args.loss_on_memory,
        subject_loss_weight=args.subject_loss_weight,
        caption_dropout=args.caption_dropout, no_memory_prob=args.no_memory_prob,
        distractor_prob=args.distractor_prob, preserve_base_weight=args.preserve_base_weight,
        checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit, resume_from_checkpoint=args.resume,
        validation_steps=args.validation_steps, validation_shots=args.validation_shots,
        validation_inference_steps=args.validation_inference_steps,
        validation_guidance_scale=args.validation_guidance_scale,
        validation_other_expert=args.validation_other_expert, validation_cluster=args.validation_cluster,
        report_to=args.report_to, dataloader_num_workers=args.dataloader_num_workers,
        skip_bad_shards=args.skip_bad_shards, verify_data=args.verify_data,
    )
    result = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result.global_step} steps; adapter: {result.adapter_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train_lora.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare_args(sub.add_parser("prepare", help="cache latents and text embeddings of clustered clips"))
    _add_train_args(sub.add_parser("train", help="train an adapter on a prepared dataset"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Under `accelerate launch`, only the first process reports progress.
    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from storymem.lora import AdapterError
    from storymem.training.errors import DataError, TrainingConfigError

    try:
        return run_prepare(args) if args.command == "prepare" else run_train(args)
    except (DataError, TrainingConfigError, AdapterError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
