#!/usr/bin/env python
"""The Early-Weight-Averaging sweep over a fairseq language-model run saved every N updates: the plain
checkpoints, LAWA over k checkpoints spaced s apart (sliding, or the paper's non-overlapping blocks), EMA and
SWA of the saved checkpoints, each scored with the validation loss fairseq-validate would print.

    python gpt/evaluate_lawa.py --ckpt-dir runs/gpt/lr-high/checkpoints --ks 2,4 --spacings 1,4 \
        --ema-decays 0.5,0.75 --swa-starts 200 --out runs/gpt/lr-high/results.csv

**Checkpoints and units.** ``fairseq-train --save-interval-updates N --keep-interval-updates -1`` writes
``checkpoint_{epoch}_{updates}.pt`` every N updates; the checkpoint of an update that ends an epoch it writes
only as ``checkpoint{epoch}.pt``, so such a gap is filled from the epoch checkpoint holding that update count.
Positions are update counts (``--updates``, ``--swa-starts``); k and s count checkpoints, so "k checkpoints
spaced s apart" ending at update U are the updates U, U − s·N, …, U − (k−1)·s·N. Rows (``lawa_sweep``'s tidy
CSV, losses in bits) hold the update count in the ``epoch`` column with ``unit=step``.

**Methods.** Without ``--method`` the flags name them, with these defaults: ``--ks 2,4 --spacings 1,4`` (LAWA,
labelled ``lawa``, and ``ewa-s4``; ``--layout blocks`` keeps only windows that tile the run), ``--ema-decays
0.5,0.75`` (decay per saved checkpoint); ``--swa-starts`` (updates) adds SWA. ``''`` turns a default off.
``--method`` and the other flags of ``lawa_sweep`` work as in every sweep. The loss is fairseq's
(``lawa_fairseq``); cells already in ``--out`` are skipped, so a killed sweep resumes.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

import lawa_fairseq as lf
import lawa_sweep
from lawa_utils import LawaError

PROG = "evaluate_lawa.py"
FLAG_DEFAULTS = {"ks": "2,4", "spacing": "1,4", "decays": "0.5,0.75"}  # without --method


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", default=None, metavar="DATA",
                        help="fairseq-preprocess output folder (default: the one recorded in the checkpoints)")
    parser.add_argument("--ckpt-dir", required=True, type=Path, help="directory with checkpoint_{epoch}_{updates}.pt")
    parser.add_argument("--interval", type=int, default=None,
                        help="updates between checkpoints, N (default: the gcd of the saved update counts)")
    lawa_sweep.add_sweep_args(parser, default_ks=FLAG_DEFAULTS["ks"])
    parser.add_argument("--valid-subset", default="valid", help="fairseq split to score (default: valid)")
    parser.add_argument("--valid-batches", type=int, default=0, metavar="N",
                        help="score N batches spread evenly over the validation set, the same for every cell "
                        "(default: 0, all of it; OpenWebText's 4M tokens per cell are a lot)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="sequences per evaluation batch, as fairseq-validate --batch-size (default: 16)")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even if CUDA is available")
    return parser


def main(argv: list[str] | None = None) -> None:
    try:
        sweep(get_args_parser().parse_args(argv))
    except LawaError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def sweep(args: argparse.Namespace):
    """Evaluate every cell the flags ask for into the results CSV; return this run's rows."""
    if args.batch_size < 1 or args.valid_batches < 0:
        raise LawaError(f"--batch-size must be ≥ 1 and --valid-batches ≥ 0, got {args.batch_size} and "
                        f"{args.valid_batches}")
    if args.method is None:
        for flag, default in FLAG_DEFAULTS.items():
            setattr(args, flag, default if getattr(args, flag) is None else getattr(args, flag))
    trajectory = lf.update_trajectory(args.ckpt_dir, args.interval, trust=args.trust_checkpoints)
    methods = lawa_sweep.methods_from_args(args, trajectory)
    ends = lawa_sweep.parse_ends(args.epochs, trajectory)
    for spec in methods:  # a window longer than the run has no cell at all: say so rather than write nothing
        spacing = getattr(spec, "spacing", 1)
        for k in getattr(spec, "ks", ()):
            if (k - 1) * spacing + 1 > len(trajectory):
                raise LawaError(f"k={k} checkpoints spaced {spacing} apart span {(k - 1) * spacing + 1} checkpoints, "
                                f"but the run has {len(trajectory)}: use a smaller k or spacing")
    out = args.out or args.ckpt_dir / "results.csv"
    if not out.parent.is_dir():
        raise LawaError(f"--out {out}: directory {out.parent} does not exist")
    if args.data is not None and not Path(args.data.split(":")[0]).is_dir():
        raise LawaError(f"DATA {args.data} is not a folder (the fairseq-preprocess output: gpt/reproduce_results.sh "
                        "makes it)")
    lawa_sweep.plan_cells(trajectory, methods, baseline=not args.no_baseline, ends=ends)  # before fairseq loads

    newest = trajectory.paths[-1]
    task, model, criterion, cfg = lf.load_fairseq(newest, args.data, args.trust_checkpoints,
                                                  hint="gpt/prepare_data.sh")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    batches: list = []

    def prepare() -> None:
        model.to(device)
        batches.extend(lf.fixed_batches(task, model, cfg, args.valid_subset, args.batch_size, args.valid_batches,
                                        hint="gpt/prepare_data.sh"))

    def evaluate(state: dict[str, torch.Tensor], cell: lawa_sweep.Cell) -> dict[str, float]:
        try:
            model.load_state_dict(state, strict=True, model_cfg=cfg.model)
        except RuntimeError as exc:
            raise LawaError(f"the {cell.label} average ending at update {cell.end} does not fit the model built "
                            f"from {newest.name} ({str(exc).splitlines()[0]})") from None
        loss = lf.valid_loss(task, model, criterion, batches, device)
        if not math.isfinite(loss):
            print(f"{PROG}: warning: non-finite loss for {cell.label} k={cell.k} at update {cell.end}",
                  file=sys.stderr)
        return {"val_loss": loss}

    return lawa_sweep.sweep(
        trajectory, methods, evaluate, out, baseline=not args.no_baseline, ends=ends, prepare=prepare,
        optimizer=str(cfg.optimizer._name), seed=int(cfg.common.seed), run_args=args, trust=args.trust_checkpoints,
        metrics=["val_loss"], summary="val_loss")


if __name__ == "__main__":
    main()
