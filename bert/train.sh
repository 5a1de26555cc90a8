#!/usr/bin/env bash
# RoBERTa masked-LM pre-training with fairseq-train, a checkpoint every epoch, all kept (checkpoint{E}.pt).
#
#   bash bert/train.sh                                        # PRESET=tiny: 2-layer RoBERTa, embedded PTB, CPU
#   PRESET=paper DATA=runs/bert/data-bin/wikitext-103 GPUS=4 bash bert/train.sh    # the paper's recipe
#   MAX_EPOCH=2 SAVE_DIR=/tmp/run bash bert/train.sh          # any variable below can be overridden
#   bash bert/train.sh --restore-file /tmp/run/checkpoint10.pt   # extra arguments go to fairseq-train as is
#
# The paper's recipe is fairseq's RoBERTa pre-training README: --task masked_lm --criterion masked_lm
# --arch roberta_base, --sample-break-mode complete, 512 tokens per sequence, Adam β=(0.9, 0.98) ε=1e-6,
# weight decay 0.01, no clipping, dropout 0.1, polynomial (linear) decay after 10k warm-up updates, peak LR
# 5e-4, 2048 sequences per update (16 per GPU × --update-freq × GPUs), 200 epochs, fp16 on GPUs.
# Decay horizon: this script decays the LR to 0 at the end of the 200 epochs (--total-num-update =
# DECAY_EPOCHS × updates per epoch, counted by updates_per_epoch.py), as the recipe reads. The paper's
# published run instead kept the README's max_update=125000 as its horizon while stopping after 200 epochs
# (~27k updates), so its LR only fell from 5e-4 to ~4.3e-4: TOTAL_UPDATES=125000 reproduces that schedule.
# The tiny preset is the same command scaled down (2 layers, width 64, 128 tokens, 16 sequences per
# update, LR 2e-3) with the original run's shape: its decay horizon is DECAY_EPOCHS=3× the run, so the LR
# is still high at the end, where LAWA's averaging matters (see bert/README.md, "Embedded run").
#
# Writes to SAVE_DIR: checkpoint{E}.pt, checkpoint_last.pt (fairseq resumes from it when rerun),
# train.log (fairseq's output with JSON progress lines, appended on reruns), args.json (command, versions,
# git sha, hardware) and log.csv (the tidy per-epoch log, rebuilt from train.log by log_to_csv.py).
# Multi-GPU: GPUS=N makes fairseq spawn N workers (--distributed-world-size N). Multi-node: run this on
# every node with NODES, NODE_RANK and MASTER=host:port. CPU: CPU_PROCS=2 runs 2 ranks joined by gloo.
# Hardware/time: tiny ~5-6 s of CPU per epoch (one thread; 40 epochs: 12 min wall on the shared 2-core
# machine, see bert/README.md); paper ~10 min per epoch on 4× RTX 3090 (the paper).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"                  # the venv's interpreter (bash setup.sh makes it)
FAIRSEQ_TRAIN="$(dirname "$PY")/fairseq-train"      # fairseq's trainer, installed beside PY
PRESET="${PRESET:-tiny}"                            # tiny (CPU, embedded PTB) | paper (RoBERTa-base, GPUs)
pick() { if [ "$PRESET" = paper ]; then echo "$1"; else echo "$2"; fi; }   # pick PAPER_VALUE TINY_VALUE

DATA="${DATA:-$REPO/runs/bert/data-bin/$(pick wikitext-103 ptb)}"   # fairseq data (bert/prepare_data.sh)
SAVE_DIR="${SAVE_DIR:-$REPO/runs/bert/$PRESET}"     # checkpoints and logs of this run
LOG_CSV="${LOG_CSV:-$SAVE_DIR/log.csv}"             # the tidy per-epoch log (train and val loss, wall time)
SEED="${SEED:-1}"                                   # fairseq --seed: init, dropout, data order, masking
GPUS="${GPUS:-$(pick 1 0)}"                         # GPUs per node; 0: train on the CPU
CPU_PROCS="${CPU_PROCS:-1}"                         # CPU only: data-parallel processes joined by gloo
CPU_THREADS="${CPU_THREADS:-1}"                     # CPU only: torch threads per process (see below)
NUM_WORKERS="${NUM_WORKERS:-$(pick 1 0)}"           # data-loading processes per worker (--num-workers; below)
NODES="${NODES:-1}"                                 # machines taking part (multi-node needs the next two)
NODE_RANK="${NODE_RANK:-0}"                         # this machine's index, 0..NODES-1
MASTER="${MASTER:-}"                                # host:port of node 0, reachable from every node
MAX_EPOCH="${MAX_EPOCH:-$(pick 200 40)}"            # epochs, one checkpoint each
BATCH_SIZE="${BATCH_SIZE:-16}"                      # sequences per worker per forward pass (--batch-size)
SEQS_PER_UPDATE="${SEQS_PER_UPDATE:-$(pick 2048 16)}"   # sequences per optimizer update, all workers
TOKENS="${TOKENS:-$(pick 512 128)}"                 # tokens per sequence (--tokens-per-sample)
LR="${LR:-$(pick 0.0005 0.002)}"                    # peak learning rate
WARMUP="${WARMUP:-$(pick 10000 200)}"               # linear warm-up updates
DECAY_EPOCHS="${DECAY_EPOCHS:-$(pick "$MAX_EPOCH" $((3 * MAX_EPOCH)))}"   # LR reaches 0 after this many epochs
TOTAL_UPDATES="${TOTAL_UPDATES:-}"                  # the decay horizon in updates (wins over DECAY_EPOCHS)
MODEL_ARGS="${MODEL_ARGS-$(pick "" "--encoder-layers 2 --encoder-embed-dim 64 --encoder-ffn-embed-dim 256 \
--encoder-attention-heads 4")}"                     # architecture changes to roberta_base (12 layers × 768)
LOG_INTERVAL="${LOG_INTERVAL:-$(pick 200 50)}"      # updates between fairseq's progress lines

die() { echo "train.sh: $*" >&2; exit 2; }

[ -x "$FAIRSEQ_TRAIN" ] || die "$FAIRSEQ_TRAIN not found: run 'bash $REPO/setup.sh' first (it installs fairseq)"
[ -f "$DATA/dict.txt" ] && [ -f "$DATA/train.idx" ] && [ -f "$DATA/valid.idx" ] \
    || die "$DATA has no fairseq data (dict.txt, train/valid .bin/.idx): run 'bash $REPO/bert/prepare_data.sh' \
(WIKITEXT=/path for the paper's data) or set DATA=/folder"
WORKERS=$(( GPUS > 0 ? GPUS * NODES : CPU_PROCS ))
UPDATE_FREQ=$(( SEQS_PER_UPDATE / (BATCH_SIZE * WORKERS) ))
[ "$UPDATE_FREQ" -ge 1 ] && [ $(( UPDATE_FREQ * BATCH_SIZE * WORKERS )) -eq "$SEQS_PER_UPDATE" ] \
    || die "SEQS_PER_UPDATE=$SEQS_PER_UPDATE is not a multiple of BATCH_SIZE=$BATCH_SIZE × $WORKERS workers"

DEVICE_ARGS=(--cpu)
# Width-64 matrices are too small for intra-op parallelism to pay, and on a shared machine a second thread
# mostly waits for the first: one thread per process was ~3x faster than two in a pilot (README).
[ "$GPUS" -gt 0 ] || export OMP_NUM_THREADS="$CPU_THREADS"
DIST_ARGS=()
if [ "$GPUS" -gt 0 ]; then
    DEVICE_ARGS=(--fp16)
    [ "$WORKERS" -gt 1 ] && DIST_ARGS=(--distributed-world-size "$WORKERS")
    if [ "$NODES" -gt 1 ]; then
        [ -n "$MASTER" ] || die "NODES=$NODES needs MASTER=host:port (node 0) and NODE_RANK on every node"
        # fairseq spawns GPUS workers here, ranks NODE_RANK*GPUS ... NODE_RANK*GPUS+GPUS-1.
        DIST_ARGS+=(--distributed-init-method "tcp://$MASTER" --distributed-rank $(( NODE_RANK * GPUS )))
    fi
fi
if [ -z "$TOTAL_UPDATES" ]; then
    PER_EPOCH=$("$PY" "$REPO/bert/updates_per_epoch.py" "$DATA" --tokens-per-sample "$TOKENS" \
        --batch-size "$BATCH_SIZE" --update-freq "$UPDATE_FREQ" --world-size "$WORKERS" 2>/dev/null) \
        || die "could not count the updates per epoch of $DATA (run bert/updates_per_epoch.py to see why)"
    TOTAL_UPDATES=$(( DECAY_EPOCHS * PER_EPOCH ))
    echo "train.sh: $PER_EPOCH updates per epoch; the LR decays to 0 over $TOTAL_UPDATES updates ($DECAY_EPOCHS epochs)"
fi

mkdir -p "$SAVE_DIR"
# --update-epoch-batch-itr: fairseq-fixed 0.12.3.1 otherwise reuses one DataLoader with persistent workers,
# whose copies of the dataset never see set_epoch(), so RoBERTa's dynamic masking silently becomes static
# (the same masks every epoch: the tiny run then memorises them, train loss -> 1.4 bits, val loss up to 15).
# A fresh iterator per epoch gives each epoch its own masks, as in the original run's fairseq. (The flag takes
# a value: fairseq declares it a bool whose default is another setting.)
# --num-workers: each epoch's iterator leaves its loader processes behind until Python's garbage collector
# reaches them; shutting each down then waits out torch's 5 s join timeout. The tiny run stalled 55 s once
# every 12 epochs (165 of 470 s of training). CPU runs load in the main process (0: no stall, same masks);
# on GPUs the loader process overlaps data preparation with compute, and the stall is ~5 s per epoch.
# shellcheck disable=SC2206  # MODEL_ARGS is a list of flags on purpose
CMD=("$FAIRSEQ_TRAIN" "$DATA" --user-dir "$REPO/bert/lawa_plugin"
    --task masked_lm --criterion masked_lm --arch roberta_base $MODEL_ARGS
    --sample-break-mode complete --tokens-per-sample "$TOKENS" --max-positions "$TOKENS"
    --optimizer adam --adam-betas "(0.9,0.98)" --adam-eps 1e-6 --weight-decay 0.01 --clip-norm 0.0
    --lr-scheduler polynomial_decay --lr "$LR" --warmup-updates "$WARMUP" --total-num-update "$TOTAL_UPDATES"
    --dropout 0.1 --attention-dropout 0.1
    --batch-size "$BATCH_SIZE" --update-freq "$UPDATE_FREQ" --max-epoch "$MAX_EPOCH" --seed "$SEED"
    --save-dir "$SAVE_DIR" --keep-last-epochs -1 --skip-invalid-size-inputs-valid-test
    --update-epoch-batch-itr True --num-workers "$NUM_WORKERS"
    --log-format json --log-interval "$LOG_INTERVAL"
    "${DEVICE_ARGS[@]}" "${DIST_ARGS[@]}" "$@")

"$PY" - "$SAVE_DIR/args.json" "$PRESET" "$WORKERS" "${CMD[@]}" <<'PYTHON'
import json
import shlex
import sys
from importlib.metadata import version

import lawa_utils

out, preset, workers, command = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
info = lawa_utils.run_info(command)
info.update(command=shlex.join(command), preset=preset, workers=workers)
info["versions"]["fairseq"] = version("fairseq-fixed")
with open(out, "w") as f:
    json.dump(info, f, indent=2)
PYTHON
echo "train.sh: ${CMD[*]}"
if [ "$GPUS" -eq 0 ] && [ "$CPU_PROCS" -gt 1 ]; then
    # fairseq spawns one worker per visible GPU and PyTorch DDP refuses CPU modules with device ids, so on
    # the CPU each rank is its own process and legacy_ddp all-reduces the gradients over gloo.
    PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    PIDS=()
    for (( RANK = 0; RANK < CPU_PROCS; RANK++ )); do
        [ "$RANK" -eq 0 ] && OUTPUT="$SAVE_DIR/train.log" || OUTPUT=/dev/stderr   # only rank 0 logs progress
        "${CMD[@]}" --distributed-world-size "$CPU_PROCS" --distributed-rank "$RANK" \
            --distributed-no-spawn --distributed-init-method "tcp://127.0.0.1:$PORT" --distributed-backend gloo \
            --ddp-backend legacy_ddp >> "$OUTPUT" 2>&1 &
        PIDS+=($!)
    done
    STATUS=0
    for _ in "${PIDS[@]}"; do   # one rank failing would leave the others waiting in an all-reduce
        wait -n || { STATUS=$?; kill "${PIDS[@]}" 2>/dev/null || true; }
    done
    [ "$STATUS" -eq 0 ] || die "a fairseq-train rank failed (exit $STATUS; see $SAVE_DIR/train.log)"
else
    "${CMD[@]}" 2>&1 | tee -a "$SAVE_DIR/train.log"   # fairseq's --log-file repeats lines (a handler per epoch)
fi
"$PY" "$REPO/bert/log_to_csv.py" "$SAVE_DIR/train.log" --out "$LOG_CSV" --optimizer adam --seed "$SEED"
