#!/usr/bin/env bash
# The main job: everything this repository reproduces, end to end, from a fresh machine.
#
#   bash reproduce_all.sh                      # embedded defaults (Fashion-MNIST, Penn Treebank) on CPU
#   OUT=/path FORCE=1 bash reproduce_all.sh    # another output folder; rerun every stage
#   IMAGENET=/data/imagenet WIKITEXT=/data/wikitext-103-raw GPT2_BPE=/data/gpt2_bpe GPUS=4 bash reproduce_all.sh
#   METHODS=0 bash reproduce_all.sh            # without the other averaging methods (EMA, SWA, EWA, TWA)
#   APX_DATA=/data/cifar100 APX_ARCH=resnet34 APX_EPOCHS=200 APX_SUBSET=50000 APX_IMAGE_SIZE=32 APX_BATCH=128 \
#   APX_K=10 bash reproduce_all.sh             # Appendix B/C at the paper's scale (CIFAR-100 as an ImageFolder)
#   GPT=1 bash reproduce_all.sh                # also gpt/ (LAWA vs EMA vs SWA at high LR); off by default:
#                                              # it does not fit the 25-minute budget beside the rest
#   IMAGENET=/data/imagenet CKPT_DIR=/ckpts/resnet50 bash reproduce_all.sh   # sweep a published/your own
#                                              # ImageNet trajectory instead of training one (imagenet job)
#   BERT_CKPT_DIR=/ckpts/roberta DATA=/data/data-bin/wikitext-103 bash reproduce_all.sh   # same for bert
#
# Jobs: set-up → imagenet/ (train + (E,k) sweep) and bert/ (train + sweep, then EMA/SWA on its trajectory),
# each for every seed of SEEDS, the Appendix B/C runs (SGD vs Lookahead vs LAWA, uniform vs exponential, the
# same seeds; each SGD run followed by the other averaging methods on its trajectory: EMA, SWA, EWA, TWA) →
# figures (seed bands), GPU-hours-saved table, the paper's claims judged over the seeds (summary.md/.json).
# Three seeds are what lets a claim be called held or not held beyond the seed spread (plots/claims.py);
# to fit them, each embedded run is leaner than a single-seed run would be (the two reproduce_results.sh).
# Small models gain little from a second thread, and two single-threaded processes use both cores fully:
# the jobs form one queue served by LANES lanes of one thread each, longest first, so the lane bert leaves
# free takes the appendix runs while imagenet still trains. Only the figures wait for everything.
# Output lines carry a [job] prefix. A finished job leaves $OUT/.done-<job> and is skipped on a rerun
# (FORCE=1 reruns everything; delete one stamp to rerun one job). A time summary is printed at the end: wall
# seconds and CPU seconds (user + sys of the job's processes) per job; on a busy machine the wall time grows
# and the CPU time much less, so the two together say whether the machine or the work was slow.
# Hardware: 2 CPU cores, no GPU. Measured: see README ("Time").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-$REPO/out}"                  # everything this job writes goes below this folder
FORCE="${FORCE:-0}"                      # 1: ignore the stage stamps and rerun every stage
SEEDS="${SEEDS:-0 1 2}"                  # seeds of every embedded run: vision, masked LM, Appendix B/C
                                         # (paper scale, IMAGENET/WIKITEXT/CKPT_DIR: the first seed only)
PY="$REPO/.venv/bin/python"              # the interpreter set up by setup.sh
GPT="${GPT:-0}"                          # 1: also the gpt/ Early-Weight-Averaging stage (+~3.5 min idle, 6 CPU-min)
METHODS="${METHODS:-1}"                  # 0: skip the other averaging methods (EMA, SWA, EWA, TWA: ~3 min)
LANES="${LANES:-2}"                      # independent jobs run at once (one per core)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # threads per process: LANES × this = the cores

# Appendix B/C at embedded scale: a smaller Fashion-MNIST run per seed and optimizer (the paper: CIFAR-100,
# ResNet-34, 200 epochs, Lookahead alpha=0.8 k=5, LAWA k=10). Sized to fit the 25-minute budget.
APX_DATA="${APX_DATA:-fashion-mnist}"    # an ImageFolder root (train/, val/), e.g. CIFAR-100 exported as the
                                         # paper's appendix used it; default: the embedded Fashion-MNIST
APX_ARCH="${APX_ARCH:-resnet18}"         # torchvision model (the paper: resnet34)
APX_EPOCHS="${APX_EPOCHS:-8}"            # epochs per appendix run (10 with 2048 images before: see imagenet's
APX_SUBSET="${APX_SUBSET:-1536}"         # TRAIN_SUBSET); training images per appendix run
APX_IMAGE_SIZE="${APX_IMAGE_SIZE:-16}"   # input side in pixels
APX_BATCH="${APX_BATCH:-64}"             # batch size: 24 steps per epoch
APX_K="${APX_K:-3}"                      # LAWA window for the appendix comparison (k=10 of 200 in the paper)
APX_LR="${APX_LR:-0.1}"                  # peak learning rate, cosine to 0. Pilots (seed 0, val top-1 at the end):
                                         # lr 0.4 with batch 128 ended at 35-59% (16 steps/epoch: undertrained and
                                         # erratic); lr 0.1, batch 64, 16 px ends at 74.7% and its iterates still
                                         # swing mid-run (E=5→6: 69.8→64.8%), the regime LAWA is for

mkdir -p "$OUT"
RUN_START=$(date +%s)

# run_stage NAME COMMAND...: run unless $OUT/.done-NAME exists; the stamp holds the job's wall seconds,
# $OUT/.cpu-NAME its CPU seconds (bash's `times`: user + sys of the processes it waited for).
run_stage() {
    local name="$1"; shift
    local stamp="$OUT/.done-$name" start
    if [ "$FORCE" != 1 ] && [ -f "$stamp" ] && [ "$(stat -c %Y "$stamp")" -lt "$RUN_START" ]; then
        echo "== $name: already done ($(cat "$stamp") s); FORCE=1 or rm $stamp to rerun"
        return
    fi
    rm -f "$stamp" "$OUT/.cpu-$name"
    echo "== $name: started $(date +%H:%M:%S)"
    start=$(date +%s)
    # The group runs in its own subshell (a pipeline part), so `times` there counts this job's processes only.
    if ! { rc=0; "$@" || rc=$?; times > "$OUT/.times-$name"; exit "$rc"; } 2>&1 | sed -u "s/^/[$name] /"; then
        rm -f "$OUT/.times-$name"
        echo "== $name: FAILED after $(( $(date +%s) - start )) s" >&2
        return 1
    fi
    cpu_seconds "$OUT/.times-$name" > "$OUT/.cpu-$name" && rm -f "$OUT/.times-$name"
    echo $(( $(date +%s) - start )) > "$stamp"
    echo "== $name: done in $(cat "$stamp") s wall, $(cat "$OUT/.cpu-$name") s CPU"
}

# cpu_seconds FILE: user + sys of the children, from the second line of bash's `times` ("1m2.5s 0m3.1s").
cpu_seconds() {
    awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); t += p[1] * 60 + p[2] } printf "%d\n", t + 0.5 }' "$1"
}

# in_lanes: run the queued commands (one per line on stdin, each a function call) LANES at a time.
in_lanes() {
    local job failed=0
    while IFS= read -r job; do
        while [ "$(jobs -rp | wc -l)" -ge "$LANES" ]; do wait -n || failed=1; done
        eval "$job" &
    done
    while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=1; done
    return "$failed"
}

# appendix_run SEED OPT: one appendix trajectory (reused when finished) and, for SGD, its LAWA sweeps.
appendix_run() {
    local seed="$1" opt="$2" data="$APX_DATA"
    local dir="$OUT/appendix/seed$seed/$opt"
    if [ ! -f "$dir/checkpoint$APX_EPOCHS.pt" ]; then   # a finished run is reused
        rm -rf "$dir"; mkdir -p "$dir"
        "$PY" "$REPO/imagenet/main.py" "$data" -a "$APX_ARCH" --epochs "$APX_EPOCHS" -b "$APX_BATCH" --lr "$APX_LR" \
            --wd 5e-4 --seed "$seed" --train-subset "$APX_SUBSET" --image-size "$APX_IMAGE_SIZE" \
            --val-subset 2000 --eval-batch-size 1000 -j 0 -p 1000 --optimizer "$opt" --save-dir "$dir" \
            > "$dir/train.out" 2>&1 || { tail -5 "$dir/train.out"; return 1; }
    fi
    if [ "$opt" = sgd ]; then   # LAWA and EXP in one process; the baseline is the trainer's log (the same
                                # evaluation of the same weights: equal to the digit, measured on 3 seeds)
        "$PY" "$REPO/imagenet/evaluate_lawa.py" "$data" --ckpt-dir "$dir" --method uni,exp --ks "$APX_K" \
            --no-baseline -j 0 --eval-batch-size 1000 --bn-batches 16 --train-eval-subset 0 \
            --out "$dir/results.csv" > "$dir/sweep.out" 2>&1 || { tail -5 "$dir/sweep.out"; return 1; }
    fi
    echo "seed $seed $opt: $(tail -1 "$dir/log.csv")"
}

# methods_run SEED: averaging methods beside LAWA, post hoc on one appendix seed's SGD trajectory, into
# the results.csv that holds its baseline, lawa and exp rows (fig7 and summary.md compare them): EMA with LAWA's
# effective window (d = 1 − 1/k), SWA from half the run, EWA (k checkpoints 2 epochs apart) and TWA trained for
# 2 epochs (48 steps, lr 0.05; at 2048 images lr 2 diverged and 0.5 ended 2.6 points below 0.05 on seed 0)
# in the span of the checkpoints SWA averages at the end. Evaluated as the appendix sweeps.
methods_run() {
    local seed="$1" data="$APX_DATA"
    local dir="$OUT/appendix/seed$seed/sgd" half=$(( APX_EPOCHS / 2 ))   # SWA: half..E; TWA: span(θ_half … θ_last)
    local decay; decay="$(awk "BEGIN { print 1 - 1 / $APX_K }")"       # EMA's effective window 1/(1−d) = APX_K
    local on=("$data" --ckpt-dir "$dir" --out "$dir/results.csv" -j 0 --eval-batch-size 1000 --bn-batches 16
              --train-eval-subset 0)
    { "$PY" "$REPO/imagenet/evaluate_lawa.py" "${on[@]}" --method ema,swa,ewa --no-baseline --epochs "$APX_K:$APX_EPOCHS" \
          --decays "$decay" --swa-starts "$half" --ks "$APX_K" --spacing 2 &&
      "$PY" "$REPO/imagenet/train_twa.py" "${on[@]}" --range "$half:$APX_EPOCHS" --epochs 2 --lr 0.05; } \
        > "$dir/methods.out" 2>&1 || { tail -5 "$dir/methods.out"; return 1; }
    echo "seed $seed: ema, swa, ewa-s2 and twa rows in $dir/results.csv"
}

# bert_methods SEED: EMA (d=0.75) and SWA (from epochs 10 and 20) on one seed's masked-LM trajectory, into its
# results.csv, at the end epochs its LAWA sweep used (every 4th).
bert_methods() {
    [ -z "${WIKITEXT:-}${BERT_CKPT_DIR:-}" ] || return 0   # the embedded run only: a paper-scale sweep is the user's call
    local dir="$OUT/bert/seed$1"
    local on=("$dir/data-bin" --ckpt-dir "$dir/checkpoints" --out "$dir/results.csv"
              --epochs "4:${EPOCHS:-40}:4" --train-batches 8 --batch-size 16)
    "$PY" "$REPO/bert/evaluate_lawa.py" "${on[@]}" --method ema,swa --decays 0.75 --swa-starts 10,20 \
        > "$dir/methods.out" 2>&1 || { tail -5 "$dir/methods.out"; return 1; }
    echo "bert seed $1: ema and swa rows in $dir/results.csv"
}

# figures: every figure, the hours-saved table and the claims, from the CSVs below $OUT (torch is not imported).
figures() {
    "$PY" "$REPO/plots/make_figures.py" --from "$OUT" --appendix-k "$APX_K" --out "$OUT/figures" \
        ${GPUS:+--gpus "$GPUS"}
}

START=$(date +%s); bash "$REPO/setup.sh"   # always: idempotent, seconds when everything is installed
echo "setup: $(( $(date +%s) - START )) s"
# Disk: an embedded seed keeps about 3 GB of per-epoch checkpoints (measured: vision 1.1, appendix 1.7, masked
# LM 0.2), the trajectories its sweeps and methods read. Fail now, not an hour in, when they cannot fit.
if [ -z "${IMAGENET:-}${WIKITEXT:-}${CKPT_DIR:-}${BERT_CKPT_DIR:-}" ] && [ "$APX_DATA" = fashion-mnist ]; then
    n_seeds=$(wc -w <<< "$SEEDS")
    need_mb=$(( n_seeds * 3072 - $(du -sm "$OUT" | cut -f1) ))
    free_mb=$(df -Pm "$OUT" | awk 'NR == 2 { print $4 }')
    if [ "$need_mb" -gt "$free_mb" ]; then
        echo "reproduce_all.sh: $OUT needs about $need_mb MB more for $n_seeds seeds' checkpoints; $free_mb MB are free (OUT=/other/disk or fewer SEEDS)" >&2
        exit 1
    fi
fi
# The seeds of the vision and masked-LM runs: all of SEEDS embedded, the first at paper scale or when sweeping
# a given trajectory (one run there is days of GPU time, and a given trajectory has one seed).
first_seed() { echo "${SEEDS%% *}"; }
vision_seeds() { if [ -n "${IMAGENET:-}${CKPT_DIR:-}" ]; then first_seed; else echo "$SEEDS"; fi; }
bert_seeds() { if [ -n "${WIKITEXT:-}${BERT_CKPT_DIR:-}" ]; then first_seed; else echo "$SEEDS"; fi; }
# The queue, longest jobs first (one lane each; times: README "Time"): a vision seed, a masked-LM seed with its
# methods, an SGD appendix run with its sweeps and methods, a Lookahead run.
queue() {
    local seed bert
    for seed in $SEEDS; do
        if [[ " $(vision_seeds) " == *" $seed "* ]]; then
            echo "run_stage imagenet-s$seed env OUT=\"$OUT/imagenet/seed$seed\" SEED=$seed CKPT_DIR=\"${CKPT_DIR:-}\" bash \"$REPO/imagenet/reproduce_results.sh\""
        fi
        if [[ " $(bert_seeds) " == *" $seed "* ]]; then
            bert="run_stage bert-s$seed env OUT=\"$OUT/bert/seed$seed\" SEED=$seed CKPT_DIR=\"${BERT_CKPT_DIR:-}\" bash \"$REPO/bert/reproduce_results.sh\""
            if [ "$METHODS" = 1 ]; then echo "$bert && run_stage bert-methods-s$seed bert_methods $seed"; else echo "$bert"; fi
        fi
    done
    for seed in $SEEDS; do
        if [ "$METHODS" = 1 ]; then
            echo "run_stage appendix-s$seed-sgd appendix_run $seed sgd && run_stage methods-s$seed methods_run $seed"
        else
            echo "run_stage appendix-s$seed-sgd appendix_run $seed sgd"
        fi
    done
    for seed in $SEEDS; do echo "run_stage appendix-s$seed-lookahead appendix_run $seed lookahead"; done
}
queue | in_lanes || { echo "reproduce_all.sh: a job failed (its '== NAME: FAILED' line above; its log under $OUT)" >&2; exit 1; }
if [ "$GPT" = 1 ]; then run_stage gpt env OUT="$OUT/gpt" bash "$REPO/gpt/reproduce_results.sh"; fi
rm -f "$OUT/.done-figures"   # always redrawn (8-25 s): any earlier job may have added rows
run_stage figures figures

echo
echo "== seconds per job: wall and CPU (user + sys); LANES=$LANES side by side, so a job's wall time includes"
echo "   waiting for the other lane (and for anything else this machine runs); its CPU time does not"
names="$(queue | grep -o 'run_stage [^ ]*' | cut -d' ' -f2)"   # the jobs queued above, in queue order
[ "$GPT" != 1 ] || names+=" gpt"
for name in $names figures; do
    printf '  %-24s %6s %6s\n' "$name" "$(cat "$OUT/.done-$name" 2>/dev/null || echo -)" \
        "$(cat "$OUT/.cpu-$name" 2>/dev/null || echo -)"
done
times > "$OUT/.times-all"
printf '  %-24s %6s %6s   (this invocation, set-up included)\n' total $(( $(date +%s) - RUN_START )) \
    "$(cpu_seconds "$OUT/.times-all")"
rm -f "$OUT/.times-all"
echo "results: $OUT (figures, summary.md with the claims, summary.json in $OUT/figures)"
