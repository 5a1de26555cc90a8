#!/usr/bin/env python
"""The LAWA sweep over a saved trajectory: every end epoch E × every window size k, plus the baseline.

For each E and k the k latest checkpoints θ_{E−k+1} … θ_E are averaged (``lawa_utils.iter_window_averages``,
every file read once), BatchNorm statistics are recomputed on training batches (the averaged running
statistics do not belong to the averaged weights; the paper does a full training-set pass), and train/val
loss, top-1 and top-5 are appended to the results CSV in the repository's tidy schema (method ``lawa``, or
``exp`` for the Appendix C weighting). The plain checkpoints are evaluated as ``baseline`` rows (k=1, their
own BatchNorm statistics). Cells already in the results file are skipped, so an interrupted sweep resumes.

    python imagenet/evaluate_lawa.py fashion-mnist --ckpt-dir runs/fmnist --ks 2,3,4 --out runs/fmnist/results.csv
    python imagenet/evaluate_lawa.py /data/imagenet --ckpt-dir lawa-resnet50 --ks 2,4,6,8,10 --epochs 10:90

How the trajectory was trained (arch, image size, training subset, optimizer, seed) is read from
``CKPT_DIR/args.json`` when main.py wrote it, else from the checkpoints (``arch``) and the flags. The paper's
published ResNet-50 trajectory (pytorch/examples format, ``module.`` keys) is read as it is.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import common
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from lawa_utils import (
    LawaError,
    append_rows,
    atomic_write,
    find_checkpoints,
    iter_window_averages,
    load_checkpoint,
    read_results,
    recompute_bn,
    run_info,
)

PROG = "evaluate_lawa.py"
# BatchNorm recompute on the first N training batches instead of the paper's full pass. Measured on the
# embedded trajectory (resnet18, 8192 images = 64 batches of 128; 8 cells: k=2,4 × E=4,8,12,16; 2000 val
# images), largest |Δ val top-1| against a full pass: 1 batch 1.5 points, 2: 1.15, 4: 0.75, 8: 0.4,
# 16: 0.15, 32: 0.35 (7 images: noise); |Δ val loss| ≤ 0.004 from 8 batches on. A full ImageNet pass per
# cell would cost more than the rest of the sweep together. --bn-batches 0 does the full pass.
DEFAULT_BN_BATCHES = 32
# Read from CKPT_DIR/args.json when present; these are how the trajectory was trained.
TRAJECTORY_FLAGS = ("arch", "image_size", "train_subset", "val_subset", "optimizer", "seed", "batch_size")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("data", metavar="DIR", help="as for main.py: ImageFolder root, or 'fashion-mnist'")
    parser.add_argument("--ckpt-dir", required=True, type=Path, help="directory with checkpoint{E}.pt")
    parser.add_argument("--ks", default="2,4,6,8,10", help="window sizes k, comma-separated (default: 2,4,6,8,10)")
    parser.add_argument("--method", choices=["uni", "exp"], default="uni",
                        help="uni: LAWA's uniform average; exp: the paper's Appendix C exponential weights")
    parser.add_argument("--alpha", type=float, default=0.9, help="exp: weight of the newest checkpoint")
    parser.add_argument("--epochs", default=None, metavar="A:B",
                        help="end epochs E to evaluate, inclusive: 'A:B', 'A:B:STEP' or 'E' (default: all)")
    parser.add_argument("--bn-batches", type=int, default=DEFAULT_BN_BATCHES, metavar="N",
                        help=f"recompute BatchNorm on the first N training batches; 0: a full pass "
                        f"(default: {DEFAULT_BN_BATCHES})")
    parser.add_argument("--train-eval-subset", type=int, default=10_000, metavar="N",
                        help="measure train loss/accuracy on a fixed random N training images; 0: skip the "
                        "train split (default: 10000, or the whole training set if smaller)")
    parser.add_argument("--out", type=Path, default=None, help="results CSV (default: CKPT_DIR/results.csv)")
    parser.add_argument("--no-baseline", action="store_true", help="do not evaluate the plain checkpoints")
    parser.add_argument("-j", "--workers", default=4, type=int, metavar="N", help="data loading workers")
    parser.add_argument("--eval-batch-size", default=256, type=int, metavar="N", help="evaluation batch size")
    parser.add_argument("--trust-checkpoints", action="store_true",
                        help="allow arbitrary unpickling (can run code): only for files from a source you trust")
    traj = parser.add_argument_group("the trajectory (default: CKPT_DIR/args.json, written by main.py)")
    traj.add_argument("-a", "--arch", default=None, help="default: the checkpoints' 'arch'")
    traj.add_argument("--image-size", type=int, default=None, metavar="S")
    traj.add_argument("--train-subset", type=int, default=None, metavar="N")
    traj.add_argument("--val-subset", type=int, default=None, metavar="N")
    traj.add_argument("--optimizer", default="sgd", help="written to the optimizer column (default: sgd)")
    traj.add_argument("--seed", type=int, default=0, help="written to the seed column; orders BN batches")
    traj.add_argument("-b", "--batch-size", type=int, default=256, metavar="N",
                      help="BatchNorm recompute batch size (default: the training batch size)")
    traj.add_argument("--dummy", action="store_true", help="fake data, as main.py --dummy")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags given on the command line win over CKPT_DIR/args.json, which wins over the defaults."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    recorded = args.ckpt_dir / "args.json"
    if recorded.is_file():
        try:
            trained = json.loads(recorded.read_text()).get("args", {})
        except (json.JSONDecodeError, AttributeError):
            raise LawaError(f"{recorded} is not the JSON record main.py writes") from None
        parser.set_defaults(**{k: trained[k] for k in TRAJECTORY_FLAGS if k in trained})
        args = parser.parse_args(argv)
    return args


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",")})
    except ValueError:
        raise LawaError(f"--ks must be comma-separated integers such as 2,4,6, got '{text}'") from None
    if ks[0] < 2:
        raise LawaError(f"--ks must be ≥ 2 (k=1 is the plain checkpoint: the baseline rows), got '{text}'")
    return ks


def parse_epochs(text: str | None, checkpoints: dict) -> list[int]:
    if text is None:
        return sorted(checkpoints)
    try:
        parts = [int(p) for p in text.split(":")]
        ends = list(range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1)) if len(parts) > 1 else parts
    except (ValueError, IndexError):
        raise LawaError(f"--epochs must be 'A:B', 'A:B:STEP' or 'E', got '{text}'") from None
    if not ends or len(parts) > 3:
        raise LawaError(f"--epochs must be 'A:B', 'A:B:STEP' or 'E' with A ≤ B, got '{text}'")
    missing = [e for e in ends if e not in checkpoints]
    if missing:
        have = f"checkpoint{min(checkpoints)}.pt..checkpoint{max(checkpoints)}.pt"
        raise LawaError(f"--epochs {text}: no checkpoint{missing[0]}.pt (have {have})")
    return ends


def done_cells(out: Path, method: str, optimizer: str, seed: int) -> tuple[set, set]:
    """(E, k) cells of this trajectory already in ``out``: LAWA cells and baseline cells (k=1)."""
    if not out.exists():
        return set(), set()
    rows = read_results(out)
    rows = rows[(rows["optimizer"].astype(str) == optimizer) & (rows["seed"] == seed)]
    cells = lambda m: {(int(e), int(k)) for e, k in rows.loc[rows["method"] == m, ["epoch", "k"]].values}
    return cells("lawa" if method == "uni" else "exp"), cells("baseline")


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(argv)
        sweep(args)
    except LawaError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def sweep(args: argparse.Namespace) -> None:
    ks = parse_ks(args.ks)
    checkpoints = find_checkpoints(args.ckpt_dir)
    ends = parse_epochs(args.epochs, checkpoints)
    out = args.out or args.ckpt_dir / "results.csv"
    if not out.parent.is_dir():
        raise LawaError(f"--out {out}: directory {out.parent} does not exist")
    if args.bn_batches < 0:
        raise LawaError(f"--bn-batches must be ≥ 0, got {args.bn_batches}")
    common.check_data(args.data, args.dummy)
    if args.arch is None:  # pytorch/examples checkpoints name their architecture
        first = load_checkpoint(checkpoints[ends[0]], trust=args.trust_checkpoints)
        args.arch = first.get("arch") if isinstance(first, dict) else None
        if args.arch is None:
            raise LawaError(f"{checkpoints[ends[0]]} does not name its architecture: pass -a ARCH")

    method = "lawa" if args.method == "uni" else "exp"
    done_lawa, done_base = done_cells(out, args.method, args.optimizer, args.seed)
    first = min(checkpoints)
    todo = sum((e, k) not in done_lawa for e in ends for k in ks if e - k + 1 >= first)
    todo += 0 if args.no_baseline else sum((e, 1) not in done_base for e in ends)
    # Validates every window (a checkpoint missing inside one is named) before any work is done.
    cells = iter_window_averages(checkpoints, ks, ends, method=args.method, alpha=args.alpha,
                                 trust=args.trust_checkpoints, skip=done_lawa)
    if not args.no_baseline:  # a window of one is the checkpoint itself, bit for bit
        cells = itertools.chain(cells, iter_window_averages(checkpoints, [1], ends, trust=args.trust_checkpoints,
                                                            skip=done_base))
    cells = iter(cells)
    pending = next(cells, None)
    if pending is None:
        print(f"{PROG}: all cells of {args.ckpt_dir} are already in {out}")
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = common.build_datasets(args.data, image_size=args.image_size, train_subset=args.train_subset,
                                 val_subset=args.val_subset, dummy=args.dummy)
    model = common.build_model(args.arch, data.num_classes).to(device, memory_format=torch.channels_last)
    bn_loader = bn_recompute_loader(data.train, args)
    eval_loaders = {"val": common.make_loader(data.val, args.eval_batch_size, args.workers)}
    if args.train_eval_subset:
        n = min(args.train_eval_subset, len(data.train_eval))
        subset = Subset(data.train_eval, common.fixed_permutation(len(data.train_eval), args.seed)[:n].tolist())
        eval_loaders = {"train": common.make_loader(subset, args.eval_batch_size, args.workers), **eval_loaders}

    record_run(out, args)
    started = time.perf_counter()
    with tqdm(total=todo, desc="cells", unit="cell", file=sys.stderr, dynamic_ncols=True) as bar:
        for end, k, state in itertools.chain([pending], cells):
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:  # e.g. an ImageNet trajectory swept with the wrong DATA
                detail = " ".join(str(exc).split())[:200]
                raise LawaError(f"{args.ckpt_dir} does not fit -a {args.arch} with {data.num_classes} classes "
                                f"(is DATA the trajectory's data?): {detail}") from None
            if k > 1:
                torch.manual_seed(args.seed)  # the same augmented BN batches for every cell
                recompute_bn(model, bn_loader, num_batches=args.bn_batches or None, device=device)
            metrics = {s: common.to_metrics(common.evaluate(model, loader, device, True))
                       for s, loader in eval_loaders.items()}
            append_rows(out, common.tidy_rows(metrics, method=method if k > 1 else "baseline", k=k, epoch=end,
                                              optimizer=args.optimizer, seed=args.seed))
            bar.set_postfix_str(f"E={end} k={k} val acc1 {metrics['val']['acc1']:.2f}")
            bar.update()
    print(f"{PROG}: {bar.n} cells in {time.perf_counter() - started:.0f} s -> {out}")
    print_summary(out, args, method)


def record_run(out: Path, args: argparse.Namespace) -> None:
    """Append this sweep's command, versions and settings (--bn-batches is not in the CSV) to OUT.args.json."""
    path = out.with_name(out.stem + ".args.json")
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append({**run_info(), "args": vars(args)})
    text = json.dumps(runs, indent=2, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()), force=True)


def bn_recompute_loader(train, args: argparse.Namespace):
    """Training batches in one fixed random order, so that the first N batches are a random sample and the
    same sample for every cell; drop_last as in training (a batch of one image breaks BatchNorm)."""
    order = common.fixed_permutation(len(train), args.seed).tolist() if args.bn_batches else range(len(train))
    return common.make_loader(Subset(train, order), args.batch_size, args.workers, drop_last=True)


def print_summary(out: Path, args: argparse.Namespace, method: str) -> None:
    """Val top-1 by end epoch: the baseline and each k, as in the paper's figures."""
    rows = read_results(out)
    rows = rows[(rows["optimizer"].astype(str) == args.optimizer) & (rows["seed"] == args.seed)
                & (rows["split"] == "val") & (rows["metric"] == "acc1") & rows["method"].isin(["baseline", method])]
    table = rows.pivot_table(index="epoch", columns=["method", "k"], values="value", aggfunc="last")
    print(f"val top-1 (%) by end epoch E, {method} k columns:")
    print(table.round(2).to_string())


if __name__ == "__main__":
    main()
