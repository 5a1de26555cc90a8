#!/usr/bin/env python
"""The averaging sweep over a saved trajectory: LAWA (every end epoch E × every window size k) or another
averaging method, plus the baseline.

For each E and k the k latest checkpoints θ_{E−k+1} … θ_E are averaged (``--method uni``, LAWA; ``exp``,
the paper's Appendix C weights), or another method's averages are built (below); BatchNorm statistics are
recomputed on training batches (the averaged running statistics do not belong to the averaged weights; the
paper does a full training-set pass), and train/val loss, top-1 and top-5 are appended to the results CSV
in the repository's tidy schema. The plain checkpoints are evaluated as ``baseline`` rows (k=1, their own
BatchNorm statistics). The averages read every checkpoint once (``lawa_methods.iter_method_averages``);
the baseline cells not yet in the CSV are a second pass.
Cells already in the results file are skipped, so an interrupted sweep resumes.

    python imagenet/evaluate_lawa.py fashion-mnist --ckpt-dir runs/fmnist --ks 2,3,4 --out runs/fmnist/results.csv
    python imagenet/evaluate_lawa.py fashion-mnist --ckpt-dir runs/fmnist --method swa --swa-starts 8
    python imagenet/evaluate_lawa.py fashion-mnist --ckpt-dir runs/fmnist --method uni,exp,ema --ks 2,4 --decays 0.75
    python imagenet/evaluate_lawa.py /data/imagenet --ckpt-dir lawa-resnet50 --ks 2,4,6,8,10 --epochs 10:90

The methods (``lawa_methods`` defines them; f is the first checkpoint, s a start or a spacing):

=============  ===================================  ============  ================  ====================
``--method``   flags                                CSV method    CSV k             end epochs E
=============  ===================================  ============  ================  ====================
uni            ``--ks`` (LAWA)                      lawa          k                 E ≥ f + k − 1
exp            ``--ks``, ``--alpha``                exp           k                 E ≥ f + k − 1
ema            ``--decays d,…``                     ema           round(1/(1−d))    every E (EMA from f)
swa            ``--swa-starts s,…``                 swa           E − s + 1         E ≥ s
ewa            ``--ks``, ``--spacing s``            ewa-s{s}      k                 E ≥ f + (k − 1)·s
               (``--ewa-blocks``: block ends only)
=============  ===================================  ============  ================  ====================

TWA trains its coefficients, so it is a command of its own: ``imagenet/train_twa.py``, same CSV.
How the trajectory was trained (arch, image size, training subset, optimizer, seed) is read from
``CKPT_DIR/args.json`` when main.py wrote it, else from the checkpoints (``arch``) and the flags. The paper's
published ResNet-50 trajectory (pytorch/examples format, ``module.`` keys) is read as it is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import common
import torch
from tqdm import tqdm

import lawa_methods as lm
from lawa_utils import (
    LawaError,
    append_rows,
    done_cells,
    find_checkpoints,
    parse_epochs,
    read_results,
    recompute_bn,
    record_run,
)

PROG = "evaluate_lawa.py"
METRICS = ("loss", "acc1", "acc5")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("data", metavar="DIR", help="as for main.py: ImageFolder root, or 'fashion-mnist'")
    parser.add_argument("--ckpt-dir", required=True, type=Path, help="directory with checkpoint{E}.pt")
    lm.add_method_args(parser)
    parser.add_argument("--epochs", default=None, metavar="A:B",
                        help="end epochs E to evaluate, inclusive: 'A:B', 'A:B:STEP' or 'E' (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="results CSV (default: CKPT_DIR/results.csv)")
    parser.add_argument("--no-baseline", action="store_true", help="do not evaluate the plain checkpoints")
    common.add_evaluation_args(parser)
    common.add_trajectory_args(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    try:
        sweep(common.parse_trajectory_args(get_args_parser(), argv))
    except LawaError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def sweep(args: argparse.Namespace) -> None:
    runs = lm.split_methods(args)  # flag errors first, before anything is read; one namespace per --method
    checkpoints = find_checkpoints(args.ckpt_dir)
    ends = parse_epochs(args.epochs, checkpoints)
    out = args.out or args.ckpt_dir / "results.csv"
    if not out.parent.is_dir():
        raise LawaError(f"--out {out}: directory {out.parent} does not exist")
    if args.bn_batches < 0:
        raise LawaError(f"--bn-batches must be ≥ 0, got {args.bn_batches}")
    common.check_data(args.data, args.dummy)

    labels = [lm.csv_method(run) for run in runs]
    splits = ["train", "val"] if args.train_eval_subset else ["val"]
    done = done_cells(out, [*labels, "baseline"], splits, METRICS, args.optimizer, args.seed)
    # Plan with a loader that reads nothing: the sweeps decide their own cells (and name a checkpoint missing
    # inside a window) before any data or model is built, and the count needs no second copy of their rules.
    todo = sum(1 for _ in lm.iter_runs_cells(runs, checkpoints, ends, done, load=lambda path: {}))
    if not todo:
        print(f"{PROG}: all {', '.join(labels)} cells of {args.ckpt_dir} are already in {out}")
        return
    args.arch = args.arch or common.checkpoint_arch(checkpoints[ends[0]], args.trust_checkpoints)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = common.build_datasets(args.data, image_size=args.image_size, train_subset=args.train_subset,
                                 val_subset=args.val_subset, dummy=args.dummy)
    model = common.build_model(args.arch, data.num_classes).to(device, memory_format=torch.channels_last)
    bn_loader = common.bn_recompute_loader(data.train, batch_size=args.batch_size, workers=args.workers,
                                           seed=args.seed, num_batches=args.bn_batches)
    loaders = common.eval_loaders(data, batch_size=args.eval_batch_size, workers=args.workers,
                                  train_subset=args.train_eval_subset, seed=args.seed)

    record_run(out, args)
    started = time.perf_counter()
    with tqdm(total=todo, desc="cells", unit="cell", file=sys.stderr, dynamic_ncols=True) as bar:
        for name, end, k, state in lm.iter_runs_cells(runs, checkpoints, ends, done):
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:  # e.g. an ImageNet trajectory swept with the wrong DATA
                detail = " ".join(str(exc).split())[:200]
                raise LawaError(f"{args.ckpt_dir} does not fit -a {args.arch} with {data.num_classes} classes "
                                f"(is DATA the trajectory's data?): {detail}") from None
            if name != "baseline":  # every averaged model, also SWA's first point (k=1) and EMA's
                torch.manual_seed(args.seed)  # the same augmented BN batches for every cell
                recompute_bn(model, bn_loader, num_batches=args.bn_batches or None, device=device)
            metrics = {s: common.to_metrics(common.evaluate(model, loader, device, True))
                       for s, loader in loaders.items()}
            append_rows(out, common.tidy_rows(metrics, method=name, k=k, epoch=end, optimizer=args.optimizer,
                                              seed=args.seed))
            bar.set_postfix_str(f"{name} E={end} k={k} val acc1 {metrics['val']['acc1']:.2f}")
            bar.update()
    print(f"{PROG}: {bar.n} cells in {time.perf_counter() - started:.0f} s -> {out}")
    for label in labels:
        print_summary(out, args, label)


def print_summary(out: Path, args: argparse.Namespace, label: str) -> None:
    """Val top-1 by end epoch: the baseline and each curve of this method (a k; for SWA a start s)."""
    table = lm.summary_table(read_results(out), label, optimizer=args.optimizer, seed=args.seed, split="val",
                             metric="acc1")
    print(f"val top-1 (%) by end epoch E, {label} and the baseline:")
    print(table.round(2).to_string())


if __name__ == "__main__":
    main()
