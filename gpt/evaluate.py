#!/usr/bin/env python
"""The Early-Weight-Averaging sweep over a fairseq language-model run saved every N updates: the plain
checkpoints, LAWA over k checkpoints spaced s apart (sliding, or the paper's non-overlapping blocks), EMA and
SWA of the saved checkpoints, each scored with the validation loss fairseq-validate would print.

    python gpt/evaluate.py --ckpt-dir runs/gpt/lr-high/checkpoints --ks 2,4 --spacings 1,4 \
        --ema-decays 0.5,0.75 --swa-starts 200 --out runs/gpt/lr-high/results.csv

**Checkpoints and units.** ``fairseq-train --save-interval-updates N --keep-interval-updates -1`` writes
``checkpoint_{epoch}_{updates}.pt`` every N updates. Here they are numbered i = updates / N (N: the gcd of the
update counts, or ``--interval``), so "k checkpoints spaced s apart" means the updates
E, E − s·N, …, E − (k−1)·s·N. fairseq writes the checkpoint of an update that ends an epoch only as
``checkpoint{epoch}.pt`` (its ``save_checkpoint`` skips the update name at an epoch's end), so such a
gap is filled from the epoch checkpoint holding that update count.

**Rows** (the repository's tidy CSV; losses in bits, as fairseq prints them, all digits kept): the ``epoch``
column holds the update count of the newest checkpoint in the average (E, in updates), ``k`` the number of
checkpoints averaged. Methods, from ``lawa_methods`` (one pass over the files per method):

- ``baseline``, k=1: the checkpoint itself;
- ``lawa`` (s=1) and ``ewa-s{s}`` (``lawa_methods.method_label``): the mean of the k checkpoints
  E, E−s·N, …; ``--layout blocks`` keeps only the ends whose windows tile the run without overlap (the
  paper's script), a subset of the sliding cells with the same label;
- ``ema``, k = round(1/(1−d)): ema = d·ema + (1−d)·θ at every saved checkpoint from the first (decay d per
  checkpoint, i.e. d^(1/N) per update, sampled every N updates);
- ``swa``, k = E−S+1 checkpoints: the mean of every checkpoint from update S·N… on (``--swa-starts`` in updates).

The loss is fairseq's: the task, model and criterion are built once from the newest checkpoint, as
fairseq-validate builds them (``bert/evaluate_lawa.py``'s ``load_fairseq``), the validation batches are
collated once, and each cell is ``task.valid_step`` + ``task.reduce_metrics``. Cells already in ``--out``
are skipped, so a killed sweep resumes.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bert"))  # bert/ is not a package: its scripts import lawa_plugin by name

import lawa_methods  # noqa: E402
from lawa_utils import LawaError, append_rows, load_checkpoint, read_results  # noqa: E402


def _bert_sweep():
    """bert/evaluate_lawa.py (fairseq's task, model, batches and validation loss, built as fairseq-validate
    builds them), loaded under its own name: imagenet/ has an evaluate_lawa.py too."""
    spec = importlib.util.spec_from_file_location("bert_evaluate_lawa", REPO / "bert" / "evaluate_lawa.py")
    module = sys.modules.get(spec.name)
    if module is None:
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


evaluate_lawa = _bert_sweep()

PROG = "evaluate.py"
UPDATE_CHECKPOINT = re.compile(r"^checkpoint_(\d+)_(\d+)\.pt$")
EPOCH_CHECKPOINT = re.compile(r"^checkpoint(\d+)\.pt$")


# --------------------------------------------------------------------------------------------------
# The trajectory: checkpoints on a grid of N updates
# --------------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """Checkpoints of one run, every ``interval`` updates: ``paths[i]`` holds update i·interval."""

    interval: int
    paths: dict[int, Path]

    def updates(self, i: int) -> int:
        return i * self.interval

    def index(self, updates: int, what: str) -> int:
        """The checkpoint number of ``updates``, which must be a saved checkpoint."""
        if updates % self.interval or updates // self.interval not in self.paths:
            raise LawaError(f"{what} {updates} is not a saved checkpoint (have updates {self.describe()})")
        return updates // self.interval

    def describe(self) -> str:
        first, last = min(self.paths), max(self.paths)
        return f"{self.updates(first)}..{self.updates(last)} every {self.interval}"


def _num_updates(path: Path, trust: bool) -> int:
    try:
        return int(load_checkpoint(path, trust=trust)["optimizer_history"][-1]["num_updates"])
    except (KeyError, IndexError, TypeError):
        raise LawaError(f"{path} is not a fairseq checkpoint (no optimizer_history with num_updates)") from None


def find_trajectory(ckpt_dir: str | Path, interval: int | None = None, *, trust: bool = False) -> Trajectory:
    """Read ``checkpoint_{epoch}_{updates}.pt`` in ``ckpt_dir`` (and ``checkpoint{E}.pt`` for gaps at epoch
    ends) into a :class:`Trajectory`; every update count from the first to the last must be there."""
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
    if interval is None:
        interval = math.gcd(*found)
    if interval < 1:
        raise LawaError(f"--interval must be a positive number of updates, got {interval}")
    off_grid = sorted(u for u in found if u % interval)
    if off_grid:
        raise LawaError(f"{found[off_grid[0]].name} is not on the grid of {interval} updates (--interval)")
    paths = {u // interval: p for u, p in found.items()}
    first, last = min(paths), max(paths)
    gaps = [i for i in range(first, last + 1) if i not in paths]
    if gaps:  # fairseq names the checkpoint that ends an epoch checkpoint{E}.pt instead
        for p in epoch_files:
            u = _num_updates(p, trust)
            if u % interval == 0 and u // interval in gaps:
                paths[u // interval] = p
        gaps = [i for i in gaps if i not in paths]
    if gaps:
        raise LawaError(f"{ckpt_dir}: no checkpoint for update {gaps[0] * interval} (checkpoints every {interval} "
                        f"updates from {first * interval} to {last * interval}; the one ending an epoch is "
                        "checkpoint{E}.pt: do not delete those or train with --no-epoch-checkpoints)")
    return Trajectory(interval, dict(sorted(paths.items())))


# --------------------------------------------------------------------------------------------------
# The cells: (method label, k, end checkpoint, averaged state)
# --------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What to average. ``ks``/``spacings`` in checkpoints, ``swa_starts`` and ``ends`` in checkpoint numbers."""

    ks: list[int] = field(default_factory=list)
    spacings: list[int] = field(default_factory=lambda: [1])
    blocks: bool = False
    ema_decays: list[float] = field(default_factory=list)
    swa_starts: list[int] = field(default_factory=list)
    ends: list[int] | None = None
    baseline: bool = True


def lawa_label(spacing: int) -> str:
    """``lawa`` for consecutive checkpoints, ``ewa-s{s}`` (lawa_methods.method_label) for spaced ones."""
    return "lawa" if spacing == 1 else lawa_methods.method_label("ewa", spacing=spacing)


def check_plan(plan: Plan, n_checkpoints: int) -> None:
    """Refuse windows that cannot fit the run, before any file is read."""
    for k in plan.ks:
        for s in plan.spacings:
            span = (k - 1) * s + 1
            if span > n_checkpoints:
                raise LawaError(f"k={k} checkpoints spaced {s} apart span {span} checkpoints, but the run has "
                                f"{n_checkpoints}: use a smaller k or spacing")


def iter_cells(
    checkpoints: Mapping[int, object],
    plan: Plan,
    *,
    skip: Mapping[str, set[tuple[int, int]]] | None = None,
    load: Callable | None = None,
    trust: bool = False,
) -> Iterator[tuple[str, int, int, dict[str, torch.Tensor]]]:
    """Yield ``(method label, k, end checkpoint number, averaged state)`` for every cell of ``plan``.

    ``checkpoints`` maps checkpoint numbers (updates / N) to files; ``skip`` maps a label to the (end, k)
    cells already done. Each method reads every file it needs once (lawa_methods' one-pass sweeps).
    """
    skip = skip or {}
    common = {"ends": plan.ends, "load": load, "trust": trust}
    check_plan(plan, len(checkpoints))
    sweeps = []
    if plan.baseline:
        sweeps.append(("baseline", lambda: lawa_methods.iter_method_averages(
            "lawa", checkpoints, ks=[1], skip=skip.get("baseline", ()), **common)))
    if plan.ks:
        for s in plan.spacings:
            label = lawa_label(s)
            sweeps.append((label, lambda s=s, label=label: lawa_methods.iter_method_averages(
                "ewa", checkpoints, ks=plan.ks, spacing=s, blocks=plan.blocks, skip=skip.get(label, ()), **common)))
    if plan.ema_decays:
        sweeps.append(("ema", lambda: lawa_methods.iter_method_averages(
            "ema", checkpoints, decays=plan.ema_decays, skip=skip.get("ema", ()), **common)))
    if plan.swa_starts:
        sweeps.append(("swa", lambda: lawa_methods.iter_method_averages(
            "swa", checkpoints, starts=plan.swa_starts, skip=skip.get("swa", ()), **common)))
    for label, sweep in sweeps:
        for end, k, state in sweep():
            yield label, k, end, state


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", default=None, metavar="DATA",
                        help="fairseq-preprocess output folder (default: the one recorded in the checkpoints)")
    parser.add_argument("--ckpt-dir", required=True, type=Path, help="directory with checkpoint_{epoch}_{updates}.pt")
    parser.add_argument("--interval", type=int, default=None,
                        help="updates between checkpoints, N (default: the gcd of the saved update counts)")
    parser.add_argument("--ks", default="2,4", help="LAWA window sizes k in checkpoints (default: 2,4; '' for none)")
    parser.add_argument("--spacings", default="1,4",
                        help="spacings s between averaged checkpoints, in checkpoints (default: 1,4)")
    parser.add_argument("--layout", choices=["sliding", "blocks"], default="sliding",
                        help="sliding: a window ending at every checkpoint; blocks: only non-overlapping windows "
                        "(the paper's script)")
    parser.add_argument("--ema-decays", default="0.5,0.75",
                        help="EMA decays per saved checkpoint (default: 0.5,0.75, i.e. k=2,4; '' for none)")
    parser.add_argument("--swa-starts", default="",
                        help="SWA start points in updates, each a saved checkpoint (default: none)")
    parser.add_argument("--updates", default=None, metavar="A:B",
                        help="end checkpoints to evaluate, in updates: 'A:B', 'A:B:STEP' or 'U' (default: all)")
    parser.add_argument("--no-baseline", action="store_true", help="do not evaluate the plain checkpoints")
    parser.add_argument("--out", type=Path, default=None, help="results CSV (default: CKPT_DIR/results.csv)")
    parser.add_argument("--valid-subset", default="valid", help="fairseq split to score (default: valid)")
    parser.add_argument("--valid-batches", type=int, default=0, metavar="N",
                        help="score N batches spread evenly over the validation set, the same for every cell "
                        "(default: 0, all of it; OpenWebText's 4M tokens per cell are a lot)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="sequences per evaluation batch, as fairseq-validate --batch-size (default: 16)")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even if CUDA is available")
    parser.add_argument("--trust-checkpoints", action="store_true",
                        help="allow arbitrary unpickling (can run code): only for files from a source you trust")
    return parser


def parse_list(text: str, kind: type, flag: str, check: Callable[[float], bool], need: str) -> list:
    if not text.strip():
        return []
    try:
        values = sorted({kind(v) for v in text.split(",")})
    except ValueError:
        raise LawaError(f"{flag} must be comma-separated {need}, got '{text}'") from None
    if not all(check(v) for v in values):
        raise LawaError(f"{flag} must be comma-separated {need}, got '{text}'")
    return values


def parse_ends(text: str | None, trajectory: Trajectory) -> list[int] | None:
    if text is None:
        return None
    try:
        parts = [int(p) for p in text.split(":")]
        if len(parts) > 3 or (len(parts) == 3 and parts[2] < 1):
            raise ValueError
        ends = list(range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1)) if len(parts) > 1 else parts
    except (ValueError, IndexError):
        raise LawaError(f"--updates must be 'A:B', 'A:B:STEP' or 'U' (in updates), got '{text}'") from None
    if len(parts) == 1:
        return [trajectory.index(ends[0], "--updates: update")]
    saved = [u // trajectory.interval for u in ends
             if u % trajectory.interval == 0 and u // trajectory.interval in trajectory.paths]
    if not saved:
        raise LawaError(f"--updates {text} selects no checkpoint (have updates {trajectory.describe()})")
    return saved


def plan_from_args(args: argparse.Namespace, trajectory: Trajectory) -> Plan:
    def positive(v):
        return v >= 1

    ks = parse_list(args.ks, int, "--ks", positive, "positive integers (checkpoints per window)")
    spacings = parse_list(args.spacings, int, "--spacings", positive, "positive integers (checkpoints)")
    if ks and not spacings:
        raise LawaError("--ks needs at least one spacing (--spacings 1 is plain LAWA)")
    decays = parse_list(args.ema_decays, float, "--ema-decays", lambda d: 0.0 <= d < 1.0, "decays in [0, 1)")
    starts = parse_list(args.swa_starts, int, "--swa-starts", positive, "update counts of saved checkpoints")
    return Plan(ks=ks, spacings=spacings, blocks=args.layout == "blocks", ema_decays=decays,
                swa_starts=[trajectory.index(u, "--swa-starts: update") for u in starts],
                ends=parse_ends(args.updates, trajectory), baseline=not args.no_baseline)


def done_cells(out: Path, trajectory: Trajectory, optimizer: str, seed: int) -> dict[str, set[tuple[int, int]]]:
    """(end checkpoint number, k) cells of this run already in ``out``, by method label."""
    if not out.exists():
        return {}
    rows = read_results(out)
    rows = rows[(rows["optimizer"].astype(str) == optimizer) & (rows["seed"] == seed) & (rows["split"] == "val")
                & (rows["metric"] == "loss") & (rows["epoch"] % trajectory.interval == 0)]
    done: dict[str, set[tuple[int, int]]] = {}
    for method, end, k in zip(rows["method"], rows["epoch"], rows["k"], strict=True):
        done.setdefault(method, set()).add((int(end) // trajectory.interval, int(k)))
    return done


def sweep(args: argparse.Namespace) -> None:
    if args.batch_size < 1 or args.valid_batches < 0:
        raise LawaError(f"--batch-size must be ≥ 1 and --valid-batches ≥ 0, got {args.batch_size} and "
                        f"{args.valid_batches}")
    trajectory = find_trajectory(args.ckpt_dir, args.interval, trust=args.trust_checkpoints)
    plan = plan_from_args(args, trajectory)
    check_plan(plan, len(trajectory.paths))
    out = args.out or args.ckpt_dir / "results.csv"
    if not out.parent.is_dir():
        raise LawaError(f"--out {out}: directory {out.parent} does not exist")
    if args.data is not None and not Path(args.data.split(":")[0]).is_dir():
        raise LawaError(f"DATA {args.data} is not a folder (the fairseq-preprocess output: gpt/reproduce_results.sh "
                        "makes it)")

    newest = trajectory.paths[max(trajectory.paths)]
    task, model, criterion, cfg = evaluate_lawa.load_fairseq(newest, args.data, args.trust_checkpoints)
    optimizer, seed = str(cfg.optimizer._name), int(cfg.common.seed)
    done = done_cells(out, trajectory, optimizer, seed)
    cells = iter_cells(trajectory.paths, plan, skip=done, trust=args.trust_checkpoints)
    first = next(cells, None)
    if first is None:
        print(f"{PROG}: all cells of {args.ckpt_dir} are already in {out}")
        return

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model.to(device)
    batches = evaluate_lawa.fixed_batches(task, model, cfg, args.valid_subset, args.batch_size, args.valid_batches)
    started, n = time.perf_counter(), 0
    cell: tuple | None = first
    while cell is not None:
        label, k, end, state = cell
        updates = trajectory.updates(end)
        try:
            model.load_state_dict(state, strict=True, model_cfg=cfg.model)
        except RuntimeError as exc:
            raise LawaError(f"the {label} average ending at update {updates} does not fit the model built from "
                            f"{newest.name} ({str(exc).splitlines()[0]})") from None
        loss = evaluate_lawa.masked_lm_loss(task, model, criterion, batches, device)  # any task's valid loss
        if not math.isfinite(loss):
            print(f"{PROG}: warning: non-finite loss for {label} k={k} at update {updates}", file=sys.stderr)
        append_rows(out, [{"method": label, "k": k, "epoch": updates, "split": "val", "metric": "loss", "value": loss,
                           "wall_seconds": "", "optimizer": optimizer, "seed": seed}])
        n += 1
        print(f"{label:>9} k={k:<3} update {updates:>7}  val loss {loss:.3f} bits", file=sys.stderr, flush=True)
        cell = next(cells, None)
    print(f"{PROG}: {n} cells in {time.perf_counter() - started:.0f} s -> {out}")


def main(argv: list[str] | None = None) -> None:
    try:
        sweep(get_args_parser().parse_args(argv))
    except LawaError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
