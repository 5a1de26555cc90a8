"""fairseq evaluation as ``fairseq-validate`` does it, for sweeps over fairseq runs (bert/ and gpt/).

    import lawa_fairseq as lf
    task, model, criterion, cfg = lf.load_fairseq(Path("runs/bert/checkpoint10.pt"), data=None)
    batches = lf.fixed_batches(task, model, cfg, "valid", batch_size=16)
    model.load_state_dict(averaged_state, strict=True, model_cfg=cfg.model)
    bits = lf.valid_loss(task, model, criterion, batches, torch.device("cpu"))

The task, model and criterion are built once from one checkpoint of the trajectory, exactly as
fairseq-validate builds them; the batches are collated once (the same size-sorted, unshuffled batches and, for
masked LMs, the same masks in every call); each evaluation is ``task.valid_step`` + ``task.reduce_metrics``,
which gives the loss in bits that fairseq prints (all digits kept). This works for any fairseq task, masked or
causal language modelling alike. fairseq is imported only when these functions are called.
:func:`update_trajectory` reads a run saved every N updates (``checkpoint_{epoch}_{updates}.pt``) as a
``lawa_trajectory.Trajectory`` by update count, filling the slots fairseq names ``checkpoint{epoch}.pt``.

Checkpoints are loaded safely: ``bert/lawa_plugin`` registers the few harmless classes fairseq checkpoints
hold, so fairseq's own ``torch.load`` keeps ``weights_only=True``; ``trust=True`` lifts that for one load.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import pickle
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lawa_trajectory import Trajectory
from lawa_utils import LawaError, load_checkpoint

__all__ = ["SPLIT_NAMES", "fixed_batches", "load_fairseq", "register_safe_globals", "trusted_loading",
           "update_trajectory", "valid_loss"]

UPDATE_CHECKPOINT = re.compile(r"^checkpoint_(\d+)_(\d+)\.pt$")
EPOCH_CHECKPOINT = re.compile(r"^checkpoint(\d+)\.pt$")

SPLIT_NAMES = {"valid": "validation", "train": "training"}
_PLUGIN = Path(__file__).resolve().parent / "bert" / "lawa_plugin" / "__init__.py"


def register_safe_globals() -> None:
    """Allow the harmless classes fairseq checkpoints hold for every ``weights_only`` load (bert/lawa_plugin).

        >>> register_safe_globals()      # before fairseq reads a checkpoint

    Idempotent. Needed again after a ``torch.serialization.safe_globals(...)`` block in this process: on exit
    such a block removes its classes from the allowlist even if they had been registered before it.
    """
    plugin = sys.modules.get("lawa_plugin")
    if plugin is None:  # the --user-dir plugin is a folder of bert/, not an installed package
        spec = importlib.util.spec_from_file_location("lawa_plugin", _PLUGIN)
        plugin = sys.modules["lawa_plugin"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(plugin)
    plugin.register()


@contextlib.contextmanager
def trusted_loading(allowed: bool) -> Iterator[None]:
    """Within the block, let fairseq's own ``torch.load`` unpickle anything when ``allowed`` (--trust-checkpoints).

        >>> with trusted_loading(args.trust_checkpoints):
        ...     checkpoint_utils.load_model_ensemble_and_task([path])
    """
    if not allowed:
        yield
        return
    old = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = old


def load_fairseq(template: Path, data: str | None, trust: bool = False, *, hint: str = "bert/prepare_data.sh"):
    """``(task, model, criterion, cfg)`` as fairseq-validate builds them from the checkpoint ``template``.

        >>> task, model, criterion, cfg = load_fairseq(Path("runs/bert/checkpoint10.pt"), "data-bin/ptb")

    ``data`` replaces the data folder recorded in the checkpoint (None keeps it); ``hint`` names the script
    that writes the data, for the error when it is missing. The model's weights are replaced per cell later.
    """
    with warnings.catch_warnings():  # fairseq 0.12 uses APIs torch 2.x deprecates: noise, not news for users
        warnings.simplefilter("ignore", FutureWarning)
        from fairseq import checkpoint_utils

    overrides = {"data": str(data)} if data else None
    register_safe_globals()
    try:
        with trusted_loading(trust):
            models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(template)], overrides)
    except pickle.UnpicklingError as exc:
        needs = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise LawaError(f"{template} was refused by safe loading (it needs "
                        f"{needs.group(1) if needs else 'an object outside the allowlist'}); if you trust its "
                        "source, rerun with --trust-checkpoints") from None
    except FileNotFoundError as exc:
        raise LawaError(f"fairseq data not found ({exc}); pass DATA, the fairseq-preprocess folder with "
                        f"dict.txt ({hint} writes it)") from None
    except Exception as exc:  # a damaged file fails inside torch.load in many ways
        raise LawaError(f"fairseq could not load {template} ({type(exc).__name__}: {exc})"[:300]) from None
    criterion = task.build_criterion(cfg.criterion)
    criterion.eval()
    model = models[0]
    model.eval()
    return task, model, criterion, cfg


def fixed_batches(task, model, cfg, subset: str, batch_size: int, max_batches: int = 0, *,
                  hint: str = "bert/prepare_data.sh") -> list:
    """The batches fairseq-validate iterates for ``subset``: all of them, or ``max_batches`` evenly spread.

        >>> batches = fixed_batches(task, model, cfg, "valid", batch_size=16)

    fairseq masks each sequence from (the task's seed, epoch 1, the sequence's index), so the masks are the
    same in every call and in fairseq-validate; the batches are collated once and reused for every cell.
    Batches are sorted by length, so ``max_batches`` takes them evenly spread rather than the shortest first.
    """
    from fairseq import utils

    data_dir = Path(utils.split_paths(cfg.task.data)[0])
    for suffix in (".bin", ".idx"):
        if not (data_dir / f"{subset}{suffix}").is_file():
            raise LawaError(f"{data_dir / (subset + suffix)} is missing: the {SPLIT_NAMES.get(subset, subset)} "
                            f"split of the fairseq data ({hint} writes it); pass DATA if it moved")
    task.load_dataset(subset, combine=False, epoch=1, task_cfg=cfg.task)
    dataset = task.dataset(subset)
    epoch_itr = task.get_batch_iterator(
        dataset=dataset,
        max_tokens=None,
        max_sentences=batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True,  # fairseq-validate --skip-invalid-size-inputs-valid-test
        required_batch_size_multiple=8,
        seed=cfg.common.seed,
        num_workers=0,
    )
    if not max_batches:
        with warnings.catch_warnings():  # fairseq asks for pinned memory even on machines without a GPU
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            return list(epoch_itr.next_epoch_itr(shuffle=False))
    batches = epoch_itr.frozen_batches
    chosen = sorted({round(i * (len(batches) - 1) / max(1, max_batches - 1)) for i in range(max_batches)})
    dataset.set_epoch(1)
    return [dataset.collater([dataset[j] for j in batches[i]]) for i in chosen]


@torch.no_grad()
def valid_loss(task, model, criterion, batches: list, device: torch.device) -> float:
    """The loss in bits over ``batches``, as fairseq-validate computes it (``valid_step`` + ``reduce_metrics``).

        >>> bits = valid_loss(task, model, criterion, batches, torch.device("cpu"))

    Masked-LM loss for a masked_lm task, next-token loss for language_modeling: whatever the criterion is.
    """
    from fairseq import utils
    from fairseq.logging import metrics

    log_outputs: list[Any] = []
    for sample in batches:
        sample = utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample
        log_outputs.append(task.valid_step(sample, model, criterion)[2])
    with metrics.aggregate(new_root=True) as agg:
        task.reduce_metrics(log_outputs, criterion)
        return float(agg["loss"].avg)  # unrounded; fairseq prints round(avg, 3)


def _num_updates(path: Path, trust: bool) -> int:
    try:
        return int(load_checkpoint(path, trust=trust)["optimizer_history"][-1]["num_updates"])
    except (KeyError, IndexError, TypeError):
        raise LawaError(f"{path} is not a fairseq checkpoint (no optimizer_history with num_updates)") from None


def update_trajectory(ckpt_dir: str | Path, interval: int | None = None, *, trust: bool = False) -> Trajectory:
    """A fairseq run saved every ``interval`` updates (default: the gcd of the saved update counts), by update.

        >>> update_trajectory("runs/gpt/lr-high/checkpoints").positions        # doctest: +SKIP
        (200, 400, 600, ...)

    ``checkpoint_{epoch}_{updates}.pt`` files, with the gaps at epoch ends filled from ``checkpoint{E}.pt``;
    every update count from the first to the last must be there.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise LawaError(f"checkpoint directory {ckpt_dir} does not exist")
    found: dict[int, Path] = {}
    epoch_files = []
    for p in sorted(ckpt_dir.iterdir()):
        if m := UPDATE_CHECKPOINT.match(p.name):
            found[int(m.group(2))] = p
        elif EPOCH_CHECKPOINT.match(p.name):
            epoch_files.append(p)
    if not found:
        raise LawaError(f"{ckpt_dir} has no checkpoint_{{epoch}}_{{updates}}.pt files (train with "
                        "--save-interval-updates N --keep-interval-updates -1: gpt/train.sh does)")
    interval = math.gcd(*found) if interval is None else interval
    if interval < 1:
        raise LawaError(f"--interval must be a positive number of updates, got {interval}")
    off_grid = sorted(u for u in found if u % interval)
    if off_grid:
        raise LawaError(f"{found[off_grid[0]].name} is not on the grid of {interval} updates (--interval)")
    first, last = min(found), max(found)
    if any(u not in found for u in range(first, last + 1, interval)):  # fairseq names those checkpoint{E}.pt
        for p in epoch_files:
            u = _num_updates(p, trust)
            if u % interval == 0 and first < u < last and u not in found:
                found[u] = p
    gaps = [u for u in range(first, last + 1, interval) if u not in found]
    if gaps:
        raise LawaError(f"{ckpt_dir}: no checkpoint for update {gaps[0]} (checkpoints every {interval} updates "
                        f"from {first} to {last}; the one ending an epoch is checkpoint{{E}}.pt: do not delete "
                        "those or train with --no-epoch-checkpoints)")
    updates = sorted(found)
    return Trajectory(ckpt_dir, "fairseq-updates", "step", tuple(updates), tuple(found[u] for u in updates))
