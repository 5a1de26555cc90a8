"""Data, models and evaluation shared by the trainer (main.py), the averaging sweep (evaluate_lawa.py) and
TWA (train_twa.py).

They must see the same images, the same model and the same metrics, so these live here once::

    data = build_datasets("fashion-mnist", image_size=28, train_subset=8192)
    model = build_model("resnet18", data.num_classes)
    sums = evaluate(model, make_loader(data.val, 1024, workers=0), torch.device("cpu"))
    print(to_metrics(sums))        # {'loss': ..., 'acc1': ..., 'acc5': ...}, accuracies in percent

``data`` is an ImageFolder root with ``train/`` and ``val/`` (ImageNet as in the paper, or CIFAR exported
the same way) or the word ``fashion-mnist``: the Debian package ``dataset-fashion-mnist``'s 60k/10k real
28×28 grey images, repeated to 3 channels. Nothing is ever downloaded.

The commands that read a saved trajectory (evaluate_lawa.py, train_twa.py) share its flags, how they default
to ``CKPT_DIR/args.json``, the BatchNorm recompute batches and the evaluation splits::

    parser = argparse.ArgumentParser(); parser.add_argument("--ckpt-dir", type=Path)
    add_evaluation_args(parser); add_trajectory_args(parser)
    args = parse_trajectory_args(parser, argv)       # flags > CKPT_DIR/args.json > defaults
    loaders = eval_loaders(data, batch_size=args.eval_batch_size, workers=args.workers,
                           train_subset=args.train_eval_subset, seed=args.seed)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, Subset

from lawa_utils import LawaError, load_checkpoint

__all__ = [
    "DEFAULT_BN_BATCHES",
    "FASHION_MNIST",
    "MODEL_NAMES",
    "TRAJECTORY_FLAGS",
    "Datasets",
    "add_evaluation_args",
    "add_trajectory_args",
    "bn_recompute_loader",
    "build_datasets",
    "build_model",
    "check_data",
    "checkpoint_arch",
    "default_image_size",
    "eval_loaders",
    "evaluate",
    "fixed_permutation",
    "make_loader",
    "parse_trajectory_args",
    "tidy_rows",
    "to_device",
    "to_metrics",
    "trajectory_defaults",
]

FASHION_MNIST = "fashion-mnist"
# The Debian package's files; FASHION_MNIST_DIR points elsewhere (other distributions, tests).
FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530  # over the 60k training images
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Subsets are drawn with this fixed seed, not --seed: runs with different seeds see the same images and
# differ only in initialisation and batch order.
SUBSET_SEED = 0
# BatchNorm recompute on the first N training batches instead of the paper's full pass. Measured on the
# embedded trajectory (resnet18, 8192 images = 64 batches of 128; 8 cells: k=2,4 × E=4,8,12,16; 2000 val
# images), largest |Δ val top-1| against a full pass: 1 batch 1.5 points, 2: 1.15, 4: 0.75, 8: 0.4,
# 16: 0.15, 32: 0.35 (7 images: noise); |Δ val loss| ≤ 0.004 from 8 batches on. A full ImageNet pass per
# cell would cost more than the rest of the sweep together. --bn-batches 0 does the full pass.
DEFAULT_BN_BATCHES = 32
# How a trajectory was trained: read from CKPT_DIR/args.json (main.py writes it) by the commands that read
# the trajectory, unless given on their command line.
TRAJECTORY_FLAGS = ("arch", "image_size", "train_subset", "val_subset", "optimizer", "seed", "batch_size")

MODEL_NAMES = sorted(torchvision.models.list_models(module=torchvision.models))


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass
class Datasets:
    train: Dataset  # with training augmentation (ImageFolder); what the trainer and BN recompute see
    train_eval: Dataset  # the same images with the evaluation transform, for train loss/accuracy
    val: Dataset
    num_classes: int


def default_image_size(data: str) -> int:
    return 28 if data == FASHION_MNIST else 224


def check_data(data: str, dummy: bool = False) -> None:
    """Raise LawaError saying how to get the data when it is not where ``data`` says."""
    if dummy:
        return
    if data == FASHION_MNIST:
        for split in FASHION_MNIST_FILES.values():
            for name in split:
                if not (FASHION_MNIST_DIR / name).is_file():
                    raise LawaError(
                        f"Fashion-MNIST is missing ({FASHION_MNIST_DIR / name}): run 'bash setup.sh' or "
                        "'sudo apt-get install dataset-fashion-mnist', or set FASHION_MNIST_DIR to a "
                        "folder with the four *-ubyte.gz files"
                    )
        return
    root = Path(data)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise LawaError(
                f"{root / split} is not a directory: DATA must be an ImageFolder root with train/ and val/ "
                f"(ImageNet: see imagenet/README.md), or '{FASHION_MNIST}'"
            )


def read_idx(path: Path) -> torch.Tensor:
    """Read a gzipped IDX file (the MNIST format: magic, dimension sizes, big-endian uint8 data)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # BadGzipFile is an OSError; a truncated .gz ends in EOFError
        raise LawaError(
            f"{path} is not a readable gzipped IDX file ({exc}): reinstall dataset-fashion-mnist "
            "or set FASHION_MNIST_DIR to intact files"
        ) from None
    if len(raw) < 4:
        raise LawaError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    if raw[:3] != b"\x00\x00\x08" or ndim not in (1, 3):
        raise LawaError(f"{path} is not an IDX file of unsigned bytes")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8)
    if data.numel() != torch.Size(shape).numel():
        raise LawaError(f"{path} is truncated ({data.numel()} bytes for shape {shape})")
    return data.reshape(shape)


class GreyImages(Dataset):
    """uint8 grey images (N, H, W) → normalised float (3, S, S), repeated to 3 channels for ImageNet models."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int):
        self.images, self.labels, self.image_size = images, labels.long(), image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (self.images[i].float().div_(255) - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x[None, None], size=self.image_size, mode="bilinear", antialias=True)[0, 0]
        return x.expand(3, -1, -1), self.labels[i]


def fixed_permutation(n: int, seed: int = SUBSET_SEED) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _first_of_permutation(dataset: Dataset, n: int | None, what: str) -> Dataset:
    if n is None:
        return dataset
    if not 0 < n <= len(dataset):
        raise LawaError(f"{what} must be between 1 and {len(dataset)} (the dataset's size), got {n}")
    return Subset(dataset, fixed_permutation(len(dataset))[:n].sort().values.tolist())


def build_datasets(
    data: str,
    *,
    image_size: int | None = None,
    train_subset: int | None = None,
    val_subset: int | None = None,
    dummy: bool = False,
) -> Datasets:
    """The training and validation sets, each optionally cut to a fixed random subset of N images."""
    check_data(data, dummy)
    size = image_size or default_image_size(data)
    if dummy:  # pytorch/examples' --dummy: random images of ImageNet's shape and size
        to_tensor = torchvision.transforms.ToTensor()
        train = torchvision.datasets.FakeData(1_281_167, (3, size, size), 1000, to_tensor)
        sets = Datasets(train, train, torchvision.datasets.FakeData(50_000, (3, size, size), 1000, to_tensor), 1000)
    elif data == FASHION_MNIST:
        splits = {}
        for split, (images, labels) in FASHION_MNIST_FILES.items():
            splits[split] = GreyImages(read_idx(FASHION_MNIST_DIR / images), read_idx(FASHION_MNIST_DIR / labels), size)
        # No augmentation: the pilots trained without it, and the train pass doubles as the eval pass.
        sets = Datasets(splits["train"], splits["train"], splits["val"], 10)
    else:
        T = torchvision.transforms
        normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
        eval_tf = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), normalize])
        train, train_eval, val = (torchvision.datasets.ImageFolder(Path(data) / split, tf)
                                  for split, tf in (("train", train_tf), ("train", eval_tf), ("val", eval_tf)))
        sets = Datasets(train, train_eval, val, len(train.classes))
    return Datasets(
        _first_of_permutation(sets.train, train_subset, "--train-subset"),
        _first_of_permutation(sets.train_eval, train_subset, "--train-subset"),
        _first_of_permutation(sets.val, val_subset, "--val-subset"),
        sets.num_classes,
    )


def make_loader(dataset: Dataset, batch_size: int, workers: int, **kwargs) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, pin_memory=torch.cuda.is_available(), **kwargs
    )


# --------------------------------------------------------------------------------------------------
# Model and evaluation
# --------------------------------------------------------------------------------------------------


def build_model(arch: str, num_classes: int, pretrained: bool = False) -> torch.nn.Module:
    """A torchvision classification model; ``pretrained`` needs its weights already in the torch hub cache."""
    if arch not in MODEL_NAMES:
        raise LawaError(f"unknown architecture '{arch}' (torchvision classification models: resnet18, resnet50, …)")
    if not pretrained:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if num_classes != 1000:
        raise LawaError(f"--pretrained weights have 1000 classes, the data has {num_classes}")
    try:
        return torchvision.models.get_model(arch, weights="DEFAULT")
    except OSError as exc:  # urllib's errors: nothing is downloaded here
        raise LawaError(f"pretrained weights for {arch} are not in the torch hub cache ({exc})") from None


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return images.to(device, non_blocking=True, memory_format=fmt)


def count_correct(output: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """Number of samples whose target is the top-1 and among the top-5 predictions."""
    top = output.topk(min(5, output.shape[1]), dim=1).indices
    hits = top == target[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module, loader, device: torch.device, channels_last: bool = False
) -> torch.Tensor:
    """Sums over ``loader`` in eval mode: tensor([Σ loss, # top-1 hits, # top-5 hits, # samples]).

    Sums, not means, so that shards evaluated by several processes add up exactly (all_reduce).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    for images, target in loader:
        output = model(to_device(images, device, channels_last))
        target = target.to(device, non_blocking=True)
        loss = F.cross_entropy(output.float(), target, reduction="sum")
        sums += torch.tensor([loss.item(), *count_correct(output, target), len(target)], dtype=torch.float64)
    model.train(was_training)
    return sums


def to_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Mean loss and top-1/top-5 accuracy in percent from :func:`evaluate`-style sums."""
    loss, hit1, hit5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "acc1": 100.0 * hit1 / n, "acc5": 100.0 * hit5 / n}


def tidy_rows(
    metrics: dict[str, dict[str, float]],
    *,
    method: str,
    k: int,
    epoch: int,
    optimizer: str,
    seed: int,
    wall_seconds: float | None = None,
) -> list[dict]:
    """Rows of the repository's one tidy schema for ``{split: {metric: value}}``."""
    wall = "" if wall_seconds is None else round(wall_seconds, 3)
    return [
        {"method": method, "k": k, "epoch": epoch, "split": split, "metric": metric, "value": value,
         "wall_seconds": wall, "optimizer": optimizer, "seed": seed}
        for split, values in metrics.items()
        for metric, value in values.items()
    ]


# --------------------------------------------------------------------------------------------------
# Commands that read a saved trajectory: evaluate_lawa.py and train_twa.py
# --------------------------------------------------------------------------------------------------


def add_evaluation_args(parser: argparse.ArgumentParser) -> None:
    """BatchNorm recompute, the evaluation splits and data loading: the same flags for every averaged model."""
    parser.add_argument("--bn-batches", type=int, default=DEFAULT_BN_BATCHES, metavar="N",
                        help="recompute BatchNorm on the first N training batches of a fixed random order; 0: a "
                        f"full pass (default: {DEFAULT_BN_BATCHES})")
    parser.add_argument("--train-eval-subset", type=int, default=10_000, metavar="N",
                        help="measure train loss/accuracy on a fixed random N training images; 0: skip the "
                        "train split (default: 10000, or the whole training set if smaller)")
    parser.add_argument("-j", "--workers", default=4, type=int, metavar="N", help="data loading workers")
    parser.add_argument("--eval-batch-size", default=256, type=int, metavar="N", help="evaluation batch size")
    parser.add_argument("--trust-checkpoints", action="store_true",
                        help="allow arbitrary unpickling (can run code): only for files from a source you trust")


def add_trajectory_args(parser: argparse.ArgumentParser) -> None:
    """How the trajectory was trained: the flags :func:`parse_trajectory_args` reads from CKPT_DIR/args.json."""
    traj = parser.add_argument_group("the trajectory (default: CKPT_DIR/args.json, written by main.py)")
    traj.add_argument("-a", "--arch", default=None, help="default: the checkpoints' 'arch'")
    traj.add_argument("--image-size", type=int, default=None, metavar="S")
    traj.add_argument("--train-subset", type=int, default=None, metavar="N")
    traj.add_argument("--val-subset", type=int, default=None, metavar="N")
    traj.add_argument("--optimizer", default="sgd", help="written to the optimizer column (default: sgd)")
    traj.add_argument("--seed", type=int, default=0,
                      help="written to the seed column; seeds the order of the training batches drawn here")
    traj.add_argument("-b", "--batch-size", type=int, default=256, metavar="N",
                      help="batch size of the training batches drawn here (BatchNorm recompute, TWA steps; "
                      "default: the trajectory's training batch size)")
    traj.add_argument("--dummy", action="store_true", help="fake data, as main.py --dummy")


def trajectory_defaults(ckpt_dir: Path) -> dict:
    """The :data:`TRAJECTORY_FLAGS` main.py recorded in ``ckpt_dir/args.json``; {} when there is no such file
    (the paper's published checkpoints)."""
    recorded = Path(ckpt_dir) / "args.json"
    if not recorded.is_file():
        return {}
    try:
        trained = json.loads(recorded.read_text()).get("args", {})
    except (json.JSONDecodeError, AttributeError):
        raise LawaError(f"{recorded} is not the JSON record main.py writes") from None
    return {k: trained[k] for k in TRAJECTORY_FLAGS if k in trained}


def parse_trajectory_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` (which has ``--ckpt-dir``): flags given on the command line win over CKPT_DIR/args.json,
    which wins over the parser's defaults."""
    args = parser.parse_args(argv)
    recorded = trajectory_defaults(args.ckpt_dir)
    if recorded:
        parser.set_defaults(**recorded)
        args = parser.parse_args(argv)
    return args


def checkpoint_arch(path: Path, trust: bool = False) -> str:
    """The architecture a pytorch/examples-style checkpoint names (its ``arch``), for when -a is not given."""
    ckpt = load_checkpoint(path, trust=trust)
    arch = ckpt.get("arch") if isinstance(ckpt, dict) else None
    if not isinstance(arch, str):
        raise LawaError(f"{path} does not name its architecture: pass -a ARCH")
    return arch


def bn_recompute_loader(train: Dataset, *, batch_size: int, workers: int, seed: int, num_batches: int) -> DataLoader:
    """Training batches for ``lawa_utils.recompute_bn``: with ``num_batches`` > 0 in one fixed random order,
    so that the first N batches are a random sample and the same sample for every averaged model (0: all
    batches, in order). drop_last as in training: a batch of one image breaks BatchNorm."""
    order = fixed_permutation(len(train), seed).tolist() if num_batches else range(len(train))
    return make_loader(Subset(train, order), batch_size, workers, drop_last=True)


def eval_loaders(data: Datasets, *, batch_size: int, workers: int, train_subset: int, seed: int) -> dict:
    """The splits every averaged model is measured on: ``val``, and ``train`` on a fixed random
    ``train_subset`` images in evaluation mode (all of them if fewer; 0: no train split)."""
    loaders = {"val": make_loader(data.val, batch_size, workers)}
    if train_subset:
        n = min(train_subset, len(data.train_eval))
        subset = Subset(data.train_eval, fixed_permutation(len(data.train_eval), seed)[:n].tolist())
        loaders = {"train": make_loader(subset, batch_size, workers), **loaders}
    return loaders
