"""The tidy results CSV and crash-safe files, without torch: what plots/ and every sweep or trainer log share.

    >>> import lawa_tidy as lt
    >>> lt.append_rows("results.csv", [{"method": "lawa", "k": 6, "epoch": 30, "split": "val",
    ...                                 "metric": "acc1", "value": 0.71, "optimizer": "sgd", "seed": 0}])
    >>> df = lt.read_results("results.csv")                        # pandas DataFrame, types checked
    >>> done = lt.done_cells("results.csv", ["lawa"], ["val"], ["acc1"], "sgd", 0)   # {"lawa": {(30, 6)}}

One schema holds trainer logs and sweep results alike, columns in the order of :data:`RESULT_COLUMNS`:
``method,k,epoch,split,metric,value,wall_seconds,optimizer,seed,unit``. The ``epoch`` column holds what the
``unit`` column says: completed epochs (``unit=epoch``) or optimizer steps (``unit=step``). ``unit`` came
last so that files written without it stay valid; they read as ``unit=epoch``.

Writes are whole or not at all: :func:`atomic_write` renames a fsync'd temporary into place, and
:func:`append_rows` appends whole lines in one fsync'd write, so a killed run leaves at worst a torn last line,
which :func:`read_results` drops. This module imports only the standard library (pandas when reading), so
drawing a figure never imports torch. Errors meant for people are :class:`LawaError` (one line, naming the
file or the value).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = [
    "LawaError",
    "RESULT_COLUMNS",
    "UNITS",
    "append_rows",
    "atomic_write",
    "done_cells",
    "read_results",
    "record_run",
]

# The one tidy schema shared by trainer logs and sweep results; ``unit`` is last so older files stay readable.
RESULT_COLUMNS = ["method", "k", "epoch", "split", "metric", "value", "wall_seconds", "optimizer", "seed", "unit"]
_COLUMNS_WITHOUT_UNIT = RESULT_COLUMNS[:-1]
UNITS = ("epoch", "step")  # what the epoch column counts


class LawaError(Exception):
    """An error for people: a one-line message that names the offending file or value.

    >>> raise LawaError("runs/a/checkpoint7.pt does not exist")     # doctest: +SKIP
    """


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


# --------------------------------------------------------------------------------------------------
# Atomic files
# --------------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporaries of ``path`` left by writers that were killed (their pid no longer runs)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], *, force: bool = False) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, fsync it and rename it into place.

        >>> atomic_write("run.json", lambda f: f.write(b"{}\\n"), force=True)

    A crash at any moment leaves either the old file or the new one under ``path``, never a partial one.
    An existing ``path`` is refused unless ``force``. Temporaries of killed writers are removed.
    """
    path = Path(path)
    if path.exists() and not force:
        raise LawaError(f"{path} already exists; pass --force (force=True) to overwrite it")
    if not path.parent.is_dir():
        raise LawaError(f"cannot write {path}: directory {path.parent} does not exist")
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------------------------------
# The tidy CSV
# --------------------------------------------------------------------------------------------------


def _repair_torn_tail(path: Path) -> None:
    """Drop a last line left without its newline by a killed writer (single-writer files only)."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(max(0, size - 65536))
        tail = f.read()
        cut = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        f.truncate(cut)


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader([f.readline()]), [])


def _add_unit_column(path: Path) -> None:
    """Rewrite a file of the schema without ``unit`` with that column added, ``epoch`` on every row."""
    lines = path.read_text(encoding="utf-8").splitlines()
    text = "".join(f"{line},{'unit' if i == 0 else 'epoch'}\n" for i, line in enumerate(lines) if line or i == 0)
    atomic_write(path, lambda f: f.write(text.encode()), force=True)


def append_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append tidy rows to a results or log CSV, creating it with the header if it does not exist.

        >>> append_rows("log.csv", [{"method": "baseline", "k": 1, "epoch": 3, "split": "val",
        ...                          "metric": "loss", "value": 0.41, "optimizer": "sgd", "seed": 0}])

    Missing columns are left empty, except ``unit``, which defaults to ``epoch``. Rows go out in one
    ``write`` and are fsync'd, so a killed run leaves whole lines only (a torn last line from an older writer
    is removed first). A file written without the ``unit`` column keeps that layout while the rows count
    epochs; the first row counting steps rewrites it (atomically) with the column added.
    """
    path = Path(path)
    rows = [dict(row) for row in rows]
    for row in rows:
        unknown = set(row) - set(RESULT_COLUMNS)
        if unknown:
            raise LawaError(f"{path}: unknown column(s) {sorted(unknown)} (schema: {RESULT_COLUMNS})")
        if row.get("unit") in (None, ""):
            row["unit"] = "epoch"
        elif row["unit"] not in UNITS:
            raise LawaError(f"{path}: unit {row['unit']!r} is not one of {', '.join(UNITS)}")
    columns = RESULT_COLUMNS
    if not path.exists():
        header = (",".join(RESULT_COLUMNS) + "\n").encode()
        atomic_write(path, lambda f: f.write(header))
    else:
        _repair_torn_tail(path)
        found = _header(path)
        if found == _COLUMNS_WITHOUT_UNIT:
            if all(row["unit"] == "epoch" for row in rows):
                columns = _COLUMNS_WITHOUT_UNIT
                rows = [{c: v for c, v in row.items() if c != "unit"} for row in rows]
            else:
                _add_unit_column(path)
        elif found != RESULT_COLUMNS:
            raise LawaError(f"{path}: header {','.join(found)!r} is not the tidy schema {','.join(RESULT_COLUMNS)}")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writerows(rows)
    data = buf.getvalue().encode()
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_results(path: str | os.PathLike):
    """Read one tidy CSV into a pandas DataFrame with the columns of :data:`RESULT_COLUMNS`, types checked.

        >>> df = read_results("runs/imagenet/results.csv")
        >>> df[(df.method == "lawa") & (df.k == 6) & (df.metric == "acc1")]

    A last line without its newline is the torn write of a killed run: it is dropped with a notice.
    Columns k and epoch become int, value and wall_seconds float (wall_seconds may be empty), seed a
    nullable Int64; a file without the ``unit`` column, or a row with it empty, reads as ``unit=epoch``.
    ``df.attrs["source"]`` names the file for later error messages.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise LawaError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LawaError(f"{path}: malformed CSV (not UTF-8 text)") from None
    if not text.strip():
        raise LawaError(f"{path}: empty file (expected the header {','.join(RESULT_COLUMNS)})")
    if not text.endswith("\n") and "\n" in text:
        text = text[: text.rindex("\n") + 1]
        print(f"lawa_tidy: {path}: dropped a torn last line (the write of a killed run)", file=sys.stderr)
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise LawaError(f"{path}: malformed CSV ({_first_line(err)})") from None
    missing = [c for c in _COLUMNS_WITHOUT_UNIT if c not in df.columns]
    if missing:
        raise LawaError(f"{path}: missing column(s) {', '.join(missing)} (a tidy CSV has {','.join(RESULT_COLUMNS)})")
    df = df.fillna("")  # short rows come back as NaN even with keep_default_na=False
    if "unit" not in df.columns:
        df["unit"] = "epoch"
    df["unit"] = df["unit"].where(df["unit"] != "", "epoch")

    def require(column, ok, problem):
        if not ok.all():
            row = int((~ok).to_numpy().argmax())
            raise LawaError(f"{path}: line {row + 2}: {column} {df[column].iloc[row]!r} {problem}")

    for column in ("method", "split", "metric"):
        require(column, df[column].str.strip() != "", "is empty")
    for column in ("k", "epoch"):
        numbers = pd.to_numeric(df[column], errors="coerce")
        require(column, numbers.notna() & (numbers == numbers.round()), "is not an integer")
        df[column] = numbers.astype("int64")
    value = pd.to_numeric(df["value"], errors="coerce")
    require("value", value.notna() | (df["value"].str.lower() == "nan"), "is not a number")
    df["value"] = value.astype("float64")
    wall = pd.to_numeric(df["wall_seconds"], errors="coerce")
    require("wall_seconds", wall.notna() | (df["wall_seconds"] == ""), "is not a number")
    df["wall_seconds"] = wall.astype("float64")
    seed = pd.to_numeric(df["seed"], errors="coerce")
    require("seed", seed.notna() | (df["seed"] == ""), "is not an integer")
    df["seed"] = seed.astype("Int64")
    require("unit", df["unit"].isin(UNITS), f"is not one of {', '.join(UNITS)}")
    df = df[list(RESULT_COLUMNS)]
    df.attrs["source"] = str(path)
    return df


def done_cells(
    path: str | os.PathLike,
    labels: Iterable[str],
    splits: Iterable[str],
    metrics: Iterable[str],
    optimizer: str,
    seed: int | None,
    *,
    unit: str | None = "epoch",
) -> dict[str, set[tuple[int, int]]]:
    """For each method label, the ``(epoch, k)`` cells of one trajectory complete in the results CSV ``path``.

        >>> done_cells("results.csv", ["lawa", "baseline"], ["val"], ["loss", "acc1"], "sgd", 0)
        {'lawa': {(5, 2), (6, 2)}, 'baseline': {(5, 1), (6, 1)}}

    A cell is complete when it has a row for every metric of every split asked for, so a cell that a killed
    sweep left halfway is redone. The trajectory is the rows with this ``optimizer`` and ``seed`` (None: rows
    with no seed) and, unless ``unit`` is None, this unit: a step-indexed sweep never takes an epoch-indexed
    row for its own. A missing file has no cells done.
    """
    done: dict[str, set[tuple[int, int]]] = {label: set() for label in labels}
    path = Path(path)
    if not path.exists():
        return done
    rows = read_results(path)
    same_seed = rows["seed"].isna() if seed is None else (rows["seed"] == seed).fillna(False)
    mine = (rows["optimizer"].astype(str) == optimizer) & same_seed & rows["method"].isin(list(done))
    if unit is not None:
        mine &= rows["unit"] == unit
    rows = rows[mine]
    need = {(s, m) for s in splits for m in metrics}
    for (label, end, k), cell in rows.groupby(["method", "epoch", "k"]):
        if need <= set(zip(cell["split"], cell["metric"], strict=True)):
            done[label].add((int(end), int(k)))
    return done


def record_run(
    results: str | os.PathLike, args: argparse.Namespace | Mapping[str, Any], *, info: Mapping[str, Any] | None = None
) -> Path:
    """Append this run's record to ``RESULTS.args.json`` beside a results CSV, atomically; return that path.

        >>> record_run("runs/imagenet/results.csv", args)       # -> runs/imagenet/results.args.json

    The record is ``info`` (default: ``lawa_utils.run_info()``: command, versions, git sha, hardware, start
    time; imported when called, as it reads torch's version) plus the run's settings ``args``. The CSV holds
    the numbers; settings that are not in its columns (batch sizes, data, ...) are kept here, one entry per
    run that computed cells.
    """
    results = Path(results)
    path = results.with_name(results.stem + ".args.json")
    try:
        runs = json.loads(path.read_text()) if path.exists() else []
    except json.JSONDecodeError:
        raise LawaError(f"{path} is not the JSON list of runs this file holds; move it away") from None
    if not isinstance(runs, list):
        raise LawaError(f"{path} is not the JSON list of runs this file holds; move it away")
    if info is None:
        from lawa_utils import run_info

        info = run_info()
    settings = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    runs.append({**info, "args": settings})
    text = json.dumps(runs, indent=2, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()), force=True)
    return path
