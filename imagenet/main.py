#!/usr/bin/env python
"""Train an image classifier and keep a checkpoint of every epoch, so that LAWA can average them later.

LAWA (Kaddour 2022, "Stop Wasting My Time!") evaluates the average of the k latest per-epoch checkpoints
θ_{E−k+1} … θ_E; this trainer writes the trajectory, ``imagenet/evaluate_lawa.py`` sweeps (E, k) over it.

The command line is the one of pytorch/examples' ``imagenet/main.py`` (``-a``, ``-b``, ``--lr``, ``--wd``,
``--resume``, ``-e``, ``--dist-url``, ``--multiprocessing-distributed``, …) with the paper's defaults:
ResNet-50, 90 epochs, batch 256, SGD lr 0.1, momentum 0.9, wd 1e-4, a cosine schedule stepped per epoch.
Flags of this repository are in their own group. Where it differs from pytorch/examples:

- ``--save-dir`` gets ``checkpoint{E}.pt`` after every epoch E (1-based, written atomically; ``state_dict``
  keys without ``module.``; optimizer, scheduler and RNG state for an exact ``--resume``), ``args.json``
  (command, versions, git sha, hardware) and ``log.csv`` in the repository's tidy schema.
- ``-b`` is the total batch over all processes, also under ``torchrun``; the last incomplete batch of an
  epoch is dropped (a batch of one image breaks BatchNorm).
- ``data`` may be ``fashion-mnist``: the embedded CPU-sized default (see ``common.py``).
- ``--seed`` defaults to 0, so that every run is reproducible: on CPU the same seed gives the same log.csv.

    python imagenet/main.py fashion-mnist -a resnet18 --epochs 16 -b 128 --lr 0.4 --wd 5e-4 \\
        --train-subset 8192 -j 0 --save-dir runs/fmnist
    torchrun --nproc-per-node 4 imagenet/main.py /data/imagenet --save-dir runs/imagenet
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import common
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from torch.utils.data.distributed import DistributedSampler

from lawa_utils import (
    LawaError,
    append_rows,
    atomic_write,
    load_checkpoint,
    read_results,
    run_info,
    save_checkpoint,
    split_checkpoint,
)

PROG = "main.py"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="PyTorch ImageNet Training, one checkpoint per epoch for LAWA", add_help=add_help
    )
    parser.add_argument("data", metavar="DIR", nargs="?", default="imagenet",
                        help="ImageFolder root with train/ and val/, or 'fashion-mnist' (default: imagenet)")
    parser.add_argument("-a", "--arch", metavar="ARCH", default="resnet50",
                        help="any torchvision classification model (default: resnet50)")
    parser.add_argument("-j", "--workers", default=4, type=int, metavar="N",
                        help="number of data loading workers (default: 4)")
    parser.add_argument("--epochs", default=90, type=int, metavar="N", help="number of total epochs to run")
    parser.add_argument("--start-epoch", default=0, type=int, metavar="N",
                        help="manual epoch number (useful on restarts)")
    parser.add_argument("-b", "--batch-size", default=256, type=int, metavar="N",
                        help="mini-batch size (default: 256), the total over all processes")
    parser.add_argument("--lr", "--learning-rate", default=0.1, type=float, metavar="LR",
                        help="initial learning rate", dest="lr")
    parser.add_argument("--momentum", default=0.9, type=float, metavar="M", help="momentum")
    parser.add_argument("--wd", "--weight-decay", default=1e-4, type=float, metavar="W",
                        help="weight decay (default: 1e-4)", dest="weight_decay")
    parser.add_argument("-p", "--print-freq", default=10, type=int, metavar="N",
                        help="print frequency (default: 10)")
    parser.add_argument("--resume", default="", type=str, metavar="PATH",
                        help="path to latest checkpoint (default: none)")
    parser.add_argument("-e", "--evaluate", dest="evaluate", action="store_true",
                        help="evaluate model on validation set")
    parser.add_argument("--pretrained", dest="pretrained", action="store_true",
                        help="use pre-trained model (from the torch hub cache; nothing is downloaded)")
    parser.add_argument("--world-size", default=-1, type=int,
                        help="number of nodes for distributed training (torchrun: from WORLD_SIZE)")
    parser.add_argument("--rank", default=-1, type=int,
                        help="node rank for distributed training (torchrun: from RANK)")
    parser.add_argument("--dist-url", default="env://", type=str,
                        help="url used to set up distributed training (default: env://, as torchrun sets)")
    parser.add_argument("--dist-backend", default=None, type=str,
                        help="distributed backend (default: nccl on GPUs, gloo on CPU)")
    parser.add_argument("--seed", default=0, type=int, help="seed for initializing training (default: 0)")
    parser.add_argument("--gpu", default=None, type=int, help="GPU id to use.")
    parser.add_argument("--multiprocessing-distributed", action="store_true",
                        help="launch N processes per node (N = GPUs, or --nproc-per-node); "
                        "the fastest way to use PyTorch for either single node or multi node data parallel training")
    parser.add_argument("--dummy", action="store_true", help="use fake data to benchmark")

    lawa = parser.add_argument_group("LAWA / this repository")
    lawa.add_argument("--save-dir", default="runs/imagenet", metavar="DIR",
                      help="where checkpoint{E}.pt, args.json and log.csv go (default: runs/imagenet)")
    lawa.add_argument("--force", action="store_true",
                      help="overwrite checkpoints and log rows of later epochs already in --save-dir")
    lawa.add_argument("--trust-checkpoints", action="store_true",
                      help="--resume: allow arbitrary unpickling (can run code), only for a file you trust")
    lawa.add_argument("--optimizer", choices=["sgd", "lookahead"], default="sgd",
                      help="SGD, or Lookahead over SGD (Zhang et al. 2019; the paper's Appendix B)")
    lawa.add_argument("--lookahead-alpha", default=0.8, type=float, metavar="A",
                      help="Lookahead slow-weight step size α (default: 0.8, as in the paper)")
    lawa.add_argument("--lookahead-k", default=5, type=int, metavar="K",
                      help="Lookahead: fast steps between slow-weight updates (default: 5)")
    lawa.add_argument("--train-subset", default=None, type=int, metavar="N",
                      help="train on a fixed random subset of N images (the same for every --seed)")
    lawa.add_argument("--val-subset", default=None, type=int, metavar="N",
                      help="validate on a fixed random subset of N images")
    lawa.add_argument("--image-size", default=None, type=int, metavar="S",
                      help="input size S×S (default: 224; fashion-mnist: 28, its native size)")
    lawa.add_argument("--eval-batch-size", default=None, type=int, metavar="N",
                      help="validation batch size per process (default: the training batch per process)")
    lawa.add_argument("--nproc-per-node", default=None, type=int, metavar="N",
                      help="--multiprocessing-distributed: processes per node (default: GPUs, or 1 on CPU)")
    return parser


# --------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> torch.nn.Module | None:
    """Parse, check, launch; returns the trained (unwrapped) model when run in this process."""
    args = get_args_parser().parse_args(argv)
    try:
        check_args(args)
        if not args.multiprocessing_distributed:
            return main_worker(None, 1, args)
        nprocs = args.nproc_per_node or max(torch.cuda.device_count(), 1)
        args.world_size = nprocs * max(args.world_size, 1)
        if args.dist_url == "env://" and "MASTER_ADDR" not in os.environ:  # one node: rendezvous here
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        mp.spawn(spawned_worker, nprocs=nprocs, args=(nprocs, args))
    except LawaError as exc:
        fail(exc)
    except mp.ProcessExitedException as exc:  # a worker already printed its error
        sys.exit(exc.exit_code or 1)
    return None


def fail(exc: LawaError) -> None:
    print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad input before any process starts, with one line that says what to do."""
    common.check_data(args.data, args.dummy)
    if args.arch not in common.MODEL_NAMES:
        raise LawaError(f"unknown architecture '{args.arch}' (any torchvision classification model, e.g. resnet18)")
    for flag in ("epochs", "batch_size", "lookahead_k", "train_subset", "val_subset", "image_size",
                 "eval_batch_size", "nproc_per_node"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise LawaError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if not 0.0 < args.lookahead_alpha <= 1.0:
        raise LawaError(f"--lookahead-alpha must be in (0, 1], got {args.lookahead_alpha}")
    if args.resume and not Path(args.resume).is_file():
        raise LawaError(f"--resume {args.resume}: no such checkpoint file")
    args.image_size = args.image_size or common.default_image_size(args.data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawned_worker(local_rank: int, nprocs: int, args: argparse.Namespace) -> None:
    try:
        main_worker(local_rank, nprocs, args)
    except LawaError as exc:
        fail(exc)


# --------------------------------------------------------------------------------------------------
# One process
# --------------------------------------------------------------------------------------------------


@dataclass
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_process(local_rank: int | None, nprocs: int, args: argparse.Namespace) -> Context:
    """Rank, world size and device of this process; joins the process group when there is more than one."""
    if args.multiprocessing_distributed:
        rank, world_size = max(args.rank, 0) * nprocs + local_rank, args.world_size
    else:  # one process, or one of torchrun's (which sets RANK, WORLD_SIZE, LOCAL_RANK)
        world_size = args.world_size if args.world_size != -1 else int(os.environ.get("WORLD_SIZE", 1))
        rank = args.rank if args.rank != -1 else int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", args.gpu if args.gpu is not None else local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if args.multiprocessing_distributed:  # torchrun already gives each process its share of threads
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    if world_size > 1:
        backend = args.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, init_method=args.dist_url, world_size=world_size, rank=rank)
    return Context(rank, world_size, device)


def main_worker(local_rank: int | None, nprocs: int, args: argparse.Namespace) -> torch.nn.Module:
    ctx = setup_process(local_rank, nprocs, args)
    try:
        return train_or_evaluate(ctx, args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_or_evaluate(ctx: Context, args: argparse.Namespace) -> torch.nn.Module:
    """pytorch/examples' main_worker after the process set-up; returns the unwrapped model."""
    if args.batch_size % ctx.world_size:
        raise LawaError(f"-b {args.batch_size} is not divisible by the {ctx.world_size} processes")
    torch.manual_seed(args.seed)
    data = common.build_datasets(args.data, image_size=args.image_size, train_subset=args.train_subset,
                                 val_subset=args.val_subset, dummy=args.dummy)
    model = common.build_model(args.arch, data.num_classes, args.pretrained)
    model = model.to(ctx.device, memory_format=torch.channels_last)  # measured 1.5× faster on CPU
    ddp_model = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None) \
        if ctx.world_size > 1 else model
    optimizer = build_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    wall_seconds = resume(args.resume, model, optimizer, scheduler, args) if args.resume else 0.0
    fast_forward(scheduler, args.start_epoch)

    per_process = args.batch_size // ctx.world_size
    val_loader = common.make_loader(Subset(data.val, range(ctx.rank, len(data.val), ctx.world_size)),
                                    args.eval_batch_size or per_process, args.workers)
    if args.evaluate:
        metrics = common.to_metrics(all_reduce(common.evaluate(model, val_loader, ctx.device, True), ctx))
        if ctx.is_main:
            print(f" * Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f} Loss {metrics['loss']:.4f}")
        return model
    sampler = DistributedSampler(data.train, ctx.world_size, ctx.rank, shuffle=True, seed=args.seed)
    train_loader = common.make_loader(data.train, per_process, args.workers, sampler=sampler, drop_last=True)
    if len(train_loader) == 0:
        raise LawaError(f"{len(sampler)} training images per process are fewer than one batch of {per_process}")

    save_dir = Path(args.save_dir)
    check_save_dir(save_dir, args)  # every rank: the same error everywhere, no rank left waiting
    if ctx.is_main:
        start_records(save_dir, args, ctx)
    for epoch in range(args.start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        train_sums = train_one_epoch(ddp_model, train_loader, optimizer, epoch, ctx, args)
        wall_seconds += time.perf_counter() - started
        scheduler.step()
        sync_buffers(model, ctx)  # BatchNorm statistics of rank 0, the ones the checkpoint holds
        metrics = {
            "train": common.to_metrics(all_reduce(train_sums, ctx)),
            "val": common.to_metrics(all_reduce(common.evaluate(model, val_loader, ctx.device, True), ctx)),
        }
        if ctx.is_main:
            end_epoch(save_dir, epoch + 1, model, optimizer, scheduler, metrics, wall_seconds, args)
    return model


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    sgd = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.optimizer == "sgd":
        return sgd
    try:  # pytorch-optimizer's Lookahead: φ ← φ + α(θ − φ), θ ← φ every k steps; its state_dict holds φ
        from pytorch_optimizer import Lookahead
    except ImportError:
        raise LawaError("--optimizer lookahead needs the package pytorch-optimizer (bash setup.sh)") from None
    return Lookahead(sgd, k=args.lookahead_k, alpha=args.lookahead_alpha)


def train_one_epoch(model, loader, optimizer, epoch: int, ctx: Context, args) -> torch.Tensor:
    """One pass over this process's shard; returns common.evaluate-style sums of the running metrics."""
    model.train()
    sums = torch.zeros(4, dtype=torch.float64)
    started = time.perf_counter()
    for i, (images, target) in enumerate(loader):
        images = common.to_device(images, ctx.device, channels_last=True)
        target = target.to(ctx.device, non_blocking=True)
        output = model(images)
        loss = F.cross_entropy(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(target)
        sums += torch.tensor([loss.item() * n, *common.count_correct(output.detach(), target), n], dtype=torch.float64)
        if ctx.is_main and (i % args.print_freq == 0 or i == len(loader) - 1):
            m = common.to_metrics(sums)
            rate = sums[3].item() / (time.perf_counter() - started)
            print(f"Epoch: [{epoch}][{i + 1:>{len(str(len(loader)))}}/{len(loader)}]  Loss {loss.item():.4e} "
                  f"({m['loss']:.4e})  Acc@1 {m['acc1']:6.2f}  Acc@5 {m['acc5']:6.2f}  {rate:.0f} img/s", flush=True)
    return sums


def all_reduce(sums: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.world_size == 1:
        return sums
    sums = sums.to(ctx.device)
    dist.all_reduce(sums)
    return sums.cpu()


def sync_buffers(model: torch.nn.Module, ctx: Context) -> None:
    """DDP syncs buffers at the start of each forward, so after the last one each rank holds its own."""
    if ctx.world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# --------------------------------------------------------------------------------------------------
# Checkpoints, records, resume
# --------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    # Only torch's generators: the sampler shuffles with its own (seed, epoch) generator, and the data
    # loader's workers derive their seeds from torch's, so nothing else holds state a resume needs.
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def fast_forward(scheduler, epoch: int) -> None:
    """Bring the schedule to ``epoch`` (a checkpoint without scheduler state, or --start-epoch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
        while scheduler.last_epoch < epoch:
            scheduler.step()


def resume(path: str, model, optimizer, scheduler, args: argparse.Namespace) -> float:
    """Load ``path`` (ours or the pytorch/examples format); returns the training seconds it had recorded."""
    ckpt = load_checkpoint(path, trust=args.trust_checkpoints, mmap=False)
    _, state = split_checkpoint(ckpt, name=path)  # also strips pytorch/examples' `module.` prefix
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # the first line only says "Error(s) in loading state_dict"
        detail = " ".join(str(exc).split())[:200]
        raise LawaError(f"{path} does not fit -a {args.arch}: {detail}") from None
    if not isinstance(ckpt.get("epoch"), int):
        raise LawaError(f"{path} has no 'epoch': not a training checkpoint")
    args.start_epoch = ckpt["epoch"]
    trained_with = ckpt.get("args", {}).get("optimizer", "sgd")
    if "optimizer" in ckpt and trained_with != args.optimizer:
        raise LawaError(f"{path} was trained with --optimizer {trained_with}, not {args.optimizer}")
    if "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if "T_max" in ckpt.get("scheduler", {}):  # ours; pytorch/examples' StepLR state is not ours to load
        scheduler.load_state_dict(ckpt["scheduler"])
    if "rng" in ckpt:
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    print(f"=> resumed from {path} (epoch {args.start_epoch})", flush=True)
    return float(ckpt.get("wall_seconds", 0.0))


def check_save_dir(save_dir: Path, args: argparse.Namespace) -> None:
    later = sorted(
        (int(p.stem[len("checkpoint"):]), p.name)
        for p in save_dir.glob("checkpoint*.pt")
        if p.stem[len("checkpoint"):].isdigit() and int(p.stem[len("checkpoint"):]) > args.start_epoch
    )
    if later and not args.force:
        raise LawaError(
            f"{save_dir} already holds {later[0][1]}: resume with --resume {save_dir / later[-1][1]}, "
            "choose another --save-dir, or pass --force to overwrite"
        )


def start_records(save_dir: Path, args: argparse.Namespace, ctx: Context) -> None:
    """args.json for this run (earlier runs into the same directory kept under 'previous'); log.csv cut
    back to the epochs before the one training starts from, so a resumed run continues it exactly."""
    save_dir.mkdir(parents=True, exist_ok=True)
    record = {**run_info(), "args": vars(args), "world_size": ctx.world_size}
    path = save_dir / "args.json"
    if path.exists() and args.start_epoch > 0:
        old = json.loads(path.read_text())
        record["previous"] = [*old.pop("previous", []), old]
    text = json.dumps(record, indent=2, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()), force=True)
    log = save_dir / "log.csv"
    if log.exists():
        rows = read_results(log)
        kept = rows[rows["epoch"] <= args.start_epoch]
        if len(kept) < len(rows):
            print(f"=> {log}: dropping rows of epochs after {args.start_epoch}", flush=True)
            text = kept.to_csv(index=False)
            atomic_write(log, lambda f: f.write(text.encode()), force=True)


def end_epoch(save_dir: Path, epoch: int, model, optimizer, scheduler, metrics, wall_seconds, args) -> None:
    """Log rows first, then the checkpoint: a crash in between leaves rows that a resume cuts back."""
    rows = common.tidy_rows(metrics, method="baseline", k=1, epoch=epoch, optimizer=args.optimizer,
                            seed=args.seed, wall_seconds=wall_seconds)
    append_rows(save_dir / "log.csv", rows)
    checkpoint = {
        "epoch": epoch,
        "arch": args.arch,
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "wall_seconds": wall_seconds,
        "metrics": metrics,
        "args": vars(args),
    }
    save_checkpoint(checkpoint, save_dir / f"checkpoint{epoch}.pt", force=True)
    train, val = metrics["train"], metrics["val"]
    print(f" * Epoch {epoch}/{args.epochs}  train loss {train['loss']:.4f} Acc@1 {train['acc1']:.2f}  val loss "
          f"{val['loss']:.4f} Acc@1 {val['acc1']:.3f} Acc@5 {val['acc5']:.3f}  ({wall_seconds:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
