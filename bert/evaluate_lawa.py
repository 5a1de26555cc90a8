#!/usr/bin/env python
"""The averaging sweep over a fairseq masked-LM trajectory: LAWA (every end epoch E × every window size k) or
another averaging method, plus the baseline.

    python bert/evaluate_lawa.py --ckpt-dir runs/bert/tiny --ks 2,4,6 --out runs/bert/results.csv
    python bert/evaluate_lawa.py --ckpt-dir runs/bert/tiny --method ema --decays 0.5,0.9 --out runs/bert/results.csv
    python bert/evaluate_lawa.py --ckpt-dir runs/bert/tiny --method ema,swa --decays 0.75 --swa-starts 10
    python bert/evaluate_lawa.py data-bin/wikitext-103 --ckpt-dir lawa-roberta --ks 2,4,6,8,10 --epochs 10:200 \
        --train-batches 50            # the paper's published trajectory, read as it is

The masked-LM loss is computed exactly as ``fairseq-validate`` computes it (``lawa_fairseq``): fairseq's own
task, model and criterion, built once from a checkpoint of the trajectory; the same batches (``--batch-size``,
size-sorted, unshuffled) and masks; losses in bits as fairseq prints them (all digits kept). The methods, their
flags, CSV labels and k columns are ``lawa_sweep``'s; ``baseline`` rows (k=1) are the plain checkpoints, read in
the LAWA pass. Cells already in the results file are skipped, so an interrupted sweep resumes.

The validation data is the folder recorded in the checkpoints unless DATA is given. Training loss, if asked
for (``--train-batches N``), is measured on N batches spread evenly over fairseq's training batches: a fixed
sample, the same for every cell, with dropout off (unlike the training log's running loss).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

import lawa_fairseq as lf
import lawa_sweep
from lawa_trajectory import find_trajectory
from lawa_utils import LawaError

PROG = "evaluate_lawa.py"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", default=None, metavar="DATA",
                        help="fairseq-preprocess output folder (default: the one recorded in the checkpoints)")
    parser.add_argument("--ckpt-dir", required=True, type=Path, help="directory with checkpoint{E}.pt")
    lawa_sweep.add_sweep_args(parser)
    parser.add_argument("--valid-subset", default="valid", help="fairseq split for split=val (default: valid)")
    parser.add_argument("--train-batches", type=int, default=0, metavar="N",
                        help="also measure training loss on N fixed batches of the training set (default: 0, "
                        "no train rows)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="sequences per evaluation batch, as fairseq-validate --batch-size (default: 16)")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even if CUDA is available")
    parser.add_argument("--fp16", action="store_true", help="evaluate in half precision (fairseq-validate --fp16)")
    return parser


def main(argv: list[str] | None = None) -> None:
    try:
        sweep(get_args_parser().parse_args(argv))
    except LawaError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def sweep(args: argparse.Namespace):
    """Evaluate every cell the flags ask for into the results CSV; return this trajectory's rows."""
    trajectory = find_trajectory(args.ckpt_dir)
    methods = lawa_sweep.methods_from_args(args, trajectory)  # flag errors first, before anything is read
    ends = lawa_sweep.parse_ends(args.epochs, trajectory)
    out = args.out or args.ckpt_dir / "results.csv"
    if not out.parent.is_dir():
        raise LawaError(f"--out {out}: directory {out.parent} does not exist")
    if args.train_batches < 0 or args.batch_size < 1:
        raise LawaError("--train-batches must be ≥ 0 and --batch-size ≥ 1")
    if args.data is not None and not Path(args.data.split(":")[0]).is_dir():
        raise LawaError(f"DATA {args.data} is not a folder (the fairseq-preprocess output: bert/prepare_data.sh)")
    lawa_sweep.plan_cells(trajectory, methods, baseline=not args.no_baseline, ends=ends)  # before fairseq loads

    template = trajectory.path(trajectory.positions[-1] if ends is None else max(ends))
    task, model, criterion, cfg = lf.load_fairseq(template, args.data, args.trust_checkpoints)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    batches: dict[str, list] = {}

    def prepare() -> None:  # the batches are collated only when there is a cell to evaluate
        model.to(device)
        if args.fp16:
            model.half()
        batches["val"] = lf.fixed_batches(task, model, cfg, args.valid_subset, args.batch_size)
        if args.train_batches:
            batches["train"] = lf.fixed_batches(task, model, cfg, cfg.dataset.train_subset, args.batch_size,
                                                args.train_batches)

    def evaluate(state: dict[str, torch.Tensor], cell: lawa_sweep.Cell) -> dict[str, float]:
        try:
            model.load_state_dict(state, strict=True, model_cfg=cfg.model)
        except RuntimeError as exc:
            what = trajectory.name(cell.end) if cell.label == "baseline" else f"the {cell.label} average at " \
                f"E={cell.end}, k={cell.k}"
            raise LawaError(f"{what} does not fit the model built from {template.name} "
                            f"({str(exc).splitlines()[0]})") from None
        losses = {f"{split}_loss": lf.valid_loss(task, model, criterion, b, device) for split, b in batches.items()}
        if not all(math.isfinite(v) for v in losses.values()):
            print(f"{PROG}: warning: non-finite loss at {cell.label} E={cell.end} k={cell.k}: {losses}",
                  file=sys.stderr)
        return losses

    splits = ["val"] + (["train"] if args.train_batches else [])
    return lawa_sweep.sweep(
        trajectory, methods, evaluate, out, baseline=not args.no_baseline,
        ends=ends, prepare=prepare, optimizer=str(cfg.optimizer._name), seed=int(cfg.common.seed), run_args=args,
        trust=args.trust_checkpoints, metrics=[f"{s}_loss" for s in splits], summary="val_loss")


if __name__ == "__main__":
    main()
