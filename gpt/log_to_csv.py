#!/usr/bin/env python
"""fairseq-train's JSON log of an update-based run → the tidy training log, one row per logged update.

    python gpt/log_to_csv.py runs/gpt/lr-high/checkpoints/train.log --out runs/gpt/lr-high/log.csv --seed 1

bert/log_to_csv.py keeps fairseq's per-epoch summaries; a language-model run is one long epoch, so this keeps
the per-update lines instead: ``train_inner`` (``{"loss": "9.36", "num_updates": "100", "wall": "21", ...}``:
the mean training loss over the last ``--log-interval`` updates, in bits) and ``valid``
(``{"valid_loss": "9.29", "valid_num_updates": "100"}``: the loss on the validation set, or on
``--max-valid-steps`` batches of it). Rows: method=baseline, k=1, ``epoch`` = the update count (as in
gpt/evaluate_lawa.py's results), ``wall_seconds`` = fairseq's ``wall`` at that update (seconds since training
started; validation rows take it from the training line of the same update when there is one). A resumed
run appends to the same log: the last line for an update wins.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lawa_utils import LawaError, append_rows  # noqa: E402

PROG = "log_to_csv.py"


def parse_update_log(lines) -> dict[int, dict[str, float]]:
    """``{updates: {"train": loss, "val": loss, "wall": seconds}}`` from fairseq JSON log lines."""
    updates: dict[int, dict[str, float]] = {}
    for line in lines:
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        if "num_updates" in record and "loss" in record:  # train_inner
            entry = updates.setdefault(int(record["num_updates"]), {})
            entry["train"] = float(record["loss"])
            if "wall" in record:
                entry["wall"] = float(record["wall"])
        elif "valid_num_updates" in record and "valid_loss" in record:
            updates.setdefault(int(record["valid_num_updates"]), {})["val"] = float(record["valid_loss"])
    return updates


def tidy_rows(updates: dict[int, dict[str, float]], optimizer: str, seed: int) -> list[dict]:
    return [{"method": "baseline", "k": 1, "epoch": u, "split": split, "metric": "loss",
             "value": updates[u][split], "wall_seconds": updates[u].get("wall", ""), "optimizer": optimizer,
             "seed": seed}
            for u in sorted(updates) for split in ("train", "val") if split in updates[u]]


def write_log_csv(log_file: Path, out: Path, optimizer: str, seed: int) -> int:
    """(Re)write ``out`` from ``log_file``; returns the number of updates found."""
    if not log_file.is_file():
        raise LawaError(f"{log_file} does not exist (gpt/train.sh keeps fairseq-train's output there)")
    with open(log_file, encoding="utf-8", errors="replace") as f:
        updates = parse_update_log(f)
    if not updates:
        raise LawaError(f"{log_file} has no progress lines (was fairseq-train run with --log-format json?)")
    if not out.parent.is_dir():
        raise LawaError(f"--out {out}: directory {out.parent} does not exist")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")  # rebuilt whole, swapped in atomically
    tmp.unlink(missing_ok=True)
    try:
        append_rows(tmp, tidy_rows(updates, optimizer, seed))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(updates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("log_file", type=Path, help="fairseq-train's output with --log-format json")
    parser.add_argument("--out", type=Path, required=True, help="tidy log CSV to (re)write")
    parser.add_argument("--optimizer", default="adam", help="optimizer column (default: adam, fairseq's name)")
    parser.add_argument("--seed", type=int, default=1, help="seed column (fairseq's --seed; default: 1)")
    args = parser.parse_args(argv)
    try:
        n = write_log_csv(args.log_file, args.out, args.optimizer, args.seed)
    except LawaError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"{PROG}: {n} updates -> {args.out}")


if __name__ == "__main__":
    main()
