#!/usr/bin/env python
"""Turn fairseq-train's JSON log into the repository's tidy per-epoch log CSV (method=baseline, k=1).

    python bert/log_to_csv.py runs/bert/train.log --out runs/bert/log.csv --optimizer adam --seed 1

fairseq-train with ``--log-format json`` prints its progress as JSON objects (bert/train.sh keeps its
output in SAVE_DIR/train.log); at the end of every epoch a ``valid`` line (``{"epoch": 3, "valid_loss":
"8.91", ...}``) and a ``train`` summary (``{"epoch": 3, "train_loss": "9.02", ..., "train_wall": "412"}``).
Losses are in bits, as fairseq prints them; ``train_wall`` there is the cumulative wall-clock time since the
start of training (fairseq keeps it across ``--restore-file`` restarts), which becomes ``wall_seconds`` of
both rows of that epoch. A resumed run appends to the same log, so the last line for an epoch wins. Reading
the log after (or during) training keeps fairseq-train a stock command: no plugin hooks into its training loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lawa_utils import LawaError, append_rows

PROG = "log_to_csv.py"
# fairseq's JSON keys for the two per-epoch lines and the tidy split each becomes.
SPLIT_OF_KEY = {"train_loss": "train", "valid_loss": "val"}


def parse_fairseq_log(lines) -> dict[int, dict[str, float]]:
    """``{epoch: {"train": loss, "val": loss, "wall": seconds}}`` from fairseq JSON log lines.

    Lines that are not epoch summaries (``train_inner`` progress, plain-text messages, and the duplicates
    fairseq's ``--log-file`` writes when it re-adds its file handler) are ignored; the last summary of an
    epoch wins.
    """
    epochs: dict[int, dict[str, float]] = {}
    for line in lines:
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "epoch" not in record or "update" in record:
            continue  # "update" marks train_inner progress lines (mid-epoch)
        entry = epochs.setdefault(int(record["epoch"]), {})
        for key, split in SPLIT_OF_KEY.items():
            if key in record:
                entry[split] = float(record[key])
        if "train_loss" in record and "train_wall" in record:
            entry["wall"] = float(record["train_wall"])
    return epochs


def tidy_rows(epochs: dict[int, dict[str, float]], optimizer: str, seed: int) -> list[dict]:
    rows = []
    for epoch in sorted(epochs):
        entry = epochs[epoch]
        for split in ("train", "val"):
            if split in entry:
                rows.append({"method": "baseline", "k": 1, "epoch": epoch, "split": split, "metric": "loss",
                             "value": entry[split], "wall_seconds": entry.get("wall", ""),
                             "optimizer": optimizer, "seed": seed})
    return rows


def write_log_csv(log_file: Path, out: Path, optimizer: str, seed: int) -> int:
    """(Re)write ``out`` from ``log_file``; returns the number of epochs found."""
    if not log_file.is_file():
        raise LawaError(f"{log_file} does not exist (bert/train.sh keeps fairseq-train's output there)")
    with open(log_file, encoding="utf-8", errors="replace") as f:
        epochs = parse_fairseq_log(f)
    if not epochs:
        raise LawaError(f"{log_file} has no epoch summaries (was fairseq-train run with --log-format json?)")
    if not out.parent.is_dir():
        raise LawaError(f"--out {out}: directory {out.parent} does not exist")
    # The log is the source of truth, so the CSV is rebuilt whole and swapped in atomically.
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        append_rows(tmp, tidy_rows(epochs, optimizer, seed))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(epochs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("log_file", type=Path, help="fairseq-train's output with --log-format json")
    parser.add_argument("--out", type=Path, required=True, help="tidy log CSV to (re)write")
    parser.add_argument("--optimizer", default="adam", help="optimizer column (default: adam)")
    parser.add_argument("--seed", type=int, default=1, help="seed column (fairseq's --seed; default: 1)")
    args = parser.parse_args(argv)
    try:
        n = write_log_csv(args.log_file, args.out, args.optimizer, args.seed)
    except LawaError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"{PROG}: {n} epochs -> {args.out}")


if __name__ == "__main__":
    main()
