#!/usr/bin/env bash
# The small world end to end: held-out stories, the base video model, clustered clips, the M2V adapters,
# the experiment. Every stage is a command a user runs on real data too; the stages resume.
#
#   bash scripts/train_small_world.sh RUN_DIR STAGE [STAGE ...]
#
# Stages, in order: stories vae base clips prepare lora experiment. Environment: DEVICE (cuda), WORKERS (16),
# VAE_MINUTES (5), VAE2_MINUTES (2.5), BASE_MINUTES (4), LORA_MINUTES (4), PYTHON (python), VAE_INIT.
set -euo pipefail

RUN=${1:?usage: train_small_world.sh RUN_DIR STAGE [STAGE ...]}
shift
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-16}
PY=${PYTHON:-python}
BASE=$RUN/base_run/base

for stage in "$@"; do
  echo "== $stage"
  case $stage in
    stories)  # 20 held-out stories (6-8 shots); their characters stay out of every training set
      $PY -c "from storymem.toy.datasets import make_story_set
make_story_set('$RUN/stories', count=20, seed=2026, num_shots=6, max_shots=8)" ;;
    vae)  # VAE phase 1: short windows (first frame + one causal chunk), the spatial code
      $PY -m storymem.toy.train_base --out "$RUN/vae_run" --vae-only --device "$DEVICE" --workers "$WORKERS" \
        --exclude-stories "$RUN/stories" --vae-minutes "${VAE_MINUTES:-5}" --num-clips 8000 --vae-steps 100000 \
        --vae-window 5 --vae-batch-size 48 --vae-lr 1e-3 ;;
    base)  # VAE phase 2 on whole clips (the temporal cache's steady state), then text encoder and transformer
      $PY -m storymem.toy.train_base --out "$RUN/base_run" --vae-init "${VAE_INIT:-$RUN/vae_run/stages/vae}" \
        --device "$DEVICE" --workers "$WORKERS" --exclude-stories "$RUN/stories" --num-clips 8000 \
        --vae-window 17 --vae-batch-size 16 --vae-lr 3e-4 --vae-steps 100000 --vae-minutes "${VAE2_MINUTES:-2.5}" \
        --steps 100000 --lr 5e-4 --minutes "${BASE_MINUTES:-4}" ;;
    clips)  # clustered single-shot clips: 12 clips of each of 160 characters, one cluster per character
      $PY -c "from storymem.toy.datasets import make_clip_dataset
from storymem.toy.train_base import story_identities
make_clip_dataset('$RUN/clips', num_identities=160, clips_per_identity=12, num_frames=17, height=64, width=64,
                  seed=1, exclude=story_identities('$RUN/stories'), workers=$WORKERS)" ;;
    prepare)
      $PY train_lora.py prepare --manifest "$RUN/clips/manifest.jsonl" --out "$RUN/prepared" --base "$BASE" \
        --height 64 --width 64 --num-frames 17 --embedder pixel --memory-candidates 4 --contexts mi2v \
        --device "$DEVICE" --decode-workers "$WORKERS" --encode-batch-size 64 --no-progress ;;
    lora)  # the adapter with negative memory RoPE, and one with contiguous RoPE for the ablation, side by side
      for rope in negative contiguous; do
        config=lora_configs/toy_m2v.json
        [ "$rope" = contiguous ] && config=lora_configs/toy_m2v_contiguous.json
        $PY train_lora.py train --config "$config" --data "$RUN/prepared" --base "$BASE" \
          --output "$RUN/lora_$rope" --expert all --flow-shift 3 --train-batch-size 16 --learning-rate 3e-4 \
          --lr-scheduler constant_with_warmup --lr-warmup-steps 100 --max-train-steps 100000 \
          --max-train-minutes "${LORA_MINUTES:-4}" --checkpointing-steps 100000 --no-gradient-checkpointing \
          --mixed-precision bf16 --dataloader-num-workers 2 > "$RUN/lora_$rope.log" 2>&1 &
      done
      wait
      tail -n 3 "$RUN"/lora_*.log ;;
    experiment)
      $PY benchmarks/toy_experiment.py --base "$BASE" --adapter "$RUN/lora_negative/adapter" \
        --contiguous-adapter "$RUN/lora_contiguous/adapter" --stories "$RUN/stories" --out "$RUN/experiment" \
        --device "$DEVICE" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
