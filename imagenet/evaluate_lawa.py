#!/usr/bin/env python
"""The averaging sweep over a saved image-classification trajectory: LAWA (every end epoch E × every window
size k) or another averaging method, plus the baseline.

    python imagenet/evaluate_lawa.py fashion-mnist --ckpt-dir runs/fmnist --ks 2,3,4 --out runs/fmnist/results.csv
    python imagenet/evaluate_lawa.py fashion-mnist --ckpt-dir runs/fmnist --method swa --swa-starts 8
    python imagenet/evaluate_lawa.py fashion-mnist --ckpt-dir runs/fmnist --method uni,exp,ema --ks 2,4 --decays 0.75
    python imagenet/evaluate_lawa.py /data/imagenet --ckpt-dir lawa-resnet50 --ks 2,4,6,8,10 --epochs 10:90

Every averaged model gets its BatchNorm statistics recomputed on training batches (the averaged running
statistics do not belong to the averaged weights; the paper does a full training-set pass), the same batches
for every cell; the plain checkpoints are ``baseline`` rows (k=1) with their own statistics. Train and val
loss, top-1 and top-5 go to the tidy results CSV. The methods, their flags, CSV labels and k columns are
``lawa_sweep``'s (its module docstring has the table); cells already in the CSV are skipped, so an
interrupted sweep resumes. TWA trains its coefficients, so it is a command of its own: ``train_twa.py``.

How the trajectory was trained (arch, image size, training subset, optimizer, seed) is read from
``CKPT_DIR/args.json`` when main.py wrote it, else from the checkpoints (``arch``) and the flags. The paper's
published ResNet-50 trajectory (pytorch/examples format, ``module.`` keys) is read as it is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common
import torch

import lawa_sweep
from lawa_trajectory import find_trajectory
from lawa_utils import LawaError, recompute_bn

PROG = "evaluate_lawa.py"
METRICS = ("loss", "acc1", "acc5")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("data", metavar="DIR", help="as for main.py: ImageFolder root, or 'fashion-mnist'")
    parser.add_argument("--ckpt-dir", required=True, type=Path, help="directory with checkpoint{E}.pt")
    common.add_evaluation_args(parser)
    common.add_trajectory_args(parser)
    lawa_sweep.add_sweep_args(parser)  # after the others: their --trust-checkpoints is kept
    return parser


def main(argv: list[str] | None = None) -> None:
    try:
        sweep(common.parse_trajectory_args(get_args_parser(), argv))
    except LawaError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def sweep(args: argparse.Namespace):
    """Evaluate every cell the flags ask for into the results CSV; return this trajectory's rows."""
    trajectory = find_trajectory(args.ckpt_dir)
    methods = lawa_sweep.methods_from_args(args, trajectory)  # flag errors before anything is read
    ends = lawa_sweep.parse_ends(args.epochs, trajectory)
    if args.bn_batches < 0:
        raise LawaError(f"--bn-batches must be ≥ 0, got {args.bn_batches}")
    common.check_data(args.data, args.dummy)
    splits = ["train", "val"] if args.train_eval_subset else ["val"]
    run: dict = {}

    def prepare() -> None:  # data and model, built only when there is a cell to evaluate
        last = trajectory.positions[-1] if ends is None else max(ends)
        args.arch = args.arch or common.checkpoint_arch(trajectory.path(last), args.trust_checkpoints)
        run["device"] = device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        data = common.build_datasets(args.data, image_size=args.image_size, train_subset=args.train_subset,
                                     val_subset=args.val_subset, dummy=args.dummy)
        run["classes"] = data.num_classes
        run["model"] = common.build_model(args.arch, data.num_classes).to(device, memory_format=torch.channels_last)
        run["bn"] = common.bn_recompute_loader(data.train, batch_size=args.batch_size, workers=args.workers,
                                               seed=args.seed, num_batches=args.bn_batches)
        run["loaders"] = common.eval_loaders(data, batch_size=args.eval_batch_size, workers=args.workers,
                                             train_subset=args.train_eval_subset, seed=args.seed)

    def evaluate(state: dict[str, torch.Tensor], cell: lawa_sweep.Cell) -> dict[str, float]:
        model, device = run["model"], run["device"]
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:  # e.g. an ImageNet trajectory swept with the wrong DATA
            detail = " ".join(str(exc).split())[:200]
            raise LawaError(f"{args.ckpt_dir} does not fit -a {args.arch} with {run['classes']} classes "
                            f"(is DATA the trajectory's data?): {detail}") from None
        if cell.label != lawa_sweep.BASELINE:  # every averaged model, also SWA's first point (k=1) and EMA's
            torch.manual_seed(args.seed)  # the same augmented BN batches for every cell
            recompute_bn(model, run["bn"], num_batches=args.bn_batches or None, device=device)
        return {f"{split}_{name}": value for split, loader in run["loaders"].items()
                for name, value in common.to_metrics(common.evaluate(model, loader, device, True)).items()}

    return lawa_sweep.sweep(
        trajectory, methods, evaluate, args.out or args.ckpt_dir / "results.csv", baseline=not args.no_baseline,
        ends=ends, prepare=prepare, optimizer=args.optimizer, seed=args.seed, run_args=args,
        trust=args.trust_checkpoints, metrics=[f"{s}_{m}" for s in splits for m in METRICS], summary="val_acc1")


if __name__ == "__main__":
    main()
