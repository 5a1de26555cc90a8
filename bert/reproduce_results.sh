#!/usr/bin/env bash
# LAWA for masked-LM pre-training, end to end: data -> RoBERTa with a checkpoint every epoch -> the (E, k)
# sweep of the masked-LM loss of θ_E^LAWA (the k latest checkpoints averaged) and of the plain checkpoints.
# Results: $OUT/results.csv (sweep) and $OUT/log.csv (training log), both in the repository's tidy schema.
#
#   bash bert/reproduce_results.sh           # embedded: tiny RoBERTa on Penn Treebank, on the CPU
#   WIKITEXT=/data/wikitext-103-raw GPT2_BPE=/data/gpt2_bpe GPUS=4 bash bert/reproduce_results.sh   # the paper
#   CKPT_DIR=/data/lawa-roberta DATA=/data/data-bin/wikitext-103 bash bert/reproduce_results.sh     # sweep only
#
# Embedded: the first 2000 PTB training sentences, 40 epochs of a 2-layer, width-64 RoBERTa (train.sh's tiny
# preset: 16 sequences of ≤128 tokens per update, LR 2e-3 decaying over 3× the run, warm-up 115 updates:
# the same ~5.5 epochs as 200 updates were for 3500 sentences), the sweep over k = 2, 4, 6, 8 at every fourth
# end epoch on the first 1000 validation sentences. Sized after the pilots in bert/README.md so that the
# baseline is noisy and overfits late in the run, the regime in which the paper finds LAWA ahead; lean so
# that reproduce_all.sh fits three seeds (PTB_TRAIN_LINES=3500 WARMUP=200 SWEEP_EPOCHS=2:40:2 is the earlier
# single-seed size). SEED=N picks fairseq's seed (reproduce_all.sh runs 0, 1, 2, each into its own OUT).
# Hardware: 2 CPU cores, no GPU. Times: README ("Time").
# Paper: 4× RTX 3090, ~10 min per epoch, 200 epochs (the paper); the sweep reads each 1.6 GB checkpoint once.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$REPO/.venv/bin/python"                    # the interpreter set up by setup.sh
OUT="${OUT:-$REPO/runs/bert}"                  # everything this script writes goes below this folder
WIKITEXT="${WIKITEXT:-}"                       # wikitext-103-raw folder: the paper's data and recipe
GPT2_BPE="${GPT2_BPE:-$WIKITEXT}"              # folder with GPT-2's encoder.json, vocab.bpe (and dict.txt)
CKPT_DIR="${CKPT_DIR:-}"                       # an existing trajectory (checkpoint{E}.pt): only the sweep
DATA="${DATA:-}"                               # fairseq data for CKPT_DIR (default: the path in its checkpoints)
EMBEDDED="$([ -z "$WIKITEXT$CKPT_DIR" ] && echo 1 || echo 0)"   # 1: the embedded PTB run, on the CPU
PRESET="$([ -n "$WIKITEXT" ] && echo paper || echo tiny)"   # train.sh preset: the paper's with WIKITEXT
GPUS="$([ "$PRESET" = paper ] && echo "${GPUS:-1}" || echo 0)"   # paper: GPUs on this node; embedded: CPU
EPOCHS="${EPOCHS:-$([ "$PRESET" = paper ] && echo 200 || echo 40)}"   # training epochs
PTB_TRAIN_LINES="${PTB_TRAIN_LINES:-2000}"     # embedded: training sentences (1/20 of PTB: overfits)
SEED="${SEED:-1}"                              # fairseq --seed: init, dropout, data order, masking
PTB_VALID_LINES="${PTB_VALID_LINES:-1000}"     # embedded: validation sentences (~22k tokens)
KS="${KS:-$([ "$EMBEDDED" = 1 ] && echo 2,4,6,8 || echo 2,4,6,8,10)}"   # LAWA window sizes k swept
TRAIN_BATCHES="${TRAIN_BATCHES:-$([ "$EMBEDDED" = 1 ] && echo 8 || echo 50)}"   # batches for train loss
EVAL_BATCH_SIZE="${EVAL_BATCH_SIZE:-16}"       # sequences per evaluation batch (fairseq-validate --batch-size)
SWEEP_EPOCHS="${SWEEP_EPOCHS:-$([ "$EMBEDDED" = 1 ] && echo "4:$EPOCHS:4" || echo "")}"   # end epochs swept (empty: all)
WARMUP="${WARMUP:-$([ "$EMBEDDED" = 1 ] && echo 115 || echo "")}"   # warm-up updates (empty: train.sh's preset)

START=$(date +%s)
bash "$REPO/setup.sh"
mkdir -p "$OUT"

if [ -z "$CKPT_DIR" ]; then
    DATA="$OUT/data-bin"
    WIKITEXT="$WIKITEXT" GPT2_BPE="$GPT2_BPE" DATA_DIR="$DATA" PTB_TRAIN_LINES="$PTB_TRAIN_LINES" \
        PTB_VALID_LINES="$PTB_VALID_LINES" bash "$REPO/bert/prepare_data.sh"
    CKPT_DIR="$OUT/checkpoints"
    if [ -f "$CKPT_DIR/checkpoint$EPOCHS.pt" ]; then
        echo "reproduce_results.sh: $CKPT_DIR already holds the $EPOCHS epochs; skipping training"
    else
        PRESET="$PRESET" GPUS="$GPUS" DATA="$DATA" SAVE_DIR="$CKPT_DIR" LOG_CSV="$OUT/log.csv" \
            MAX_EPOCH="$EPOCHS" SEED="$SEED" WARMUP="$WARMUP" bash "$REPO/bert/train.sh"
    fi
elif [ -n "$WIKITEXT" ] && [ -z "$DATA" ]; then   # the published trajectory, with data prepared here
    DATA="$OUT/data-bin"
    WIKITEXT="$WIKITEXT" GPT2_BPE="$GPT2_BPE" DATA_DIR="$DATA" bash "$REPO/bert/prepare_data.sh"
fi

# CPU: one torch thread, as train.sh's CPU_THREADS (the tiny model gains nothing from a second one).
[ "$EMBEDDED" = 0 ] || export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$PY" "$REPO/bert/evaluate_lawa.py" ${DATA:+"$DATA"} --ckpt-dir "$CKPT_DIR" --ks "$KS" \
    ${SWEEP_EPOCHS:+--epochs "$SWEEP_EPOCHS"} --train-batches "$TRAIN_BATCHES" --batch-size "$EVAL_BATCH_SIZE" --out "$OUT/results.csv"
echo "reproduce_results.sh: done in $(( $(date +%s) - START )) s -> $OUT/results.csv, $OUT/log.csv"
