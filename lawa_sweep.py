"""The one sweep engine: every averaging method over a saved trajectory, evaluated by your function.

::

    import lawa_sweep as ls
    def evaluate(state, cell):                      # state: averaged weights, plain keys; cell: label, end, k
        model.load_state_dict(state)
        return {"val_loss": loss(model, val_loader)}
    ls.sweep("runs/fmnist", [ls.Lawa((2, 4, 6)), ls.Ema((0.5, 0.9))], evaluate, "runs/fmnist/results.csv")

:func:`sweep` plans the cells (method × end × k) without reading a file, skips the cells already complete
in the results CSV (a killed sweep resumes), records the run (``results.args.json``), shows progress, appends
each evaluated cell as whole tidy rows (``method,k,epoch,split,metric,value,…,unit``) and prints a summary.
The plain checkpoints are ``baseline`` rows (k=1); they ride in the LAWA pass when LAWA is swept, so each
file is read once per method pass (``lawa_methods.iter_method_averages``).

**Positions.** A trajectory (``lawa_trajectory``) names each checkpoint by the number its name carries, an
epoch or a step: ``ends``, ``--epochs A:B`` and SWA starts are such positions, ``k`` counts checkpoints, and
rows record ``trajectory.completed(position)`` in the ``epoch`` column with the trajectory's ``unit``.

**Methods** (each a frozen dataclass with a ``label``, the CSV's method column):

=========================  =====================================  ==============  ==============
spec                       averages at end E                      ``method``      ``k``
=========================  =====================================  ==============  ==============
``Lawa(ks)``               the k latest checkpoints, uniform      ``lawa``        k
``Exp(ks, alpha)``         the same, the paper's App. C weights   ``exp``         k
``Ema(decays)``            EMA of every checkpoint from the first ``ema``         round(1/(1−d))
``Swa(starts)``            uniform from start s to E              ``swa``         checkpoints s..E
``Ewa(ks, spacing)``       k checkpoints spaced s apart           ``ewa-s{s}``    k
=========================  =====================================  ==============  ==============

**Several processes.** Under ``torchrun`` (or SLURM: ``SLURM_PROCID``/``SLURM_NTASKS`` with ``MASTER_ADDR``
and ``MASTER_PORT``) the cells are sharded: rank r takes a contiguous block of end positions, the blocks
balanced by number of cells, and reads only the checkpoints its windows need. Each rank appends its cells to
``<out>.part<r>``; when all are done rank 0 merges the part files into ``out`` (whole rows, each row once,
then the part file is removed). A rerun after a kill first merges the part files left behind, so it computes
only the cells still missing. The averages are computed exactly as in one process: same values. Across nodes,
the run directory and ``out``'s directory must be on a filesystem every rank sees. ``LAWA_DIST_TIMEOUT``
(seconds, default 1800) bounds the rendezvous and the final wait for the slowest rank when the sweep starts the
process group itself; a timed-out wait loses nothing, the rerun merges the part files.

Scripts share one flag dialect: :func:`add_sweep_args` and :func:`methods_from_args`.
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import glob
import io
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

import lawa_methods as lm
import lawa_utils as lu
from lawa_trajectory import Trajectory, find_trajectory
from lawa_utils import LawaError

__all__ = [
    "BASELINE",
    "CLI_METHODS",
    "DEFAULT_KS",
    "METHOD_FLAGS",
    "Cell",
    "Ema",
    "Ewa",
    "Exp",
    "Lawa",
    "MethodSpec",
    "Swa",
    "add_sweep_args",
    "done_cells",
    "merge_part_files",
    "methods_from_args",
    "parse_ends",
    "parse_ks",
    "plan_cells",
    "shard_ends",
    "summary_table",
    "sweep",
]


# --------------------------------------------------------------------------------------------------
# Method specs
# --------------------------------------------------------------------------------------------------

Average = tuple[int, int, dict[str, torch.Tensor]]  # (end index, k, averaged state)


@dataclass(frozen=True)
class Cell:
    """One evaluation: ``label`` (the CSV's method), ``end`` (position of the window's newest checkpoint), ``k``.

    >>> Cell("lawa", end=30, k=6)                   # the 6 latest checkpoints up to the one numbered 30
    Cell(label='lawa', end=30, k=6)
    """

    label: str
    end: int
    k: int


class MethodSpec(Protocol):
    """What :func:`sweep` needs of a method: its CSV label, its averages in index space, each window's span."""

    @property
    def label(self) -> str: ...

    def averages(self, trajectory: Any, checkpoints: Mapping[int, Any], ends: list[int], *,
                 skip: set[tuple[int, int]], load: Callable | None, trust: bool) -> Iterator[Average]: ...

    def span(self, end: int, k: int) -> int: ...


def _window_sizes(ks: Iterable[int], what: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in ks}))
    except (TypeError, ValueError):
        raise LawaError(f"{what}: window sizes must be integers, got {ks!r}") from None
    if not ks or ks[0] < 2:
        raise LawaError(f"{what}: window sizes k must be ≥ 2 (k=1 is the plain checkpoint: the baseline rows), "
                        f"got {list(ks)}")
    return ks


@dataclass(frozen=True)
class Lawa:
    """LAWA: the uniform average of the k latest checkpoints, for every k in ``ks``.

    >>> Lawa((2, 4)).label
    'lawa'
    """

    ks: tuple[int, ...]
    label = "lawa"

    def __post_init__(self):
        object.__setattr__(self, "ks", _window_sizes(self.ks, self.label))

    def averages(self, trajectory, checkpoints, ends, *, skip, load, trust) -> Iterator[Average]:
        return lm.iter_method_averages("lawa", checkpoints, ks=self.ks, ends=ends, skip=skip, load=load, trust=trust)

    def span(self, end: int, k: int) -> int:
        return k


@dataclass(frozen=True)
class Exp:
    """The paper's Appendix C exponential weights over the k latest checkpoints (the newest gets ``alpha``).

    >>> Exp((2, 4), alpha=0.8).label
    'exp'
    """

    ks: tuple[int, ...]
    alpha: float = lu.DEFAULT_ALPHA
    label = "exp"

    def __post_init__(self):
        object.__setattr__(self, "ks", _window_sizes(self.ks, self.label))
        lu.method_weights("exp", 1, self.alpha)  # validates alpha

    def averages(self, trajectory, checkpoints, ends, *, skip, load, trust) -> Iterator[Average]:
        return lm.iter_method_averages("exp", checkpoints, ks=self.ks, alpha=self.alpha, ends=ends, skip=skip,
                                       load=load, trust=trust)

    def span(self, end: int, k: int) -> int:
        return k


@dataclass(frozen=True)
class Ema:
    """EMA over every checkpoint from the first, one decay d per checkpoint; the k column is round(1/(1−d)).

    >>> Ema((0.5, 0.9)).label
    'ema'
    """

    decays: tuple[float, ...]
    label = "ema"

    def __post_init__(self):
        decays = tuple(float(d) for d in self.decays)
        if not decays:
            raise LawaError("ema needs at least one decay")
        for d in decays:
            lm.ema_label(d)  # validates the range
        object.__setattr__(self, "decays", decays)

    def averages(self, trajectory, checkpoints, ends, *, skip, load, trust) -> Iterator[Average]:
        return lm.iter_method_averages("ema", checkpoints, decays=self.decays, ends=ends, skip=skip, load=load,
                                       trust=trust)

    def span(self, end: int, k: int) -> int:
        return end  # the EMA at index E has seen every checkpoint 1..E


@dataclass(frozen=True)
class Swa:
    """SWA: the uniform average from each start position s to E (the k column counts checkpoints s..E).

    >>> Swa((5,)).label
    'swa'
    """

    starts: tuple[int, ...]
    label = "swa"

    def __post_init__(self):
        starts = tuple(sorted({int(s) for s in self.starts}))
        if not starts:
            raise LawaError("swa needs at least one start")
        object.__setattr__(self, "starts", starts)

    def averages(self, trajectory, checkpoints, ends, *, skip, load, trust) -> Iterator[Average]:
        starts = [trajectory.index(s) for s in self.starts]  # LawaError naming what exists if absent
        return lm.iter_method_averages("swa", checkpoints, starts=starts, ends=ends, skip=skip, load=load,
                                       trust=trust)

    def span(self, end: int, k: int) -> int:
        return k


@dataclass(frozen=True)
class Ewa:
    """EWA: k checkpoints spaced ``spacing`` apart (E, E−s, …); ``blocks`` keeps only non-overlapping windows.

    ``name`` overrides the CSV label (default ``ewa-s{spacing}``).

    >>> Ewa((2, 4), spacing=4).label
    'ewa-s4'
    """

    ks: tuple[int, ...]
    spacing: int
    blocks: bool = False
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "ks", _window_sizes(self.ks, "ewa"))
        if not isinstance(self.spacing, int) or self.spacing < 1:
            raise LawaError(f"ewa: spacing must be a positive integer, got {self.spacing!r}")

    @property
    def label(self) -> str:
        return self.name or lm.method_label("ewa", spacing=self.spacing)

    def averages(self, trajectory, checkpoints, ends, *, skip, load, trust) -> Iterator[Average]:
        return lm.iter_method_averages("ewa", checkpoints, ks=self.ks, spacing=self.spacing, blocks=self.blocks,
                                       ends=ends, skip=skip, load=load, trust=trust)

    def span(self, end: int, k: int) -> int:
        return (k - 1) * self.spacing + 1


BASELINE = "baseline"


def _trajectory(source: Any) -> Trajectory:
    """A trajectory as given, or the one found in a run directory."""
    return find_trajectory(source) if isinstance(source, (str, os.PathLike)) else source


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------


def _specs(methods: Sequence[MethodSpec]) -> list[MethodSpec]:
    methods = list(methods)
    labels = [m.label for m in methods]
    for label in labels:
        if label == BASELINE or labels.count(label) > 1:
            raise LawaError(f"two methods share the CSV label '{label}'" if label != BASELINE
                            else "'baseline' is the plain checkpoints' label, not a method's")
    return methods


def _iter_cells(
    trajectory: Any,
    methods: Sequence[MethodSpec],
    baseline: bool,
    ends: list[int],
    done: Mapping[str, set[tuple[int, int]]],
    *,
    load: Callable | None,
    trust: bool,
) -> Iterator[tuple[str, int, int, dict[str, torch.Tensor]]]:
    """``(label, end index, k, state)`` for every cell still to do, method pass after method pass."""
    if not ends:
        return
    checkpoints = trajectory.checkpoints()
    rider = next((m for m in methods if isinstance(m, Lawa)), None) if baseline else None
    for m in methods:
        if m is rider:  # a uniform window of one is the checkpoint itself, bit for bit: one read in all
            skip = {c for c in done.get(m.label, ()) if c[1] > 1} | {c for c in done.get(BASELINE, ()) if c[1] == 1}
            cells = lm.iter_method_averages("lawa", checkpoints, ks=[1, *m.ks], ends=ends, skip=skip, load=load,
                                            trust=trust)
            yield from ((BASELINE if k == 1 else m.label, e, k, s) for e, k, s in cells)
        else:
            cells = m.averages(trajectory, checkpoints, ends, skip=set(done.get(m.label, ())), load=load, trust=trust)
            yield from ((m.label, e, k, s) for e, k, s in cells)
    if baseline and rider is None:
        cells = lu.iter_window_averages(checkpoints, [1], ends, skip=done.get(BASELINE, ()), load=load, trust=trust)
        yield from ((BASELINE, e, k, s) for e, k, s in cells)


def plan_cells(
    trajectory: Any,
    methods: Sequence[MethodSpec],
    *,
    baseline: bool = True,
    ends: Iterable[int] | None = None,
    done: Mapping[str, set[tuple[int, int]]] | None = None,
) -> list[Cell]:
    """The cells a sweep would evaluate, in order, without reading a checkpoint; windows across a gap refused.

    >>> [c.k for c in plan_cells(traj, [Lawa((2,))], ends=[3])]          # doctest: +SKIP
    [1, 2]

    ``ends`` are positions (default: every checkpoint); ``done`` maps a label to ``(position, k)`` cells to
    leave out (:func:`done_cells`).
    """
    trajectory = _trajectory(trajectory)
    methods = _specs(methods)
    by_label = {m.label: m for m in methods}
    end_index = _end_indices(trajectory, ends)
    done_index = {label: {(trajectory.index(p), k) for p, k in cells} for label, cells in (done or {}).items()}
    cells = []
    for label, e, k, _ in _iter_cells(trajectory, methods, baseline, end_index, done_index, load=_nothing,
                                      trust=False):
        end = trajectory.position(e)
        span = 1 if label == BASELINE else by_label[label].span(e, k)
        trajectory.window(end, span)  # a window across a gap is refused, naming the files
        cells.append(Cell(label, end, k))
    return cells


def _nothing(path: Any) -> dict:
    return {}


def _end_indices(trajectory: Any, ends: Iterable[int] | None) -> list[int]:
    if len(trajectory) == 0:
        raise LawaError("the trajectory has no checkpoints")
    if ends is None:
        return list(range(1, len(trajectory) + 1))
    return sorted({trajectory.index(int(e)) for e in ends})


def shard_ends(cells: Sequence[Cell], world_size: int) -> list[list[int]]:
    """Split the end positions of ``cells`` into ``world_size`` contiguous blocks with near-equal cell counts.

    >>> shard_ends([Cell("lawa", e, 2) for e in (1, 2, 3, 4)], 2)
    [[1, 2], [3, 4]]

    End E goes to the block in which the middle of its cells falls, so blocks follow each other in E order and
    none is more than one end's cells away from total/world_size.
    """
    counts = collections.Counter(c.end for c in cells)
    total = sum(counts.values())
    blocks: list[list[int]] = [[] for _ in range(world_size)]
    before = 0
    for end in sorted(counts):
        middle = before + counts[end] / 2
        blocks[min(world_size - 1, int(middle * world_size / total))].append(end)
        before += counts[end]
    return blocks


# --------------------------------------------------------------------------------------------------
# The results CSV: rows, done cells, part files
# --------------------------------------------------------------------------------------------------


def _has_unit() -> bool:
    return "unit" in lu.RESULT_COLUMNS


def _rows(values: Mapping[str, Any], cell: Cell, epoch: int, optimizer: str, seed: int | None, unit: str) -> list:
    if not isinstance(values, Mapping) or not values:
        raise LawaError(f"the evaluation returned {type(values).__name__} {values!r:.80} for {_describe(cell)}; "
                        "it must return a dict such as {'val_loss': 2.31}")
    rows = []
    for key, value in values.items():
        split, _, metric = str(key).partition("_")
        if not split or not metric:
            raise LawaError(f"the evaluation returned the key {key!r}; keys are '<split>_<metric>', e.g. 'val_loss'")
        try:
            number = float(value.item() if isinstance(value, torch.Tensor) else value)
        except (TypeError, ValueError, RuntimeError):
            raise LawaError(f"the evaluation returned {key}={value!r:.80}, not a number, "
                            f"for {_describe(cell)}") from None
        row = {"method": cell.label, "k": cell.k, "epoch": epoch, "split": split, "metric": metric, "value": number,
               "wall_seconds": "", "optimizer": optimizer, "seed": "" if seed is None else seed}
        if _has_unit():
            row["unit"] = unit
        rows.append(row)
    return rows


def _describe(cell: Cell) -> str:
    return f"{cell.label} E={cell.end} k={cell.k}"


def _run_rows(results, optimizer: str, seed: int | None, unit: str):
    """The rows of one trajectory (optimizer, seed, unit; a file without the unit column is all epochs)."""
    mine = results["optimizer"].astype(str) == optimizer
    mine &= results["seed"].isna() if seed is None else (results["seed"] == seed).fillna(False)
    units = results["unit"].replace("", "epoch") if "unit" in results.columns else "epoch"
    return results[mine & (units == unit)]


def done_cells(
    path: str | os.PathLike,
    labels: Iterable[str],
    *,
    optimizer: str = "",
    seed: int | None = None,
    unit: str = "epoch",
    metrics: Iterable[str] | None = None,
) -> dict[str, set[tuple[int, int]]]:
    """``{label: {(epoch column, k)}}``: the cells of one trajectory complete in the results CSV ``path``.

    >>> done_cells("results.csv", ["lawa", "baseline"], metrics=["val_loss"])        # doctest: +SKIP
    {'lawa': {(4, 2)}, 'baseline': {(1, 1), (2, 1)}}

    Complete means a row for each ``metrics`` name (``<split>_<metric>``); without them, for every
    ``(split, metric)`` this trajectory's rows of these labels hold. A missing file has nothing done.
    """
    labels = list(labels)
    path = Path(path)
    if not path.exists():
        return {label: set() for label in labels}
    if metrics is None:
        rows = _run_rows(lu.read_results(path), optimizer, seed, unit)
        pairs = set(zip(*(rows.loc[rows["method"].isin(labels), c] for c in ("split", "metric")), strict=True))
    else:
        pairs = {tuple(str(m).split("_", 1)) for m in metrics}
    by_split: dict[str, list[str]] = collections.defaultdict(list)
    for split, metric in pairs:
        by_split[split].append(metric)
    done: dict[str, set[tuple[int, int]]] | None = None
    for split, names in by_split.items():  # complete in every split, each with its own metrics
        part = lu.done_cells(path, labels, [split], names, optimizer, seed, unit=unit)
        done = part if done is None else {label: done[label] & part[label] for label in labels}
    return done if done is not None else {label: set() for label in labels}


def _part_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(glob.escape(out.name) + ".part*"))


def _whole_rows(path: Path) -> list[dict[str, str]]:
    """The complete lines of a part file (a killed writer's last line without its newline is dropped)."""
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(text)))


def _row_key(row: Mapping[str, Any]) -> tuple:
    unit = str(row.get("unit") or "epoch")
    return (*(str(row[c]) for c in ("method", "k", "epoch", "split", "metric", "optimizer", "seed")), unit)


def _fsync_dir(directory: Path) -> None:
    """Make the removal of part files durable (not every filesystem lets a directory be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def merge_part_files(out: str | os.PathLike) -> int:
    """Append the rows of ``<out>.part*`` (rank-local files of a sharded sweep) to ``out``, each row once.

    >>> merge_part_files("results.csv")                     # doctest: +SKIP
    42

    One write per part file, fsync'd (``lawa_utils.append_rows``); rows already in ``out`` (a merge killed
    before it removed its part file) are not appended again. Returns the number of rows appended.
    """
    out = Path(out)
    parts = _part_files(out)
    if not parts:
        return 0
    have = set()
    if out.exists():
        have = {_row_key(r) for r in _whole_rows(out)}
    appended = 0
    for part in parts:
        rows = [r for r in _whole_rows(part) if _row_key(r) not in have]
        columns = set(lu.RESULT_COLUMNS)
        lu.append_rows(out, [{c: v for c, v in r.items() if c in columns} for r in rows])
        have |= {_row_key(r) for r in rows}
        appended += len(rows)
        part.unlink()
    _fsync_dir(out.parent)
    return appended


# --------------------------------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------------------------------

TIMEOUT_SECONDS = float(os.environ.get("LAWA_DIST_TIMEOUT", 1800))  # rendezvous and the end-of-sweep barrier


def _init_distributed(distributed: bool | None) -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group)."""
    if distributed is False:
        return 0, 1, False
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    env = os.environ
    if "SLURM_PROCID" in env and "RANK" not in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        if distributed:
            raise LawaError("distributed=True but neither torch.distributed nor torchrun/SLURM variables are set")
        return 0, 1, False
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in env]
    if missing:
        raise LawaError(f"{world} processes but {' and '.join(missing)} not set (torchrun sets them; under srun "
                        "export MASTER_ADDR=$(scontrol show hostnames $SLURM_NODELIST | head -1) MASTER_PORT=29500)")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS))
    return dist.get_rank(), dist.get_world_size(), True


def _barrier() -> None:
    dist.barrier()


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------

Evaluate = Callable[[dict[str, torch.Tensor], Cell], Mapping[str, float]]


def sweep(
    trajectory: Any,
    methods: Sequence[MethodSpec],
    evaluate: Evaluate,
    out: str | os.PathLike,
    *,
    baseline: bool = True,
    ends: Iterable[int] | None = None,
    prepare: Callable[[], Any] | None = None,
    optimizer: str = "",
    seed: int | None = None,
    run_args: argparse.Namespace | Mapping[str, Any] | None = None,
    trust: bool = False,
    distributed: bool | None = None,
    desc: str | None = None,
    metrics: Sequence[str] | None = None,
    summary: str | None = None,
    load: Callable | None = None,
):
    """Evaluate every cell of ``methods`` (and the baseline) over ``trajectory`` into the tidy CSV ``out``.

    >>> sweep("runs/fmnist", [Lawa((2, 4))], lambda state, cell: {"val_loss": f(state)},
    ...       "runs/fmnist/results.csv", optimizer="sgd", seed=0)               # doctest: +SKIP

    ``trajectory``: a ``lawa_trajectory.Trajectory`` or a run directory. ``evaluate(state, cell)`` gets the
    averaged model state (plain keys) and the :class:`Cell`, and returns ``{"<split>_<metric>": value}``.
    ``ends``: end positions (default all). ``prepare()`` is called once before the first evaluation, and only
    when there is a cell to do (build data and model there: a finished sweep costs nothing). ``optimizer`` and
    ``seed`` fill their columns and, with the unit, name the trajectory whose cells count as done; ``metrics``
    lists the names a complete cell has (default: what the CSV holds). ``run_args`` is recorded in
    ``<out>.args.json``. ``distributed``: None detects torchrun/SLURM, False runs alone. ``summary`` is the
    ``<split>_<metric>`` printed by end and k at the end (default: the first one). ``load(path)`` replaces
    ``lawa_utils.load_model_state``.

    Under several ranks each evaluates its own cells alone: ``evaluate`` must not call collectives (a
    distributed Trainer or DDP model inside it would wait for ranks busy with other cells).

    Returns the results of this trajectory (a DataFrame) on rank 0, None on the other ranks.
    """
    trajectory = _trajectory(trajectory)
    methods = _specs(methods)
    out = Path(out)
    if not out.parent.is_dir():
        raise LawaError(f"--out {out}: directory {out.parent} does not exist")
    unit = trajectory.unit
    epoch_of = {trajectory.completed(p): p for p in trajectory.positions}
    labels = [m.label for m in methods] + ([BASELINE] if baseline else [])
    plan_cells(trajectory, methods, baseline=baseline, ends=ends)  # request errors before anything else

    rank, world, owned = _init_distributed(distributed)
    try:
        if rank == 0:
            merge_part_files(out)  # cells a killed sharded run finished count as done
        if world > 1:
            _barrier()
        done_rows = done_cells(out, labels, optimizer=optimizer, seed=seed, unit=unit, metrics=metrics)
        done = {label: {(epoch_of[e], k) for e, k in cells if e in epoch_of} for label, cells in done_rows.items()}
        todo = plan_cells(trajectory, methods, baseline=baseline, ends=ends, done=done)
        mine = shard_ends(todo, world)[rank] if todo else []
        my_cells = [c for c in todo if c.end in set(mine)]
        if not todo:
            if rank == 0:
                print(f"lawa_sweep: all {', '.join(labels)} cells are already in {out}", file=sys.stderr)
        else:
            if rank == 0:
                lu.record_run(out, {"lawa_sweep": _run_record(trajectory, methods, baseline, ends, world),
                                    **(vars(run_args) if isinstance(run_args, argparse.Namespace)
                                       else dict(run_args or {}))})
            target = out if world == 1 else out.with_name(f"{out.name}.part{rank}")
            _evaluate_cells(trajectory, methods, baseline, evaluate, target, mine, done, len(my_cells),
                            prepare=prepare, optimizer=optimizer, seed=seed, trust=trust, load=load,
                            desc=desc or "cells" + (f" (rank {rank} of {world})" if world > 1 else ""))
        if world > 1:
            _barrier()
        if rank != 0:
            return None
        merge_part_files(out)
        if not out.exists():
            return None
        results = _run_rows(lu.read_results(out), optimizer, seed, unit)
        if todo:
            _print_summary(results, trajectory, labels, summary or (metrics[0] if metrics else None), optimizer, seed)
        return results
    finally:
        if owned:
            dist.destroy_process_group()


def _run_record(trajectory, methods, baseline, ends, world) -> dict:
    return {"trajectory": str(getattr(trajectory, "root", "") or ""), "layout": trajectory.layout,
            "unit": trajectory.unit, "checkpoints": len(trajectory), "methods": [repr(m) for m in methods],
            "baseline": baseline, "ends": None if ends is None else sorted(ends), "ranks": world}


def _evaluate_cells(trajectory, methods, baseline, evaluate, target: Path, ends: list[int], done, count: int, *,
                    prepare, optimizer, seed, trust, load, desc) -> None:
    from tqdm import tqdm

    done_index = {label: {(trajectory.index(p), k) for p, k in cells} for label, cells in done.items()}
    end_index = sorted(trajectory.index(e) for e in ends)
    if count and prepare is not None:
        prepare()
    started = time.perf_counter()
    with tqdm(total=count, desc=desc, unit="cell", file=sys.stderr, dynamic_ncols=True, disable=count == 0) as bar:
        for label, e, k, state in _iter_cells(trajectory, methods, baseline, end_index, done_index, load=load,
                                              trust=trust):
            cell = Cell(label, trajectory.position(e), k)
            values = evaluate(state, cell)
            rows = _rows(values, cell, trajectory.completed(cell.end), optimizer, seed, trajectory.unit)
            lu.append_rows(target, rows)  # one write per cell, fsync'd: a kill leaves whole cells
            first = rows[0]
            # the window's last file by name (positions are the names' numbers; rows record completed epochs)
            bar.set_postfix_str(f"{cell.label} k={cell.k} to {trajectory.name(cell.end)} "
                                f"{first['split']}_{first['metric']} {first['value']:.4g}")
            bar.update()
    if count:
        print(f"lawa_sweep: {desc}: {count} cells in {time.perf_counter() - started:.2f} s -> {target}",
              file=sys.stderr)


def _print_summary(results, trajectory, labels: list[str], metric: str | None, optimizer: str, seed: int | None):
    rows = results[results["method"].isin(labels)]
    position_of = {trajectory.completed(p): p for p in trajectory.positions}

    def swa_start(epoch: int, k: int) -> int:  # the position of the window's oldest checkpoint, in the names' numbers
        return trajectory.positions[trajectory.index(position_of[epoch]) - k]

    if rows.empty:
        return
    if metric is None:
        metric = f"{rows['split'].iloc[0]}_{rows['metric'].iloc[0]}"
    split, _, name = metric.partition("_")
    for label in [lb for lb in labels if lb != BASELINE] or [BASELINE]:
        table = summary_table(rows, label, optimizer=optimizer, seed=seed, split=split, metric=name,
                              swa_start=swa_start)
        if not table.empty:
            print(f"{metric} by end {trajectory.unit} ({label} and the baseline):")
            print(table.round(4).to_string())


# --------------------------------------------------------------------------------------------------
# One flag dialect
# --------------------------------------------------------------------------------------------------

# --method → the name iter_method_averages (and the CSV's method column, but for EWA's spacing) uses for it.
CLI_METHODS = {"uni": "lawa", "exp": "exp", "ema": "ema", "swa": "swa", "ewa": "ewa"}
# Flags that belong to one or a few methods; given to another they are refused rather than ignored.
METHOD_FLAGS = {"ks": ("uni", "exp", "ewa"), "alpha": ("exp",), "decays": ("ema",), "swa_starts": ("swa",),
                "spacing": ("ewa",), "ewa_blocks": ("ewa",)}
DEFAULT_KS = "2,4,6,8,10"


def _add(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    """Add a flag unless the caller's parser already defines one of its names (the caller's flag wins)."""
    if not any(f in parser._option_string_actions for f in flags):  # argparse has no public lookup
        parser.add_argument(*flags, **kwargs)


def add_sweep_args(parser: argparse.ArgumentParser, *, default_ks: str = DEFAULT_KS) -> None:
    """Add the sweep flags every sweep shares; :func:`methods_from_args` reads them.

    >>> p = argparse.ArgumentParser(); add_sweep_args(p)
    >>> p.parse_args(["--method", "uni,ema", "--decays", "0.5"]).decays
    '0.5'

    ``--method uni,exp,ema,swa,ewa`` with ``--ks``, ``--alpha``, ``--decays``, ``--swa-starts``, ``--spacing``,
    ``--ewa-blocks``; ``--epochs A:B[:STEP]``, ``--no-baseline``, ``--out``, ``--trust-checkpoints``. Older
    names stay as aliases: ``--ema-decays``, ``--spacings``, ``--layout blocks``, ``--updates``. A flag the
    parser already has is left as the caller defined it.
    """
    _add(parser, "--method", default=None, metavar="M[,M…]",
         help="uni: LAWA's uniform average (default); exp: the paper's Appendix C exponential weights; ema: "
         "exponential moving average; swa: the mean from a start; ewa: LAWA over checkpoints spaced s apart. "
         "Several, comma-separated, are swept in one process (each method's flags apply to it alone)")
    _add(parser, "--ks", default=None, help=f"uni, exp, ewa: window sizes k in checkpoints, comma-separated "
         f"(default: {default_ks})")
    _add(parser, "--alpha", type=float, default=None,
         help=f"exp: weight of the newest checkpoint (default {lu.DEFAULT_ALPHA})")
    _add(parser, "--decays", "--ema-decays", dest="decays", default=None, metavar="D,...",
         help="ema: decays d per checkpoint, comma-separated, e.g. 0.5,0.75 (k column: 1/(1−d))")
    _add(parser, "--swa-starts", default=None, metavar="S,...",
         help="swa: start positions s (epochs or steps, as the names carry), comma-separated")
    _add(parser, "--spacing", "--spacings", dest="spacing", default=None, metavar="S[,S…]",
         help="ewa: checkpoints between the averaged ones (1 would be LAWA); several comma-separated")
    _add(parser, "--ewa-blocks", action="store_true",
         help="ewa: only the non-overlapping blocks of Sanyal et al.'s script, not every end")
    _add(parser, "--layout", choices=["sliding", "blocks"], default=None,
         help="alias: --layout blocks is --ewa-blocks")
    _add(parser, "--epochs", "--updates", dest="epochs", default=None, metavar="A:B[:STEP]",
         help="end positions to evaluate, inclusive: 'A:B', 'A:B:STEP' or 'E' (default: all)")
    _add(parser, "--no-baseline", action="store_true", help="do not evaluate the plain checkpoints")
    _add(parser, "--out", type=Path, default=None, help="results CSV")
    _add(parser, "--trust-checkpoints", action="store_true",
         help="allow arbitrary unpickling (can run code): only for files from a source you trust")
    parser.set_defaults(default_ks=default_ks)


def _numbers(text: str, kind: Callable, flag: str, example: str) -> list:
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise LawaError(f"{flag} must be comma-separated numbers such as {example}, got '{text}'") from None
    if not values:
        raise LawaError(f"{flag} is empty; give numbers such as {example}")
    return values


def methods_from_args(args: argparse.Namespace, trajectory: Any = None) -> list[MethodSpec]:
    """The method specs :func:`add_sweep_args`' flags ask for, in ``--method`` order.

    >>> methods_from_args(p.parse_args(["--method", "uni,ema", "--ks", "2,4", "--decays", "0.5"]))  # doctest: +SKIP
    [Lawa(ks=(2, 4)), Ema(decays=(0.5,))]

    A method's flags are required (``--ks`` defaults), flags no chosen method takes are refused. With the
    older flags and no ``--method``, the methods are those the flags name (``--ks`` LAWA or, with
    ``--spacings``, EWA per spacing, spacing 1 labelled ``lawa``; ``--ema-decays`` EMA; ``--swa-starts`` SWA).
    ``trajectory`` (optional) checks SWA starts against its positions.
    """
    blocks = bool(getattr(args, "ewa_blocks", False)) or getattr(args, "layout", None) == "blocks"
    default_ks = getattr(args, "default_ks", DEFAULT_KS)
    method = getattr(args, "method", None)
    given = {flag: getattr(args, flag, None) for flag in METHOD_FLAGS}
    given["ewa_blocks"] = blocks or None
    if method is None:
        return _methods_from_flags(given, default_ks, blocks, trajectory)
    names = list(dict.fromkeys(m.strip() for m in str(method).split(",")))
    unknown = [m for m in names if m not in CLI_METHODS]
    if unknown or not names:
        raise LawaError(f"--method {method}: unknown method '{(unknown or [''])[0]}'; choose from "
                        f"{', '.join(CLI_METHODS)} (several: comma-separated)")
    for flag, owners in METHOD_FLAGS.items():
        if given[flag] not in (None, False) and not set(names) & set(owners):
            raise LawaError(f"--{flag.replace('_', '-')} applies to --method {' or '.join(owners)}, not {method}")
    specs: list[MethodSpec] = []
    for name in names:
        if name in ("uni", "exp", "ewa"):
            ks = parse_ks(given["ks"] or default_ks)
        if name == "uni":
            specs.append(Lawa(tuple(ks)))
        elif name == "exp":
            specs.append(Exp(tuple(ks), lu.DEFAULT_ALPHA if given["alpha"] is None else given["alpha"]))
        elif name == "ema":
            if given["decays"] is None:
                raise LawaError("--method ema needs --decays, e.g. --decays 0.5,0.75")
            specs.append(Ema(tuple(_numbers(given["decays"], float, "--decays", "0.5,0.75"))))
        elif name == "swa":
            if given["swa_starts"] is None:
                raise LawaError("--method swa needs --swa-starts, e.g. --swa-starts 6")
            specs.append(Swa(tuple(_numbers(given["swa_starts"], int, "--swa-starts", "6"))))
        else:
            if given["spacing"] is None:
                raise LawaError("--method ewa needs --spacing, e.g. --spacing 2")
            for s in _numbers(given["spacing"], int, "--spacing", "2"):
                specs.append(Ewa(tuple(ks), s, blocks))
    _check_starts(specs, trajectory)
    return specs


def _methods_from_flags(given: dict, default_ks: str, blocks: bool, trajectory: Any) -> list[MethodSpec]:
    """No ``--method``: the older dialect, where the flags given name the methods (default: LAWA)."""
    specs: list[MethodSpec] = []
    if given["alpha"] is not None:
        raise LawaError("--alpha applies to --method exp")
    ks = tuple(parse_ks(given["ks"] or default_ks)) if given["ks"] != "" else ()
    if given["spacing"] is not None:
        for s in _numbers(given["spacing"], int, "--spacings", "1,4"):
            if ks:
                specs.append(Ewa(ks, s, blocks, name="lawa" if s == 1 else ""))
    elif ks and (given["ks"] is not None or not (given["decays"] or given["swa_starts"])):
        if blocks:
            raise LawaError("--ewa-blocks (--layout blocks) applies to --method ewa")
        specs.append(Lawa(ks))
    if given["decays"]:
        specs.append(Ema(tuple(_numbers(given["decays"], float, "--decays", "0.5,0.75"))))
    if given["swa_starts"]:
        specs.append(Swa(tuple(_numbers(given["swa_starts"], int, "--swa-starts", "6"))))
    if not specs:
        raise LawaError("no averaging method asked for: give --method (and its flags)")
    _check_starts(specs, trajectory)
    return specs


def _check_starts(specs: Sequence[MethodSpec], trajectory: Any) -> None:
    if trajectory is None:
        return
    for spec in specs:
        if isinstance(spec, Swa):
            for s in spec.starts:
                trajectory.index(s)


def parse_ks(text: str) -> list[int]:
    """``--ks``: distinct window sizes k ≥ 2, sorted (k=1 is the plain checkpoint: the baseline rows)."""
    try:
        ks = sorted({int(k) for k in str(text).split(",")})
    except ValueError:
        raise LawaError(f"--ks must be comma-separated integers such as 2,4,6, got '{text}'") from None
    if ks[0] < 2:
        raise LawaError(f"--ks must be ≥ 2 (k=1 is the plain checkpoint: the baseline rows), got '{text}'")
    return ks


def parse_ends(text: str | None, trajectory: Any) -> list[int] | None:
    """``--epochs``: end positions from ``'A:B'``, ``'A:B:STEP'`` (inclusive) or ``'E'``; None: all.

    >>> parse_ends("2:6:2", traj)                       # doctest: +SKIP
    [2, 4, 6]

    A single E must be a checkpoint. A range takes the checkpoints it contains; in a run saved every epoch
    (interval 1) a missing one inside it is an error, in a run saved every N steps the others are skipped.
    """
    if text is None:
        return None
    trajectory = _trajectory(trajectory)
    try:
        parts = [int(p) for p in str(text).split(":")]
        if len(parts) > 3 or (len(parts) == 3 and parts[2] < 1):
            raise ValueError
        wanted = list(range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1)) if len(parts) > 1 else parts
    except (ValueError, IndexError):
        raise LawaError(f"--epochs must be 'A:B', 'A:B:STEP' or 'E', got '{text}'") from None
    have = set(trajectory.positions)
    if len(parts) == 1:
        trajectory.index(parts[0])
        return parts
    chosen = [p for p in wanted if p in have]
    regular = len(trajectory) < 2 or min(b - a for a, b in zip(trajectory.positions, trajectory.positions[1:],
                                                               strict=False)) == 1
    missing = [p for p in wanted if p not in have]
    if regular and missing and parts[0] >= min(have) and parts[1] <= max(have):
        trajectory.index(missing[0])  # names what exists
    if not chosen:
        raise LawaError(f"--epochs {text} selects no checkpoint (have {trajectory.positions[0]}.."
                        f"{trajectory.positions[-1]})")
    return chosen


# --------------------------------------------------------------------------------------------------
# The summary a sweep prints
# --------------------------------------------------------------------------------------------------


def summary_table(results, label: str, *, optimizer: str, seed: int | None, split: str, metric: str,
                  swa_start: Callable[[int, int], int] | None = None):
    """A sweep's summary, from its tidy results (a DataFrame, ``lawa_utils.read_results``): ``split``'s
    ``metric`` for each end (rows), for the baseline and each curve of ``label`` (columns: a k; for SWA a start
    s, whose k grows with E: ``swa_start(epoch, k)``, by default E − k + 1 as in a run saved every epoch)."""
    import pandas as pd

    seeds = results["seed"].isna() if seed is None else (results["seed"] == seed).fillna(False)
    rows = results[(results["optimizer"].astype(str) == optimizer) & seeds
                   & (results["split"] == split) & (results["metric"] == metric)
                   & results["method"].isin(["baseline", label])]
    swa = rows["method"] == "swa"  # an SWA curve is a start s; its k grows with E
    start = swa_start or (lambda epoch, k: epoch - k + 1)
    starts = [start(int(e), int(k)) if is_swa else int(k) for e, k, is_swa in zip(rows["epoch"], rows["k"], swa,
                                                                                      strict=True)]
    number = pd.Series(starts, index=rows.index, dtype="int64").astype(str)
    rows = rows.assign(curve=("k=" + number).where(~swa, "s=" + number))
    table = rows.pivot_table(index="epoch", columns=["method", "curve"], values="value", aggfunc="last")
    return table[sorted(table.columns, key=lambda c: (c[0] != "baseline", c[0], int(c[1][2:])))]  # k=2 < k=10
