#!/usr/bin/env bash
# Early Weight Averaging (Sanyal et al., 2024) end to end: GPT pre-training at a high and at a conventional peak
# learning rate, a checkpoint every SAVE_EVERY updates, then the sweep of the validation loss of the plain
# checkpoints, LAWA over consecutive and over spaced checkpoints, EMA and SWA of the checkpoints; a figure and a
# table. Results in the repository's tidy schema, loss in bits: $OUT/lr-{high,low}/results.csv (sweep),
# $OUT/lr-{high,low}/log.csv (training log); $OUT/figures/gpt_ewa.png and $OUT/table.md.
#
#   bash gpt/reproduce_results.sh                              # embedded: tiny GPT on Penn Treebank, CPU
#   OUT=/tmp/gpt bash gpt/reproduce_results.sh                 # elsewhere (default OUT: runs/gpt)
#   OPENWEBTEXT=/data/nanoGPT/data/openwebtext GPUS=4 bash gpt/reproduce_results.sh   # the paper's GPT-2 small
#   OPENWEBTEXT=... PRESET=medium GPUS=4 bash gpt/reproduce_results.sh    # GPT-2 medium at 3e-3 and 3e-4
#
# Embedded: PTB words, a 2-layer width-64 GPT (gpt/train.sh's tiny preset), 1200 updates of 8 × 64 tokens at
# peak LR 3e-2 and 3e-3 (warm-up 50, cosine over 4× the run: the early, high-LR phase the paper studies), a
# checkpoint every 50 updates; the sweep scores every cell on 500 validation sentences. On the CPU the two
# runs train side by side, one thread each. See gpt/README.md for the numbers and what held.
# Hardware: 2 CPU cores, no GPU. Measured (gpt/README.md, "Time"): 346 s of CPU time (user + sys of every step,
# bash's `times`), 609 s wall while other jobs kept the load average at 7-12; ~3-3.5 min on an idle machine
# (the two runs go side by side). The script prints both numbers at its end. A rerun with all done: 24 s.
# Paper: OpenWebText, GPT-2 small/medium/large for 70k iterations on 3 GPUs (their torchrun); OPENWEBTEXT is
# prepared by the user, in any of the three forms gpt/prepare_data.sh describes.
# A rerun reuses what is done: the data, finished training runs (a killed one resumes from its last
# checkpoint), sweep cells already in results.csv.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$REPO/.venv/bin/python"                    # the interpreter set up by setup.sh
OUT="${OUT:-$REPO/runs/gpt}"                   # everything this script writes goes below this folder
OPENWEBTEXT="${OPENWEBTEXT:-}"                 # the user's OpenWebText (gpt/prepare_data.sh); empty: embedded PTB
PRESET="${PRESET:-$([ -n "$OPENWEBTEXT" ] && echo small || echo tiny)}"   # gpt/train.sh preset
GPUS="$([ "$PRESET" = tiny ] && echo 0 || echo "${GPUS:-1}")"   # GPUs for the paper's presets; embedded: CPU
paper() { if [ "$PRESET" = tiny ]; then echo "$2"; else echo "$1"; fi; }   # paper() PAPER_VALUE TINY_VALUE
case "$PRESET" in                              # the paper's high peak LRs; the conventional ones are 10× lower
    tiny) HIGH=0.03 ;; small) HIGH=0.006 ;; medium) HIGH=0.003 ;; large) HIGH=0.002 ;;
    *) echo "reproduce_results.sh: PRESET must be tiny, small, medium or large" >&2; exit 2 ;;
esac
LR_HIGH="${LR_HIGH:-$HIGH}"                    # the high peak LR (GPT-2 small: 6e-3)
LR_LOW="${LR_LOW:-$(awk "BEGIN { print $LR_HIGH / 10 }")}"   # the conventional one (GPT-2 small: nanoGPT's 6e-4)
MAX_UPDATE="${MAX_UPDATE:-$(paper 70000 1200)}"   # updates per run
SAVE_EVERY="${SAVE_EVERY:-$(paper 200 50)}"    # updates between checkpoints, N
KS="${KS:-$(paper 2,5,10 2,4)}"                # LAWA window sizes k (checkpoints); the paper's script: 5
SPACINGS="${SPACINGS:-$(paper 1,5,10 1,4)}"    # spacings s between averaged checkpoints (checkpoints)
EMA_DECAYS="${EMA_DECAYS:-0.5,0.75}"           # EMA decays per checkpoint (k = 1/(1-d) = 2, 4)
SWA_START="${SWA_START:-$(( MAX_UPDATE / 4 / SAVE_EVERY * SAVE_EVERY ))}"   # SWA averages the checkpoints
                                               # from this update on (default: a quarter into the run)
EVAL_EVERY="${EVAL_EVERY:-$(paper 2000 "$SAVE_EVERY")}"   # updates between the sweep's end checkpoints
VALID_BATCHES="${VALID_BATCHES:-$(paper 50 0)}"   # validation batches per cell (0: all)
PTB_VALID_LINES="${PTB_VALID_LINES:-500}"      # embedded: validation sentences the sweep scores
PLOT_K="${PLOT_K:-$(paper 5 2)}"               # the figure's LAWA window k (checkpoints)
PLOT_SPACING="${PLOT_SPACING:-$(paper 5 4)}"   # the figure's spacing s for spaced LAWA (checkpoints)
PLOT_EMA_K="${PLOT_EMA_K:-2}"                  # the figure's EMA, by k = 1/(1-decay)
PARALLEL="${PARALLEL:-$([ "$GPUS" -eq 0 ] && echo 1 || echo 0)}"   # 1: train/sweep both LRs at once (CPU)

START=$(date +%s)
bash "$REPO/setup.sh"
mkdir -p "$OUT"
DATA="$OUT/data-bin"
OPENWEBTEXT="$OPENWEBTEXT" DATA_DIR="$DATA" PTB_VALID_LINES="$PTB_VALID_LINES" bash "$REPO/gpt/prepare_data.sh"

# The tiny model's 20 MB logits are freed and faulted in again every batch unless glibc keeps them
# (half of the CPU time went to the kernel without this; gpt/README.md, "Time"); one thread per process.
[ "$GPUS" -gt 0 ] || export OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296

# one_run NAME LR: train (unless finished) and sweep one learning rate into $OUT/lr-NAME.
one_run() {
    local name="$1" lr="$2" dir="$OUT/lr-$1"
    mkdir -p "$dir"
    if compgen -G "$dir/checkpoints/checkpoint_*_$MAX_UPDATE.pt" > /dev/null; then
        echo "reproduce_results.sh: lr-$name already trained ($MAX_UPDATE updates)"
    else
        PRESET="$PRESET" GPUS="$GPUS" DATA="$DATA" SAVE_DIR="$dir/checkpoints" LOG_CSV="$dir/log.csv" LR="$lr" \
            MAX_UPDATE="$MAX_UPDATE" SAVE_EVERY="$SAVE_EVERY" bash "$REPO/gpt/train.sh" > "$dir/train.out" 2>&1 \
            || { tail -20 "$dir/train.out" >&2; echo "reproduce_results.sh: training lr-$name failed" >&2; return 1; }
    fi
    "$PY" "$REPO/gpt/evaluate_lawa.py" "$DATA" --ckpt-dir "$dir/checkpoints" --ks "$KS" --spacings "$SPACINGS" \
        --ema-decays "$EMA_DECAYS" --swa-starts "$SWA_START" --updates "$EVAL_EVERY:$MAX_UPDATE:$EVAL_EVERY" \
        --valid-batches "$VALID_BATCHES" --out "$dir/results.csv" 2> "$dir/sweep.err" \
        || { tail -5 "$dir/sweep.err" >&2; return 1; }
}

echo "reproduce_results.sh: training and sweeping LR $LR_HIGH (high) and $LR_LOW (conventional) -> $OUT"
if [ "$PARALLEL" = 1 ]; then
    one_run high "$LR_HIGH" & HIGH=$!
    one_run low "$LR_LOW" & LOW=$!
    STATUS=0
    wait "$HIGH" || STATUS=1
    wait "$LOW" || STATUS=1
    [ "$STATUS" = 0 ] || { echo "reproduce_results.sh: a run failed (see $OUT/lr-*/train.out, sweep.err)" >&2; exit 1; }
else
    one_run high "$LR_HIGH"
    one_run low "$LR_LOW"
fi

"$PY" "$REPO/gpt/plot.py" --run "peak LR $LR_HIGH (high)=$OUT/lr-high/results.csv" \
    --run "peak LR $LR_LOW (conventional)=$OUT/lr-low/results.csv" --k "$PLOT_K" --spacing "$PLOT_SPACING" \
    --ema-k "$PLOT_EMA_K" --swa-start "$SWA_START" --out "$OUT/figures" --table "$OUT/table.md"
times > "$OUT/.times"   # the builtin, in this shell: user and sys seconds of every finished child process
CPU=$(awk 'NR == 2 { for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); s += t[1] * 60 + t[2] } printf "%.0f", s }' \
    "$OUT/.times")
echo "reproduce_results.sh: done in $(( $(date +%s) - START )) s wall, $CPU s of CPU time (user + sys, all steps)" \
    "-> $OUT"
