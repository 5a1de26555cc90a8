#!/usr/bin/env bash
# The language-modelling data for gpt/: fairseq's binarised format (dict.txt, {train,valid}.{bin,idx}) in DATA_DIR.
#
#   bash gpt/prepare_data.sh                                    # embedded: Penn Treebank words (treebank package)
#   OPENWEBTEXT=/data/nanoGPT/data/openwebtext bash gpt/prepare_data.sh   # the paper's data, see below
#
# OPENWEBTEXT is prepared by the user (nothing is downloaded here) and may be any of:
#   1. a fairseq-preprocess output (dict.txt, train.idx/.bin, valid.idx/.bin): linked as it is;
#   2. nanoGPT's data/openwebtext/prepare.py output (train.bin, val.bin: uint16 GPT-2 token ids, the paper's own
#      preparation): converted by gpt/nanogpt_to_fairseq.py, no re-tokenisation (~10 min for 9B tokens);
#   3. raw text (train.txt, valid.txt, optionally test.txt; one document or paragraph per line): GPT-2 BPE
#      encoded by bert/prepare_data.sh, which needs GPT2_BPE=/folder with encoder.json and vocab.bpe (it reads
#      WikiText's file names: DATA_DIR.raw/ holds links to the text under them).
# The embedded PTB is bert/prepare_data.sh's (already tokenised, 10k words), with PTB_VALID_LINES validation
# sentences: the sweep scores every cell on them, so they set its cost.
# Hardware/time: 2 CPU cores: PTB ~15 s; OpenWebText as nanoGPT files ~10 min, as raw text hours (BPE).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"                # the venv's interpreter (bash setup.sh makes it)
OPENWEBTEXT="${OPENWEBTEXT:-}"                     # the user's OpenWebText folder (3 forms, above); empty: PTB
GPT2_BPE="${GPT2_BPE:-$OPENWEBTEXT}"               # raw text only: folder with encoder.json, vocab.bpe (dict.txt)
DATA_DIR="${DATA_DIR:-$REPO/runs/gpt/data-bin/$([ -n "$OPENWEBTEXT" ] && echo openwebtext || echo ptb)}"  # output
PTB_TRAIN_LINES="${PTB_TRAIN_LINES:-0}"            # PTB: keep the first N training sentences (0: all 42068)
PTB_VALID_LINES="${PTB_VALID_LINES:-500}"          # PTB: the first N validation sentences (~11k tokens)

die() { echo "gpt/prepare_data.sh: $*" >&2; exit 2; }

if [ -z "$OPENWEBTEXT" ]; then
    DATA_DIR="$DATA_DIR" PTB_TRAIN_LINES="$PTB_TRAIN_LINES" PTB_VALID_LINES="$PTB_VALID_LINES" \
        bash "$REPO/bert/prepare_data.sh"
    exit 0
fi
[ -d "$OPENWEBTEXT" ] || die "OPENWEBTEXT=$OPENWEBTEXT is not a folder"
OWT="$(cd "$OPENWEBTEXT" && pwd)"
if [ -f "$OWT/dict.txt" ] && [ -f "$OWT/train.idx" ] && [ -f "$OWT/valid.idx" ]; then
    mkdir -p "$(dirname "$DATA_DIR")"
    [ -e "$DATA_DIR" ] && [ "$(readlink "$DATA_DIR")" != "$OWT" ] && die "$DATA_DIR exists; remove it or set DATA_DIR"
    ln -sfn "$OWT" "$DATA_DIR"
    echo "gpt/prepare_data.sh: $DATA_DIR -> $OWT (fairseq data, used as it is)"
elif [ -f "$OWT/train.bin" ] && [ -f "$OWT/val.bin" ]; then
    STAMP="$DATA_DIR/source.txt"   # what a finished conversion was made from
    SOURCE="nanogpt $OWT $(stat -c %s "$OWT/train.bin") $(stat -c %s "$OWT/val.bin")"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SOURCE" ]; then
        echo "gpt/prepare_data.sh: $DATA_DIR is up to date ($SOURCE)"
    else
        rm -f "$STAMP"
        "$PY" "$REPO/gpt/nanogpt_to_fairseq.py" "$OWT" --out "$DATA_DIR"
        echo "$SOURCE" > "$STAMP"
    fi
elif [ -f "$OWT/train.txt" ] && [ -f "$OWT/valid.txt" ]; then
    # bert/prepare_data.sh BPE-encodes WikiText's file names: present the text under them.
    RAW="$DATA_DIR.raw"
    mkdir -p "$RAW"
    ln -sf "$OWT/train.txt" "$RAW/wiki.train.raw"
    ln -sf "$OWT/valid.txt" "$RAW/wiki.valid.raw"
    ln -sf "$OWT/$([ -f "$OWT/test.txt" ] && echo test.txt || echo valid.txt)" "$RAW/wiki.test.raw"
    WIKITEXT="$RAW" GPT2_BPE="$GPT2_BPE" DATA_DIR="$DATA_DIR" bash "$REPO/bert/prepare_data.sh"
else
    die "OPENWEBTEXT=$OWT holds none of: fairseq data (dict.txt, train.idx, valid.idx), nanoGPT's train.bin and \
val.bin, or raw train.txt and valid.txt"
fi
