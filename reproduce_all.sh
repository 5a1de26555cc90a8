#!/usr/bin/env bash
# The main job: everything this repository reproduces, end to end, from a fresh machine.
#
#   bash reproduce_all.sh                      # embedded defaults (Fashion-MNIST, Penn Treebank) on CPU
#   OUT=/path FORCE=1 bash reproduce_all.sh    # another output folder; rerun every stage
#   IMAGENET=/data/imagenet WIKITEXT=/data/wikitext-103 GPUS=4 bash reproduce_all.sh   # paper scale
#   CKPT_DIR=/ckpts/resnet50 bash reproduce_all.sh   # only sweep a published/your own ImageNet trajectory
#
# Stages: set-up → imagenet/ (train + (E,k) sweep) → bert/ (train + sweep) → Appendix B/C (SGD vs
# Lookahead vs LAWA, uniform vs exponential, 3 seeds) → figures, GPU-hours-saved table and summary.
# A finished stage leaves $OUT/.done-<stage> and is skipped on a rerun (FORCE=1 reruns everything;
# delete one stamp to rerun one stage). A per-stage time summary is printed at the end.
# Hardware: 2 CPU cores, no GPU. Measured: see README ("Time").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-$REPO/out}"                  # everything this job writes goes below this folder
FORCE="${FORCE:-0}"                      # 1: ignore the stage stamps and rerun every stage
SEEDS="${SEEDS:-0 1 2}"                  # seeds of the Appendix B/C comparison
PY="$REPO/.venv/bin/python"              # the interpreter set up by setup.sh

# Appendix B/C at embedded scale: a smaller Fashion-MNIST run per seed and optimizer (the paper: CIFAR-100,
# ResNet-34, 200 epochs, Lookahead alpha=0.8 k=5, LAWA k=10). Sized to fit the 20-minute budget.
APX_EPOCHS="${APX_EPOCHS:-12}"           # epochs per appendix run
APX_SUBSET="${APX_SUBSET:-2048}"         # training images per appendix run
APX_IMAGE_SIZE="${APX_IMAGE_SIZE:-20}"   # input side in pixels
APX_K="${APX_K:-4}"                      # LAWA window for the appendix comparison (k=10 of 200 in the paper)
APX_LR="${APX_LR:-0.4}"                  # peak learning rate (high, so SGD's iterates oscillate)

mkdir -p "$OUT"
declare -a STAGE_NAMES=() STAGE_SECONDS=()

# run_stage NAME COMMAND...: run unless $OUT/.done-NAME exists; record the wall time.
run_stage() {
    local name="$1"; shift
    local stamp="$OUT/.done-$name" start
    if [ "$FORCE" != 1 ] && [ -f "$stamp" ]; then
        echo "== $name: already done ($(cat "$stamp") s); FORCE=1 or rm $stamp to rerun"
        STAGE_NAMES+=("$name (reused)"); STAGE_SECONDS+=(0); return
    fi
    echo "== $name"
    start=$(date +%s)
    "$@"
    local took=$(( $(date +%s) - start ))
    echo "$took" > "$stamp"
    STAGE_NAMES+=("$name"); STAGE_SECONDS+=("$took")
}

appendix() {
    local data="${IMAGENET:-fashion-mnist}" seed opt dir
    for seed in $SEEDS; do
        for opt in sgd lookahead; do
            dir="$OUT/appendix/seed$seed/$opt"
            mkdir -p "$dir"
            echo "-- appendix: seed $seed, $opt"
            if [ ! -f "$dir/checkpoint$APX_EPOCHS.pt" ]; then   # a finished run is reused
                rm -rf "$dir"; mkdir -p "$dir"
                "$PY" "$REPO/imagenet/main.py" "$data" -a resnet18 --epochs "$APX_EPOCHS" -b 128 --lr "$APX_LR" \
                    --wd 5e-4 --seed "$seed" --train-subset "$APX_SUBSET" --image-size "$APX_IMAGE_SIZE" \
                    --val-subset 2000 --eval-batch-size 1000 -j 0 --optimizer "$opt" --save-dir "$dir"
            fi
            if [ "$opt" = sgd ]; then
                "$PY" "$REPO/imagenet/evaluate_lawa.py" "$data" --ckpt-dir "$dir" --ks "$APX_K" --method uni \
                    -j 0 --eval-batch-size 1000 --bn-batches 16 --train-eval-subset 0 --out "$dir/results.csv"
                "$PY" "$REPO/imagenet/evaluate_lawa.py" "$data" --ckpt-dir "$dir" --ks "$APX_K" --method exp \
                    -j 0 --eval-batch-size 1000 --bn-batches 16 --train-eval-subset 0 --no-baseline \
                    --out "$dir/results.csv"
            fi
        done
    done
}

figures() {
    "$PY" "$REPO/plots/make_figures.py" --imagenet "$OUT/imagenet" --bert "$OUT/bert" \
        --appendix "$OUT/appendix" --appendix-k "$APX_K" --out "$OUT/figures" ${GPUS:+--gpus "$GPUS"}
}

TOTAL_START=$(date +%s)
START=$(date +%s); bash "$REPO/setup.sh"   # always: idempotent, seconds when everything is installed
STAGE_NAMES+=(setup); STAGE_SECONDS+=($(( $(date +%s) - START )))
run_stage imagenet env OUT="$OUT/imagenet" bash "$REPO/imagenet/reproduce_results.sh"
run_stage bert env OUT="$OUT/bert" bash "$REPO/bert/reproduce_results.sh"
run_stage appendix appendix
run_stage figures figures

echo
echo "== time per stage (s)"
for i in "${!STAGE_NAMES[@]}"; do printf '  %-22s %6s\n' "${STAGE_NAMES[$i]}" "${STAGE_SECONDS[$i]}"; done
printf '  %-22s %6s\n' total $(( $(date +%s) - TOTAL_START ))
echo "results: $OUT (figures and summary in $OUT/figures)"
