#!/usr/bin/env bash
# Binarise a corpus for fairseq masked-LM pre-training: text -> fairseq-preprocess --only-source -> DATA_DIR
# (dict.txt, {train,valid,test}.{bin,idx}). Reruns with the same inputs reuse DATA_DIR.
#
#   bash bert/prepare_data.sh                                   # embedded: Penn Treebank (treebank package)
#   PTB_TRAIN_LINES=3500 DATA_DIR=/tmp/ptb bash bert/prepare_data.sh   # the first 3500 training sentences
#   WIKITEXT=/data/wikitext-103-raw GPT2_BPE=/data/gpt2_bpe bash bert/prepare_data.sh   # the paper's data
#
# Embedded: PTB is already tokenised with a 10k vocabulary (<unk> included), so it needs no BPE.
# Paper: WikiText-103 *raw* (wiki.{train,valid,test}.raw) encoded with the GPT-2 BPE of fairseq's RoBERTa
# README (encoder.json, vocab.bpe and fairseq's dict.txt from https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe/;
# nothing is downloaded here). Use fairseq's dict.txt to evaluate the paper's published checkpoints: their
# embedding rows follow it. Without it a dictionary is built from the training data.
# Hardware/time: 2 CPU cores: PTB ~10 s; WikiText-103 BPE ~1 h with 2 workers (minutes with 60).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"                 # the venv's interpreter (bash setup.sh makes it)
PREPROCESS="$(dirname "$PY")/fairseq-preprocess"   # fairseq's binariser, installed beside PY
WIKITEXT="${WIKITEXT:-}"                           # wikitext-103-raw folder; empty: the embedded PTB
GPT2_BPE="${GPT2_BPE:-$WIKITEXT}"                  # folder with encoder.json, vocab.bpe (and dict.txt)
DATA_DIR="${DATA_DIR:-$REPO/runs/bert/data-bin/$([ -n "$WIKITEXT" ] && echo wikitext-103 || echo ptb)}"  # output
PTB_TRAIN_LINES="${PTB_TRAIN_LINES:-0}"            # PTB: keep the first N training sentences (0: all 42068)
PTB_VALID_LINES="${PTB_VALID_LINES:-0}"            # PTB: keep the first N validation sentences (0: all 3370)
WORKERS="${WORKERS:-2}"                            # processes for BPE encoding and fairseq-preprocess
FORCE="${FORCE:-0}"                                # 1: rebuild DATA_DIR even if it matches the inputs

die() { echo "prepare_data.sh: $*" >&2; exit 2; }

[ -x "$PREPROCESS" ] || die "$PREPROCESS not found: run 'bash $REPO/setup.sh' first (it installs fairseq)"

# What DATA_DIR is built from; a finished build records it, so a rerun with other inputs rebuilds.
if [ -n "$WIKITEXT" ]; then
    for split in train valid test; do
        [ -f "$WIKITEXT/wiki.$split.raw" ] || die "$WIKITEXT/wiki.$split.raw is missing: WIKITEXT must be the \
unpacked wikitext-103-raw folder (wiki.train.raw, wiki.valid.raw, wiki.test.raw)"
    done
    for f in encoder.json vocab.bpe; do
        [ -f "$GPT2_BPE/$f" ] || die "$GPT2_BPE/$f is missing: set GPT2_BPE=/folder with the GPT-2 BPE files \
encoder.json and vocab.bpe (and fairseq's dict.txt), from https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe/"
    done
    SOURCE="wikitext-103 $WIKITEXT bpe $GPT2_BPE dict $([ -f "$GPT2_BPE/dict.txt" ] && echo given || echo built)"
else
    "$PY" -c "import treebank" 2>/dev/null || die "the treebank package is missing: run 'bash $REPO/setup.sh'"
    SOURCE="ptb train_lines=$PTB_TRAIN_LINES valid_lines=$PTB_VALID_LINES"
fi
STAMP="$DATA_DIR/source.txt"
if [ "$FORCE" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SOURCE" ]; then
    echo "prepare_data.sh: $DATA_DIR is up to date ($SOURCE)"
    exit 0
fi

mkdir -p "$DATA_DIR"
rm -f "$STAMP"
TEXT="$DATA_DIR/text"        # the text fairseq-preprocess reads (PTB sentences, or BPE ids), kept for reference
mkdir -p "$TEXT"
DICT_ARGS=()
if [ -n "$WIKITEXT" ]; then
    echo "prepare_data.sh: GPT-2 BPE encoding of $WIKITEXT ($WORKERS workers)"
    for split in train valid test; do
        "$PY" -m fairseq.examples.roberta.multiprocessing_bpe_encoder \
            --encoder-json "$GPT2_BPE/encoder.json" --vocab-bpe "$GPT2_BPE/vocab.bpe" \
            --inputs "$WIKITEXT/wiki.$split.raw" --outputs "$TEXT/$split.txt" --keep-empty --workers "$WORKERS"
    done
    [ -f "$GPT2_BPE/dict.txt" ] && DICT_ARGS=(--srcdict "$GPT2_BPE/dict.txt")
else
    echo "prepare_data.sh: Penn Treebank from the treebank package -> $TEXT"
    "$PY" - "$TEXT" "$PTB_TRAIN_LINES" "$PTB_VALID_LINES" <<'PYTHON'
import sys
from pathlib import Path

import treebank

out, limits = Path(sys.argv[1]), {"train": int(sys.argv[2]), "valid": int(sys.argv[3]), "test": 0}
for split, limit in limits.items():
    lines = [line.strip() for line in treebank.penn[split].split("\n") if line.strip()]
    lines = lines[:limit] if limit > 0 else lines
    (out / f"{split}.txt").write_text("\n".join(lines) + "\n")
    print(f"  {split}: {len(lines)} sentences, {sum(len(line.split()) for line in lines)} tokens")
PYTHON
fi

rm -f "$DATA_DIR"/dict.txt "$DATA_DIR"/{train,valid,test}.{bin,idx}
"$PREPROCESS" --only-source "${DICT_ARGS[@]}" --trainpref "$TEXT/train.txt" --validpref "$TEXT/valid.txt" \
    --testpref "$TEXT/test.txt" --destdir "$DATA_DIR" --workers "$WORKERS" > "$DATA_DIR/preprocess.out" 2>&1 \
    || { cat "$DATA_DIR/preprocess.out" >&2; die "fairseq-preprocess failed (output above)"; }
grep -E "Dictionary|sents" "$DATA_DIR/preprocess.out" | sed 's/^.*INFO[^]]*] */  /' || true
echo "$SOURCE" > "$STAMP"
echo "prepare_data.sh: wrote $DATA_DIR"
