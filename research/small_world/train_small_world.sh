#!/usr/bin/env bash
# The small world end to end: held-out stories, the base video model, clustered clips, the M2V adapters,
# the experiment. Every stage is a command a user runs on real data too; the stages resume.
#
#   bash research/small_world/train_small_world.sh RUN_DIR STAGE [STAGE ...]
#
# It runs from any folder (RUN_DIR is relative to it): the repository is put on PYTHONPATH for the research
# package, and train_lora.py and lora_configs/ are taken from the repository.
#
# Stages, in order: stories vae base [refine continue decoder assemble] clips prepare lora experiment.
# Environment: DEVICE (cuda), WORKERS (16), VAE_MINUTES (5), VAE2_MINUTES (2.5), BASE_MINUTES (4),
# REFINE_VAE_MINUTES (2.7), REFINE_MINUTES (4.6), CONTINUE_MINUTES (7.5), CONTINUE_SEED (3), CONTINUE_BATCH (128),
# CONTINUE_LR (3e-4), CONTINUE_WARMUP (200), CONTINUE_GPUS (1; N: torchrun, N processes, each rendering its own
# clips with WORKERS processes and drawing CONTINUE_BATCH of them a step), CONTINUE_CUT_PROB (unset: single shots;
# p: a share of the round's clips cut once to the same character elsewhere, see
# research.small_world.base_clips.cut_clip), CONTINUE_CUT_CAPTIONS
# (probabilities of the caption modes first,named,returns,same before a cut; default 0.1,0.05,0.1,0.75),
# CONTINUE_MEMORY_PROB (unset: none; p: a share of the steps in the M2V memory layout, with frames of the clip's
# character from other clips), CONTINUE_MEMORY_DISTRACTOR (unset: none; p: a share of the memory steps with
# another character's frame among the references, the caption naming the right one), CONTINUE_REFERENTIAL
# (unset: none; p: on image-to-video and memory steps, the share of captions that say only "the same
# character ..."), CONTINUE_FREEZE_TEXT (set: the text encoder stays as it is),
# DECODER_MINUTES (6.5),
# LORA_MINUTES (4), LORA_BATCH (16), LORA_WORKERS (2), LORA_LR (3e-4), LORA_WARMUP (100), LORA_STEPS (100000: the
# step limit; LORA_MINUTES the time limit),
# LORA_CHECKPOINT_STEPS (100000), LORA_RESUME (set: continue both adapters from their latest checkpoints),
# LORA_CAPTION_DROPOUT and LORA_MI2V_PROB (train_lora.py's defaults when unset),
# LORA_SUBJECT_WEIGHT (unset: a plain loss; w: the character's latent cells weigh w, needs CLIP_MASKS),
# LORA_NO_MEMORY_PROB, LORA_DISTRACTOR_PROB, LORA_PRESERVE_WEIGHT (train_lora.py's --no-memory-prob,
# --distractor-prob, --preserve-base-weight; off when unset),
# CLIP_IDENTITIES (160), CLIPS_PER_IDENTITY (12), CLIP_REFERENTIAL (0.25: the share of clip captions that refer to the
# character instead of naming it; half of those say only "the same character"), CLIP_SCENES (unset: a new scene per
# clip; k: each character's clips share k scenes), CLIP_MASKS (set: also write where the character is, for
# LORA_SUBJECT_WEIGHT), ENCODE_BATCH (64), PYTHON (python),
# VAE_INIT.
#
# base gives a first model in minutes; refine, continue (run it again with another CONTINUE_SEED for more) and
# decoder train it further, each stage a process of under 10 minutes that starts from the last one's folder;
# assemble makes RUN/final/base, which the later stages use when it exists. The shipped weights: stories vae base
# refine, continue twice (seeds 3 and 4, 7.6 and 7.5 minutes; decoder ran beside the second), continue three more
# times with CONTINUE_BATCH=256 CONTINUE_LR=1.2e-4 CONTINUE_WARMUP=100 CONTINUE_MINUTES=7.4 (seeds 5, 6, 7: a lower
# learning rate than the first rounds, whose loss rose again at 3e-4) and four more the same way (seeds 8-11; seed
# 10 for 6.7 minutes); two rounds with cuts (CONTINUE_CUT_PROB=0.6 CONTINUE_LR=2e-4, 9.5 and 11.75 minutes), one
# more on four GPUs (CONTINUE_GPUS=4 CONTINUE_SEED=14 CONTINUE_CUT_PROB=0.5 CONTINUE_LR=2e-4 CONTINUE_MINUTES=9) and
# one in the memory layout on two (CONTINUE_GPUS=2 CONTINUE_SEED=15 CONTINUE_CUT_PROB=0.25 CONTINUE_LR=2e-4
# CONTINUE_MEMORY_PROB=0.5 CONTINUE_MEMORY_DISTRACTOR=0.3 CONTINUE_REFERENTIAL=0.5 CONTINUE_FREEZE_TEXT=1
# CONTINUE_MINUTES=7) and one more in it on one GPU (CONTINUE_SEED=16 CONTINUE_CUT_PROB=0.25 CONTINUE_LR=2e-4
# CONTINUE_MEMORY_PROB=0.7 CONTINUE_MEMORY_DISTRACTOR=0.3 CONTINUE_REFERENTIAL=0.8 CONTINUE_FREEZE_TEXT=1
# CONTINUE_MINUTES=10.5; batch 256 in these five, warm-up 100 in the last three), assemble, then clips prepare lora
# with CLIP_IDENTITIES=1800 CLIPS_PER_IDENTITY=4 CLIP_REFERENTIAL=0.75 CLIP_MASKS=1 LORA_BATCH=32 LORA_WORKERS=4
# LORA_LR=1e-4 LORA_WARMUP=200 LORA_STEPS=3000 LORA_MINUTES=13 LORA_CAPTION_DROPOUT=0.3 LORA_MI2V_PROB=0.3
# LORA_SUBJECT_WEIGHT=30 LORA_DISTRACTOR_PROB=0.5 (about 7 minutes on an H200 that ran other jobs beside it). A
# decoder-only VAE leaves the latents as they were, so continue rounds and
# the decoder can run in any order; assemble puts the newest transformer and the tuned decoder together.
set -euo pipefail

RUN=${1:?usage: train_small_world.sh RUN_DIR STAGE [STAGE ...]}
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-16}
PY=${PYTHON:-python}

latest_base() {  # the newest trained base: continue rounds, then refine, then the first one
  local newest
  newest=$(ls -d "$RUN"/continue_run_*/base 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$newest" ]; then echo "$newest"
  elif [ -d "$RUN/refine_run/base" ]; then echo "$RUN/refine_run/base"
  else echo "$RUN/base_run/base"; fi
}
final_base() { if [ -d "$RUN/final/base" ]; then echo "$RUN/final/base"; else echo "$RUN/base_run/base"; fi; }

for stage in "$@"; do
  echo "== $stage"
  case $stage in
    stories)  # 20 held-out stories (6-8 shots); their characters stay out of every training set
      $PY -c "from research.small_world.datasets import make_story_set
make_story_set('$RUN/stories', count=20, seed=2026, num_shots=6, max_shots=8)" ;;
    vae)  # VAE phase 1: short windows (first frame + one causal chunk), the spatial code
      $PY -m research.small_world.train_base --out "$RUN/vae_run" --vae-only --device "$DEVICE" \
        --workers "$WORKERS" \
        --exclude-stories "$RUN/stories" --vae-minutes "${VAE_MINUTES:-5}" --num-clips 8000 --vae-steps 100000 \
        --vae-window 5 --vae-batch-size 48 --vae-lr 1e-3 ;;
    base)  # VAE phase 2 on whole clips (the temporal cache's steady state), then text encoder and transformer
      $PY -m research.small_world.train_base --out "$RUN/base_run" \
        --vae-init "${VAE_INIT:-$RUN/vae_run/stages/vae}" \
        --device "$DEVICE" --workers "$WORKERS" --exclude-stories "$RUN/stories" --num-clips 8000 \
        --vae-window 17 --vae-batch-size 16 --vae-lr 3e-4 --vae-steps 100000 --vae-minutes "${VAE2_MINUTES:-2.5}" \
        --steps 100000 --lr 5e-4 --minutes "${BASE_MINUTES:-4}" ;;
    refine)  # the VAE again on whole clips (pattern shades now weighted as character pixels), then the
      # transformer on its new latents, with twice the batch
      $PY -m research.small_world.train_base --out "$RUN/refine_run" --init "$RUN/base_run/base" --retrain-vae \
        --device "$DEVICE" --workers "$WORKERS" --exclude-stories "$RUN/stories" --num-clips 12000 --seed 2 \
        --vae-window 17 --vae-batch-size 32 --vae-lr 4e-4 --vae-steps 100000 --vae-minutes "${REFINE_VAE_MINUTES:-2.7}" \
        --steps 100000 --batch-size 128 --lr 4e-4 --warmup-steps 200 --minutes "${REFINE_MINUTES:-4.6}" ;;
    continue)  # text encoder and transformer only, on fresh clips (another seed each round); the VAE is kept
      seed=${CONTINUE_SEED:-3}
      launch="$PY -m research.small_world.train_base"
      if [ "${CONTINUE_GPUS:-1}" -gt 1 ]; then  # data-parallel: each process its own GPU, clips and batch
        launch="$PY -m torch.distributed.run --standalone --nproc-per-node $CONTINUE_GPUS"
        launch="$launch -m research.small_world.train_base"
      fi
      $launch --out "$RUN/continue_run_$seed" --init "$(latest_base)" \
        --device "$DEVICE" --workers "$WORKERS" --exclude-stories "$RUN/stories" --num-clips 16000 --seed "$seed" \
        --steps 100000 --batch-size "${CONTINUE_BATCH:-128}" --lr "${CONTINUE_LR:-3e-4}" \
        --warmup-steps "${CONTINUE_WARMUP:-200}" --minutes "${CONTINUE_MINUTES:-7.5}" \
        ${CONTINUE_CUT_PROB:+--cut-prob $CONTINUE_CUT_PROB} \
        ${CONTINUE_CUT_CAPTIONS:+--cut-caption-mode-probs $CONTINUE_CUT_CAPTIONS} \
        ${CONTINUE_MEMORY_PROB:+--memory-prob $CONTINUE_MEMORY_PROB} \
        ${CONTINUE_MEMORY_DISTRACTOR:+--memory-distractor-prob $CONTINUE_MEMORY_DISTRACTOR} \
        ${CONTINUE_REFERENTIAL:+--referential-prob $CONTINUE_REFERENTIAL} \
        ${CONTINUE_FREEZE_TEXT:+--freeze-text-encoder} ;;
    decoder)  # the VAE decoder only: the latent space, and every transformer trained on it, stay valid
      $PY -m research.small_world.train_base --out "$RUN/decoder_run" --init "$(latest_base)" --retrain-vae \
        --vae-decoder-only --vae-only --device "$DEVICE" --workers "$WORKERS" --exclude-stories "$RUN/stories" \
        --num-clips 6000 --seed 13 --vae-window 17 --vae-batch-size 16 --vae-lr 2e-4 --vae-steps 100000 \
        --vae-minutes "${DECODER_MINUTES:-6.5}" ;;
    assemble)  # RUN/final/base: the latest base with the tuned decoder when there is one (float16)
      $PY -c "import shutil, sys, torch
from pathlib import Path
from diffusers import AutoencoderKLWan
src, final, tuned = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
shutil.rmtree(final, ignore_errors=True)
shutil.copytree(src, final)
if (tuned / 'config.json').is_file():
    vae = AutoencoderKLWan.from_pretrained(tuned, torch_dtype=torch.float32)
    shutil.rmtree(final / 'vae')
    vae.to(torch.float16).save_pretrained(final / 'vae', safe_serialization=True)
print('assembled', final, 'from', src, '+ decoder' if (tuned / 'config.json').is_file() else '')" \
        "$(latest_base)" "$RUN/final/base" "$RUN/decoder_run/stages/vae" ;;
    clips)  # clustered single-shot clips: 12 clips of each of 160 characters, one cluster per character
      $PY -c "from research.small_world.datasets import make_clip_dataset
from research.small_world.train_base import story_identities
make_clip_dataset('$RUN/clips', num_identities=${CLIP_IDENTITIES:-160}, clips_per_identity=${CLIPS_PER_IDENTITY:-12},
                  num_frames=17, height=64, width=64, seed=1, referential_prob=${CLIP_REFERENTIAL:-0.25},
                  exclude=story_identities('$RUN/stories'), workers=$WORKERS, scenes_per_identity=${CLIP_SCENES:-None},
                  subject_masks=bool('${CLIP_MASKS:-}'))" ;;
    prepare)
      $PY "$REPO/train_lora.py" prepare --manifest "$RUN/clips/manifest.jsonl" --out "$RUN/prepared" \
        --base "$(final_base)" \
        --height 64 --width 64 --num-frames 17 --embedder pixel --memory-candidates 4 --contexts mi2v \
        --device "$DEVICE" --decode-workers "$WORKERS" --encode-batch-size "${ENCODE_BATCH:-64}" --no-progress ;;
    lora)  # the adapter with negative memory RoPE, and one with contiguous RoPE for the ablation, side by side
      for rope in negative contiguous; do
        config="$REPO/lora_configs/toy_m2v.json"
        [ "$rope" = contiguous ] && config="$REPO/lora_configs/toy_m2v_contiguous.json"
        $PY "$REPO/train_lora.py" train --config "$config" --data "$RUN/prepared" --base "$(final_base)" \
          --output "$RUN/lora_$rope" --expert all --flow-shift 3 --train-batch-size "${LORA_BATCH:-16}" --learning-rate "${LORA_LR:-3e-4}" \
          --lr-scheduler constant_with_warmup --lr-warmup-steps "${LORA_WARMUP:-100}" --max-train-steps "${LORA_STEPS:-100000}" \
          --max-train-minutes "${LORA_MINUTES:-4}" --checkpointing-steps "${LORA_CHECKPOINT_STEPS:-100000}" --no-gradient-checkpointing \
          --mixed-precision bf16 --dataloader-num-workers "${LORA_WORKERS:-2}" ${LORA_RESUME:+--resume latest} \
          ${LORA_CAPTION_DROPOUT:+--caption-dropout $LORA_CAPTION_DROPOUT} ${LORA_MI2V_PROB:+--mi2v-prob $LORA_MI2V_PROB} \
          ${LORA_SUBJECT_WEIGHT:+--subject-loss-weight $LORA_SUBJECT_WEIGHT} \
          ${LORA_NO_MEMORY_PROB:+--no-memory-prob $LORA_NO_MEMORY_PROB} \
          ${LORA_DISTRACTOR_PROB:+--distractor-prob $LORA_DISTRACTOR_PROB} \
          ${LORA_PRESERVE_WEIGHT:+--preserve-base-weight $LORA_PRESERVE_WEIGHT} \
          >> "$RUN/lora_$rope.log" 2>&1 &
      done
      wait
      tail -n 3 "$RUN"/lora_*.log ;;
    experiment)
      $PY -m research.small_world.experiment --base "$(final_base)" --adapter "$RUN/lora_negative/adapter" \
        --contiguous-adapter "$RUN/lora_contiguous/adapter" --stories "$RUN/stories" --out "$RUN/experiment" \
        --device "$DEVICE" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
