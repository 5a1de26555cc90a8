#!/usr/bin/env python
"""Trainable Weight Averaging (TWA) over a saved trajectory: train the averaging coefficients of checkpoints
A … B, recompute BatchNorm, evaluate, and append the rows to the results CSV beside LAWA's.

TWA (Li et al., ICLR 2023) runs SGD in the linear span of the n = B − A + 1 checkpoints' parameters: the
gradient is replaced by its projection Pᵀ(P g) onto an orthonormal basis P of them (``lawa_twa``). It
starts from their mean, the SWA point (``--init mean``), or from checkpoint B (``--init last``). Defaults
are the reference's (lr 2, momentum 0.9, wd 1e-5, the step schedule) with 2 epochs instead of its 10.
Rows: method ``twa``, k = n, epoch = B, so a TWA cell sits beside the LAWA window of the same checkpoints.

    python imagenet/train_twa.py fashion-mnist --ckpt-dir runs/fmnist --range 5:10 --save runs/fmnist/twa10.pt
    python imagenet/train_twa.py /data/imagenet --ckpt-dir lawa-resnet50 --range 81:90 --bn-batches 0

Memory: n × D float32 for the basis (ResNet-50: 102 MB per checkpoint) on top of the model; more than
``--max-memory-gb`` (default: half the physical memory) is refused before anything is read.
How the trajectory was trained (arch, image size, training subset, batch size, optimizer, seed) is read from
``CKPT_DIR/args.json`` when main.py wrote it, as ``evaluate_lawa.py`` does. The run's record (command,
versions, basis size, time, metrics) goes to ``twa_A-B_seedS.json`` beside the results CSV.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common
import torch
import torch.nn.functional as F

import lawa_twa as twa
from lawa_utils import (
    LawaError,
    append_rows,
    atomic_write,
    done_cells,
    find_checkpoints,
    recompute_bn,
    run_info,
    save_checkpoint,
)

PROG = "train_twa.py"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("data", metavar="DIR", help="as for main.py: ImageFolder root, or 'fashion-mnist'")
    parser.add_argument("--ckpt-dir", required=True, type=Path, help="directory with checkpoint{E}.pt")
    parser.add_argument("--range", required=True, metavar="A:B", dest="ckpt_range",
                        help="the checkpoints spanning the subspace: epochs A..B inclusive")
    parser.add_argument("--epochs", default=2, type=int, metavar="N", help="TWA training epochs (default: 2)")
    parser.add_argument("--lr", default=2.0, type=float, metavar="LR",
                        help="TWA learning rate (default: 2, the reference's CIFAR setting; it diverged on the "
                        "embedded appendix runs, where reproduce_all.sh uses 0.05)")
    parser.add_argument("--momentum", default=0.9, type=float, metavar="M", help="momentum (default: 0.9)")
    parser.add_argument("--wd", "--weight-decay", default=1e-5, type=float, metavar="W", dest="weight_decay",
                        help="weight decay, applied inside the subspace (default: 1e-5)")
    parser.add_argument("--schedule", choices=twa.TWA_SCHEDULES, default="step",
                        help="step: ×0.1 at 50%% and 75%% of the epochs; constant; linear: to 0 per iteration")
    parser.add_argument("--init", choices=["mean", "last"], default="mean",
                        help="start from the mean of the checkpoints (the SWA point) or from checkpoint B")
    parser.add_argument("--out", type=Path, default=None, help="results CSV (default: CKPT_DIR/results.csv)")
    parser.add_argument("--save", type=Path, default=None, metavar="PATH",
                        help="write the TWA weights here in the trainer's checkpoint format")
    parser.add_argument("--force", action="store_true", help="overwrite --save PATH if it exists")
    parser.add_argument("--max-memory-gb", type=float, default=None, metavar="G",
                        help="refuse a subspace larger than this (default: half the physical memory)")
    parser.add_argument("--basis-rtol", type=float, default=1e-6, metavar="R",
                        help="drop a checkpoint whose part outside the span of the earlier ones is below R × "
                        "its norm (default: 1e-6)")
    parser.add_argument("-p", "--print-freq", default=50, type=int, metavar="N", help="print every N batches")
    common.add_evaluation_args(parser)  # after TWA: BatchNorm recomputed and splits measured as evaluate_lawa.py
    common.add_trajectory_args(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    try:
        run(common.parse_trajectory_args(get_args_parser(), argv))
    except LawaError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def check_args(args: argparse.Namespace) -> None:
    for flag in ("epochs", "batch_size", "eval_batch_size", "print_freq"):
        if getattr(args, flag) < 1:
            raise LawaError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    for flag in ("lr", "momentum", "weight_decay", "bn_batches", "train_eval_subset"):
        if getattr(args, flag) < 0:
            raise LawaError(f"--{flag.replace('_', '-')} must be ≥ 0, got {getattr(args, flag)}")
    if args.save is not None and args.save.exists() and not args.force:
        raise LawaError(f"--save {args.save} already exists; pass --force to overwrite it")
    if args.save is not None and not args.save.parent.is_dir():
        raise LawaError(f"--save {args.save}: directory {args.save.parent} does not exist")


def run(args: argparse.Namespace) -> None:
    check_args(args)
    checkpoints = find_checkpoints(args.ckpt_dir)
    epochs = twa.twa_epochs(checkpoints, args.ckpt_range)
    first, last, n = epochs[0], epochs[-1], len(epochs)
    out = args.out or args.ckpt_dir / "results.csv"
    if not out.parent.is_dir():
        raise LawaError(f"--out {out}: directory {out.parent} does not exist")
    splits = ["train", "val"] if args.train_eval_subset else ["val"]
    if (last, n) in done_cells(out, ["twa"], splits, ("loss", "acc1", "acc5"), args.optimizer, args.seed)["twa"]:
        print(f"{PROG}: {out} already has twa rows for checkpoints {first}..{last} (seed {args.seed}); nothing to do")
        return
    common.check_data(args.data, args.dummy)
    args.arch = args.arch or common.checkpoint_arch(checkpoints[last], args.trust_checkpoints)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = common.build_datasets(args.data, image_size=args.image_size, train_subset=args.train_subset,
                                 val_subset=args.val_subset, dummy=args.dummy)
    model = common.build_model(args.arch, data.num_classes)
    max_bytes = None if args.max_memory_gb is None else int(args.max_memory_gb * 1e9)
    sub = twa.build_subspace(model, checkpoints, epochs, rtol=args.basis_rtol, max_bytes=max_bytes,
                            trust=args.trust_checkpoints)
    subspace = {"epochs": epochs, "dim": sub.dim, "dropped": sub.dropped, "parameters": sub.basis.shape[1]}
    dropped = f", dropped as dependent: {sub.dropped}" if sub.dropped else ""
    print(f"=> TWA subspace of checkpoints {first}..{last}: {sub.dim} dimensions × {sub.basis.shape[1]:,} "
          f"parameters ({sub.basis.numel() * 4 / 1e6:.1f} MB){dropped}", flush=True)
    model.load_state_dict(sub.start_state(args.init))
    model = model.to(device, memory_format=torch.channels_last)
    projector = twa.TWAProjector(sub.basis.to(device), sub.names, weight_decay=args.weight_decay)
    del sub

    generator = torch.Generator().manual_seed(args.seed)
    loader = common.make_loader(data.train, args.batch_size, args.workers, shuffle=True, drop_last=True,
                                generator=generator)
    if len(loader) == 0:
        raise LawaError(f"{len(data.train)} training images are fewer than one batch of {args.batch_size}")
    # weight decay lives in the projector (it must stay in the subspace), not in the optimizer
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=0.0)
    scheduler = twa.twa_scheduler(optimizer, args.schedule, args.epochs, len(loader))
    started = time.perf_counter()
    for epoch in range(args.epochs):
        train_one_epoch(model, loader, optimizer, scheduler, projector, device, epoch, args)
    twa_seconds = time.perf_counter() - started

    torch.manual_seed(args.seed)  # the same BN batches as evaluate_lawa.py's cells
    bn_loader = common.bn_recompute_loader(data.train, batch_size=args.batch_size, workers=args.workers,
                                           seed=args.seed, num_batches=args.bn_batches)
    recompute_bn(model, bn_loader, num_batches=args.bn_batches or None, device=device)
    loaders = common.eval_loaders(data, batch_size=args.eval_batch_size, workers=args.workers,
                                  train_subset=args.train_eval_subset, seed=args.seed)
    metrics = {split: common.to_metrics(common.evaluate(model, loader, device, True))
               for split, loader in loaders.items()}
    append_rows(out, common.tidy_rows(metrics, method="twa", k=n, epoch=last, optimizer=args.optimizer,
                                      seed=args.seed))
    record = {**run_info(), "args": vars(args), "subspace": subspace, "twa_seconds": round(twa_seconds, 3),
              "metrics": metrics}
    text = json.dumps(record, indent=2, default=str) + "\n"
    record = json.loads(text)  # plain types only: the checkpoint must load with weights_only=True
    if args.save is not None:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_checkpoint({"epoch": last, "arch": args.arch, "state_dict": state, "twa": record}, args.save,
                        force=args.force)
    atomic_write(out.parent / f"twa_{first}-{last}_seed{args.seed}.json", lambda f: f.write(text.encode()), force=True)
    val = metrics["val"]
    print(f" * TWA {first}..{last}: val loss {val['loss']:.4f} Acc@1 {val['acc1']:.3f} Acc@5 {val['acc5']:.3f}  "
          f"({twa_seconds:.1f} s of TWA training) -> {out}", flush=True)


def train_one_epoch(model, loader, optimizer, scheduler, projector, device, epoch: int, args) -> None:
    model.train()
    for i, (images, target) in enumerate(loader):
        output = model(common.to_device(images, device, channels_last=True))
        loss = F.cross_entropy(output, target.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        projector.project_(model)  # g ← Pᵀ P (g + wd·θ): the step stays in the span of the checkpoints
        optimizer.step()
        scheduler.step()
        if i % args.print_freq == 0 or i == len(loader) - 1:
            print(f"TWA epoch [{epoch + 1}/{args.epochs}][{i + 1}/{len(loader)}]  loss {loss.item():.4f}  "
                  f"lr {optimizer.param_groups[0]['lr']:.4g}", flush=True)


if __name__ == "__main__":
    main()
