#!/usr/bin/env bash
# GPT-2-style language-model pre-training with fairseq-train, a checkpoint every SAVE_EVERY updates, all kept
# (checkpoint_{epoch}_{updates}.pt): the trajectory gpt/evaluate_lawa.py averages (Sanyal et al., 2024, "Early Weight
# Averaging meets High Learning Rates for LLM Pre-training").
#
#   bash gpt/train.sh                                      # PRESET=tiny: 2-layer GPT on the embedded PTB, CPU
#   PRESET=small DATA=runs/gpt/data-bin/openwebtext GPUS=4 bash gpt/train.sh     # the paper's GPT-2 small
#   LR=0.0006 SAVE_DIR=/tmp/low bash gpt/train.sh          # any variable below can be overridden
#   bash gpt/train.sh --max-valid-steps 50                 # extra arguments go to fairseq-train as they are
#
# The paper's recipe (their nanoGPT2-Experiments/train_ema.py): GPT-2 with learned positions, tied input/output
# embeddings, no dropout; AdamW β=(0.9, 0.95), weight decay 0.1, gradient clipping 1.0; linear warm-up over 2000
# iterations from 0 to the peak LR, then cosine decay to LR/10 at 70k iterations (the end of the run); peak LR
# 6e-3 / 3e-3 / 2e-3 for small / medium / large ("high"; nanoGPT's own is 6e-4); 16 sequences × 8 accumulation
# steps × 3 GPUs = 384 sequences of 1024 tokens per iteration; a checkpoint every 200 iterations.
# fairseq equivalents: --optimizer adam is decoupled AdamW (fairseq/optim/adam.py: p ← p − lr·wd·p before the
# Adam step, as torch.optim.AdamW); --lr-scheduler cosine --warmup-init-lr 0 --min-lr LR/10 with the decay
# horizon DECAY_UPDATES; fairseq's GPT-2 architectures are named one size off: GPT-2 small (12 × 768) is
# transformer_lm_gpt, medium (24 × 1024) transformer_lm_gpt2_small, large (36 × 1280) transformer_lm_gpt2_medium.
# Differences that remain (fairseq has no flag for them): biases in every linear layer and LayerNorm (the
# paper: bias=False), weight decay on all parameters (nanoGPT: matrices only), no 1/layer attention scaling.
# The tiny preset is the same command with 2 layers × 64, 64-token sequences, 8 per update, on PTB words.
#
# EMA: fairseq's own --store-ema is NOT used. In fairseq-fixed 0.12.3.1 it corrupts a transformer_lm: its EMA
# step skips the "decoder.version" key and reloads the EMA weights with load_state_dict, whose upgrade path
# then takes the model for a pre-2019 checkpoint and deletes the final LayerNorm (decoder.layer_norm); and the
# tied embedding, present under two keys, is decayed twice per step (d² instead of d). gpt/evaluate_lawa.py computes
# the EMA of the saved checkpoints instead (gpt/README.md, "EMA").
#
# Writes to SAVE_DIR: checkpoint_{epoch}_{updates}.pt (and checkpoint{epoch}.pt at an epoch's end, which holds
# the update checkpoint fairseq does not write there), checkpoint_last.pt (a rerun resumes from it),
# train.log (fairseq's JSON progress lines), args.json (command, versions, git sha, hardware), log.csv (tidy).
# Hardware/time: tiny, measured on 2 shared CPU cores: 0.07 s of CPU per update on one thread, ~85 s for the
# embedded 1200 updates (gpt/README.md, "Time"); small: 70k iterations of 0.4M tokens, days on 3 GPUs (the paper).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"                  # the venv's interpreter (bash setup.sh makes it)
FAIRSEQ_TRAIN="$(dirname "$PY")/fairseq-train"      # fairseq's trainer, installed beside PY
PRESET="${PRESET:-tiny}"                            # tiny (CPU, PTB) | small | medium | large (the paper's GPT-2s)
# pick TINY SMALL MEDIUM LARGE: the value for this preset
pick() { case "$PRESET" in tiny) echo "$1" ;; small) echo "$2" ;; medium) echo "$3" ;; large) echo "$4" ;;
    *) echo "train.sh: PRESET must be tiny, small, medium or large, got '$PRESET'" >&2; exit 2 ;; esac; }
pick x x x x > /dev/null                            # fail early on a bad PRESET

DATA="${DATA:-$REPO/runs/gpt/data-bin/$(pick ptb openwebtext openwebtext openwebtext)}"   # fairseq data
SAVE_DIR="${SAVE_DIR:-$REPO/runs/gpt/$PRESET}"      # checkpoints and logs of this run
LOG_CSV="${LOG_CSV:-$SAVE_DIR/log.csv}"             # the tidy per-update training log
SEED="${SEED:-1}"                                   # fairseq --seed: initialisation and data order
ARCH="$(pick transformer_lm_gpt transformer_lm_gpt transformer_lm_gpt2_small transformer_lm_gpt2_medium)"
MODEL_ARGS="${MODEL_ARGS-$(pick "--decoder-layers 2 --decoder-embed-dim 64 --decoder-ffn-embed-dim 256 \
--decoder-attention-heads 4" "" "" "")}"            # size changes to ARCH (tiny: 2 layers × 64, 0.7M parameters)
LR="${LR:-$(pick 0.03 0.006 0.003 0.002)}"          # peak learning rate (the paper's high ones; tiny: see README)
MIN_LR="${MIN_LR:-$(awk "BEGIN { print $LR / 10 }")}"   # the cosine's floor: LR/10, as nanoGPT and the paper
WARMUP="${WARMUP:-$(pick 50 2000 2000 2000)}"       # linear warm-up updates from 0 to LR
MAX_UPDATE="${MAX_UPDATE:-$(pick 1200 70000 70000 70000)}"   # updates to train
DECAY_UPDATES="${DECAY_UPDATES:-$(pick $((4 * MAX_UPDATE)) "$MAX_UPDATE" "$MAX_UPDATE" "$MAX_UPDATE")}"  # cosine
                                                    # reaches MIN_LR here; tiny: 4× the run, its early phase
SAVE_EVERY="${SAVE_EVERY:-$(pick 50 200 200 200)}"  # updates between checkpoints (the paper: 200 iterations)
TOKENS="${TOKENS:-$(pick 64 1024 1024 1024)}"       # tokens per sequence (--tokens-per-sample)
BATCH_SIZE="${BATCH_SIZE:-$(pick 8 16 16 16)}"      # sequences per worker per forward pass
SEQS_PER_UPDATE="${SEQS_PER_UPDATE:-$(pick 8 384 384 384)}"   # sequences per optimizer update, all workers
GPUS="${GPUS:-$(pick 0 1 1 1)}"                     # GPUs on this machine; 0: train on the CPU
CPU_THREADS="${CPU_THREADS:-1}"                     # CPU only: torch threads (a width-64 model gains nothing from 2)
VALIDATE="${VALIDATE:-$(pick 0 1 1 1)}"             # 1: fairseq validates at every checkpoint (log.csv val rows)
VALID_STEPS="${VALID_STEPS:-$(pick 0 200 200 200)}" # batches per such validation (0: all; the paper: 200)
LOG_INTERVAL="${LOG_INTERVAL:-$(pick 50 100 100 100)}"   # updates between fairseq's progress lines

die() { echo "train.sh: $*" >&2; exit 2; }

[ -x "$FAIRSEQ_TRAIN" ] || die "$FAIRSEQ_TRAIN not found: run 'bash $REPO/setup.sh' first (it installs fairseq)"
[ -f "$DATA/dict.txt" ] && [ -f "$DATA/train.idx" ] && [ -f "$DATA/valid.idx" ] \
    || die "$DATA has no fairseq data (dict.txt, train/valid .bin/.idx): run 'bash $REPO/gpt/reproduce_results.sh' \
(OPENWEBTEXT=/path for the paper's data) or set DATA=/folder"
[ $(( MAX_UPDATE % SAVE_EVERY )) -eq 0 ] || die "MAX_UPDATE=$MAX_UPDATE is not a multiple of SAVE_EVERY=$SAVE_EVERY"
[ "$DECAY_UPDATES" -gt "$WARMUP" ] || die "DECAY_UPDATES=$DECAY_UPDATES must exceed WARMUP=$WARMUP"
WORKERS=$(( GPUS > 0 ? GPUS : 1 ))
UPDATE_FREQ=$(( SEQS_PER_UPDATE / (BATCH_SIZE * WORKERS) ))
[ "$UPDATE_FREQ" -ge 1 ] && [ $(( UPDATE_FREQ * BATCH_SIZE * WORKERS )) -eq "$SEQS_PER_UPDATE" ] \
    || die "SEQS_PER_UPDATE=$SEQS_PER_UPDATE is not a multiple of BATCH_SIZE=$BATCH_SIZE × $WORKERS workers"

DEVICE_ARGS=(--cpu)
if [ "$GPUS" -gt 0 ]; then
    DEVICE_ARGS=(--fp16)   # the paper trained in bfloat16; --bf16 works on GPUs that have it
    [ "$GPUS" -gt 1 ] && DEVICE_ARGS+=(--distributed-world-size "$GPUS")
else
    export OMP_NUM_THREADS="$CPU_THREADS"
    # glibc hands the ~20 MB logits buffers back to the kernel after every batch and faults them in again:
    # half the CPU time went to the kernel before these two settings (gpt/README.md, "Time").
    export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-4294967296}" \
        MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-4294967296}"
fi
VALID_ARGS=(--disable-validation)
if [ "$VALIDATE" = 1 ]; then
    VALID_ARGS=(--skip-invalid-size-inputs-valid-test)
    [ "$VALID_STEPS" -gt 0 ] && VALID_ARGS+=(--max-valid-steps "$VALID_STEPS")
fi

mkdir -p "$SAVE_DIR"
# shellcheck disable=SC2206  # MODEL_ARGS is a list of flags on purpose
CMD=("$FAIRSEQ_TRAIN" "$DATA" --user-dir "$REPO/bert/lawa_plugin"
    --task language_modeling --arch "$ARCH" $MODEL_ARGS
    --decoder-learned-pos --share-decoder-input-output-embed --no-scale-embedding --dropout 0 --attention-dropout 0
    --sample-break-mode none --tokens-per-sample "$TOKENS"
    --optimizer adam --adam-betas "(0.9,0.95)" --adam-eps 1e-8 --weight-decay 0.1 --clip-norm 1.0
    --lr-scheduler cosine --lr "$LR" --min-lr "$MIN_LR" --warmup-updates "$WARMUP" --warmup-init-lr 0
    --lr-period-updates $(( DECAY_UPDATES - WARMUP )) --max-update "$MAX_UPDATE"
    --batch-size "$BATCH_SIZE" --update-freq "$UPDATE_FREQ" --seed "$SEED"
    --save-dir "$SAVE_DIR" --save-interval-updates "$SAVE_EVERY" --keep-interval-updates -1 --keep-last-epochs -1
    "${VALID_ARGS[@]}" --log-format json --log-interval "$LOG_INTERVAL"
    "${DEVICE_ARGS[@]}" "$@")

"$PY" - "$SAVE_DIR/args.json" "$PRESET" "${CMD[@]}" <<'PYTHON'
import json
import shlex
import sys
from importlib.metadata import version

import lawa_utils

out, preset, command = sys.argv[1], sys.argv[2], sys.argv[3:]
info = lawa_utils.run_info(command)
info.update(command=shlex.join(command), preset=preset)
info["versions"]["fairseq"] = version("fairseq-fixed")
with open(out, "w") as f:
    json.dump(info, f, indent=2)
PYTHON
echo "train.sh: ${CMD[*]}"
"${CMD[@]}" 2>&1 | tee -a "$SAVE_DIR/train.log"
"$PY" "$REPO/gpt/log_to_csv.py" "$SAVE_DIR/train.log" --out "$LOG_CSV" --seed "$SEED"
