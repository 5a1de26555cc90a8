"""Read and check the repository's tidy CSVs; pull one curve out of them.

    >>> from plots.tidy import read_tidy, curve
    >>> results = read_tidy("runs/imagenet/results.csv")
    >>> lawa = curve(results, "val_acc1", "lawa", k=6)       # pandas Series, value by epoch
    >>> base = curve(results, "val_acc1", "baseline")

Every trainer log and sweep result in this repository has the columns of ``RESULT_COLUMNS`` (see
CONTRIBUTING.md). A metric is addressed as ``<split>_<metric>``, e.g. ``val_acc1`` or ``train_loss``.
Problems with the input raise ``TidyError`` with a one-line message naming the file; command lines print
it as ``<prog>: <message>`` and exit 2 (``run_cli``).

``load_inputs`` reads the experiment folders in the layout described in plots/make_figures.py; every
log.csv and results.csv below a folder is read, so one folder may hold several seeds (seed{N}/ subfolders).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lawa_tidy, when run as plots/<script>.py

import pandas as pd

from lawa_tidy import RESULT_COLUMNS, LawaError, read_results

__all__ = [
    "RESULT_COLUMNS", "TidyError", "read_tidy", "split_metric", "available_metrics", "higher_is_better",
    "curve", "seed_curves", "wall_clock", "pick_k", "Run", "Inputs", "load_run", "load_inputs",
    "add_input_args", "inputs_from_args", "run_cli", "folders_from",
]

class TidyError(LawaError):
    """Bad or missing input, described in one line for people (the file, the value, what is available)."""


def _names(values) -> str:
    """Distinct values, numbers in numeric order, as 'a, b, c' for messages."""
    def order(value):
        try:
            return (0, float(value), "")
        except (TypeError, ValueError):
            return (1, 0.0, str(value))

    return ", ".join(str(v) for v in sorted(set(values), key=order)) or "none"


def _source(df: pd.DataFrame) -> str:
    return df.attrs.get("source", "input")


def read_tidy(path: str | Path) -> pd.DataFrame:
    """Read one tidy CSV and check its columns and types (``lawa_tidy.read_results``).

        >>> df = read_tidy("runs/imagenet/log.csv")
    """
    try:
        return read_results(path)
    except LawaError as err:
        raise TidyError(str(err)) from None


def split_metric(metric: str) -> tuple[str, str]:
    """``"val_acc1"`` -> ``("val", "acc1")``; the split is everything before the first underscore."""
    split, sep, name = metric.partition("_")
    if not sep or not split or not name:
        raise TidyError(f"metric {metric!r} is not of the form <split>_<metric>, e.g. val_acc1")
    return split, name


def available_metrics(df: pd.DataFrame) -> list[str]:
    """Sorted ``<split>_<metric>`` names present in ``df``."""
    return sorted(set(df["split"] + "_" + df["metric"]))


def higher_is_better(metric: str) -> bool:
    """Direction of improvement from the metric's name: accuracies go up, losses and errors go down."""
    name = split_metric(metric)[1].lower()
    if name.startswith("acc") or name.startswith("top"):
        return True
    if any(word in name for word in ("loss", "ppl", "perplexity", "err", "nll", "bits")):
        return False
    raise TidyError(f"cannot tell whether higher or lower {metric} is better; "
                    "pass --higher-is-better or --lower-is-better")


def _metric_rows(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    split, name = split_metric(metric)
    rows = df[(df["split"] == split) & (df["metric"] == name)]
    if rows.empty:
        raise TidyError(f"{_source(df)}: unknown metric {metric}; available: {_names(available_metrics(df))}")
    return rows


def curve(df: pd.DataFrame, metric: str, method: str, k: int | None = None, *,
          seed: int | None = None, optimizer: str | None = None) -> pd.Series:
    """One curve (value by epoch, sorted) for ``method`` at window size ``k``; the index is named ``step`` when
    the rows carry unit=step (else ``epoch``).

        >>> curve(results, "val_acc1", "lawa", k=6).loc[10]

    k is ignored for ``baseline``. The selection must leave one run: if several seeds, optimizers or k
    remain, this raises and lists them. A cell written twice (a rerun appended to the file) keeps its
    last value.
    """
    rows = _metric_rows(df, metric)
    name = f"{_source(df)}: {metric}"
    if method not in set(rows["method"]):
        raise TidyError(f"{name}: no rows with method={method}; available: {_names(rows['method'])}")
    rows = rows[rows["method"] == method]
    choices = {"optimizer": optimizer, "seed": seed}
    if method != "baseline":
        choices["k"] = k
    for column, wanted in choices.items():
        if wanted is not None:
            chosen = rows[(rows[column] == wanted).fillna(False)]
            if chosen.empty:
                raise TidyError(f"{name}: method={method} has no {column}={wanted}; "
                                f"available: {_names(rows[column].dropna())}")
            rows = chosen
        elif rows[column].nunique(dropna=False) > 1:
            raise TidyError(f"{name}: method={method} has several {column} values "
                            f"({_names(rows[column].astype(str))}); choose one with --{column}")
    rows = rows.drop_duplicates("epoch", keep="last").sort_values("epoch")
    label = method if method == "baseline" else f"{method} k={int(rows['k'].iloc[0])}"
    # The index is named by the rows' unit: 'step' for step-indexed runs, so axes and texts can say so.
    unit = "step" if "unit" in rows and len(rows) and (rows["unit"] == "step").all() else "epoch"
    return pd.Series(rows["value"].to_numpy(), index=pd.Index(rows["epoch"].to_numpy(), name=unit),
                     name=label)


def seed_curves(df: pd.DataFrame, metric: str, method: str, k: int | None = None, *,
                optimizer: str | None = None) -> pd.DataFrame:
    """Curves of every seed side by side: index epoch, one column per seed (NaN where a run is shorter).

    Seeds without rows of this k (a sweep still running) are left out, not an error.
    """
    rows = _metric_rows(df, metric)
    rows = rows[rows["method"] == method]
    if optimizer is not None:
        rows = rows[rows["optimizer"] == optimizer]
    if k is not None and method != "baseline":
        rows = rows[rows["k"] == k]
    seeds = sorted(rows["seed"].dropna().unique())
    if not seeds:
        return pd.DataFrame()
    return pd.DataFrame({int(s): curve(df, metric, method, k, seed=int(s), optimizer=optimizer)
                         for s in seeds})


def wall_clock(log: pd.DataFrame, *, seed: int | None = None, optimizer: str | None = None) -> pd.Series:
    """Cumulative training seconds at the end of each epoch, from a trainer log's wall_seconds column."""
    rows = log[(log["method"] == "baseline") & log["wall_seconds"].notna()]
    for column, wanted in (("seed", seed), ("optimizer", optimizer)):
        if wanted is not None:
            rows = rows[(rows[column] == wanted).fillna(False)]
        elif rows[column].nunique(dropna=False) > 1:
            raise TidyError(f"{_source(log)}: several {column} values ({_names(rows[column].astype(str))}); "
                            f"choose one with --{column}")
    if rows.empty:
        raise TidyError(f"{_source(log)}: no wall_seconds for method=baseline"
                        f"{'' if seed is None else f' seed={seed}'}; pass --epoch-hours instead")
    # Every metric row of an epoch carries the same time; max() also survives a rerun appended later.
    return rows.groupby("epoch")["wall_seconds"].max().sort_index()


def pick_k(df: pd.DataFrame, method: str, k: int | None, default: int) -> int:
    """The window size to plot: ``k`` if given (it must exist); else ``default`` if present, else the k
    nearest to it (the smaller on ties), with a one-line notice on stderr."""
    ks = sorted(int(v) for v in df.loc[df["method"] == method, "k"].unique())
    if not ks:
        raise TidyError(f"{_source(df)}: no rows with method={method}; available: {_names(df['method'])}")
    if k is not None:
        if k not in ks:
            raise TidyError(f"{_source(df)}: method={method} has no k={k}; available k: {_names(ks)}")
        return k
    if default in ks:
        return default
    chosen = min(ks, key=lambda v: (abs(v - default), v))
    if len(ks) > 1:
        print(f"tidy: {_source(df)}: no {method} k={default}; using k={chosen} (available: {_names(ks)}; "
              "--k chooses)", file=sys.stderr)
    return chosen


@dataclass
class Run:
    """The tidy CSVs of one experiment: the trainer log(s) and the sweep result(s); either may be None."""

    name: str
    log: pd.DataFrame | None = None
    results: pd.DataFrame | None = None

    def has(self, metric: str, method: str = "baseline") -> bool:
        """Whether any of the frames holds rows of ``method`` for ``metric``."""
        return any(_mask(f, metric, method).any() for f in self.frames())

    def frames(self) -> list[pd.DataFrame]:
        return [f for f in (self.results, self.log) if f is not None]

    def baseline(self, metric: str, *, seed: int | None = None,
                 optimizer: str | None = None) -> tuple[pd.Series, str]:
        """The baseline curve and where it came from (``"results"``, ``"log"`` or ``"results+log"``).

        The sweep's own baseline rows are preferred: they are evaluated exactly as the averaged models
        (same data, same BN treatment). Epochs the sweep skipped (a sweep of every 2nd end epoch) are filled
        from the trainer log, so a match is not pushed to the next swept epoch; the log alone is the fallback.
        """
        found = {where: curve(frame, metric, "baseline", seed=seed, optimizer=optimizer)
                 for where, frame in (("results", self.results), ("log", self.log))
                 if frame is not None and _mask(frame, metric, "baseline", seed, optimizer).any()}
        if "results" in found and "log" in found:
            filled = found["results"].combine_first(found["log"])
            return (filled, "results+log") if len(filled) > len(found["results"]) else (found["results"], "results")
        for where in ("results", "log"):
            if where in found:
                return found[where], where
        available = {m for f in self.frames() for m in available_metrics(f[f["method"] == "baseline"])}
        where = " or ".join(_source(f) for f in self.frames()) or self.name
        raise TidyError(f"{where}: no baseline rows for {metric}"
                        f"{'' if seed is None else f' seed={seed}'}"
                        f"{'' if optimizer is None else f' optimizer={optimizer}'}; "
                        f"available: {_names(available)}")

    def baseline_seeds(self, metric: str, optimizer: str | None = None) -> pd.DataFrame:
        """Baseline curves of every seed (index epoch, a column per seed), each from results or log."""
        seeds = {int(s) for f in self.frames()
                 for s in f.loc[_mask(f, metric, "baseline", optimizer=optimizer), "seed"].dropna().unique()}
        return pd.DataFrame({s: self.baseline(metric, seed=s, optimizer=optimizer)[0] for s in sorted(seeds)})


def _mask(frame: pd.DataFrame, metric: str, method: str, seed: int | None = None,
          optimizer: str | None = None) -> pd.Series:
    split, name = split_metric(metric)
    ok = (frame["split"] == split) & (frame["metric"] == name) & (frame["method"] == method)
    if seed is not None:
        ok &= (frame["seed"] == seed).fillna(False)
    if optimizer is not None:
        ok &= frame["optimizer"] == optimizer
    return ok


def _concat(directory: Path, paths: Sequence[Path]) -> pd.DataFrame | None:
    if not paths:
        return None
    frames = [read_tidy(p) for p in paths]
    if len(frames) == 1:
        return frames[0]
    df = pd.concat(frames, ignore_index=True)
    df.attrs["source"] = f"{directory}/**/{paths[0].name}"
    return df


def load_run(directory: str | Path | None, name: str, *, recursive: bool = False) -> Run | None:
    """``directory``'s log.csv and results.csv (all of them below it if ``recursive``).

    None, with a one-line notice on stderr, when the folder or both files are missing: the figures that
    need them are then skipped. Files that exist but are malformed raise ``TidyError``.
    """
    if directory is None:
        return None
    directory = Path(directory)
    if not directory.is_dir():
        print(f"tidy: --{name} {directory}: no such directory", file=sys.stderr)
        return None
    find = directory.rglob if recursive else directory.glob
    log = _concat(directory, sorted(find("log.csv")))
    results = _concat(directory, sorted(find("results.csv")))
    if log is None and results is None:
        below = sorted(str(p.relative_to(directory)) for p in directory.rglob("*.csv"))[:3]
        hint = f" (below it: {', '.join(below)}; pass the folder that holds them)" if below else ""
        print(f"tidy: --{name} {directory}: no log.csv or results.csv{hint}", file=sys.stderr)
        return None
    return Run(name, log, results)


@dataclass
class Inputs:
    """Everything the figures read, plus the choices the command line made."""

    imagenet: Run | None = None
    bert: Run | None = None
    appendix: Run | None = None
    gpt: Run | None = None          # the high-LR GPT run of gpt/ (its lr-high folder), when that stage ran
    k: int | None = None            # LAWA window, imagenet/bert (None: the paper's share of the run, 6 of 90)
    appendix_k: int | None = None   # LAWA/EXP window, appendix (None: the paper's 10, else the nearest k)
    seed: int | None = None         # one seed of imagenet/bert; None: every seed (figures draw seed bands)
    gpus: int = 1                   # GPU-hours = wall-clock hours x gpus


def load_inputs(imagenet=None, bert=None, appendix=None, gpt=None, **choices) -> Inputs:
    """Read the experiment folders (layout: plots/make_figures.py), each with every CSV below it; absent: None.

        >>> inputs = load_inputs("runs/imagenet", "runs/bert", "runs/appendix")
    """
    return Inputs(load_run(imagenet, "imagenet", recursive=True), load_run(bert, "bert", recursive=True),
                  load_run(appendix, "appendix", recursive=True), load_run(gpt, "gpt", recursive=True), **choices)


def folders_from(root: str | Path) -> dict[str, Path | None]:
    """The experiment folders below one output folder, as reproduce_all.sh lays them out (absent: None).

        >>> folders_from("docs/results")["imagenet"]
        PosixPath('docs/results/imagenet')

    ``imagenet/``, ``bert/``, ``appendix/`` and the high-LR run of ``gpt/`` (``gpt/lr-high/``).
    """
    root = Path(root)
    if not root.is_dir():
        raise TidyError(f"--from {root}: no such directory")
    found = {name: root / name for name in ("imagenet", "bert", "appendix")}
    found["gpt"] = root / "gpt" / "lr-high"
    found = {name: path if path.is_dir() else None for name, path in found.items()}
    if not any(found.values()):
        raise TidyError(f"--from {root}: none of imagenet/, bert/, appendix/, gpt/lr-high/ is there")
    return found


def add_input_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every figure command shares."""
    parser.add_argument("--imagenet", metavar="DIR", help="log.csv and/or results.csv of the vision run")
    parser.add_argument("--bert", metavar="DIR", help="log.csv and/or results.csv of the masked-LM run")
    parser.add_argument("--appendix", metavar="DIR",
                        help="Appendix B/C runs: DIR/**/log.csv and results.csv, e.g. seed0/sgd/log.csv")
    parser.add_argument("--gpt", metavar="DIR", help="the high-LR run of gpt/ (its lr-high folder)")
    parser.add_argument("--from", dest="root", metavar="DIR",
                        help="one output folder of reproduce_all.sh (or docs/results): its imagenet/, bert/, "
                             "appendix/ and gpt/lr-high/; the flags above override single folders")
    parser.add_argument("--out", metavar="FIGDIR", required=True, help="where PNG and PDF files go")
    parser.add_argument("--k", type=int, help="LAWA window for imagenet/bert (default 6, else the nearest k)")
    parser.add_argument("--appendix-k", type=int,
                        help="LAWA/EXP window, appendix (default 10, else the nearest k)")
    parser.add_argument("--seed", type=int,
                        help="one seed of the imagenet/bert runs (default: every seed, drawn as a band)")
    parser.add_argument("--gpus", type=int, default=1, help="GPU-hours = wall-clock hours x GPUS (default 1)")
    return parser


def inputs_from_args(args: argparse.Namespace) -> Inputs:
    """The folders the flags name (``--from`` first, single flags override), read."""
    folders = folders_from(args.root) if getattr(args, "root", None) else {}
    for name in ("imagenet", "bert", "appendix", "gpt"):
        if getattr(args, name, None):
            folders[name] = getattr(args, name)
    return load_inputs(folders.get("imagenet"), folders.get("bert"), folders.get("appendix"), folders.get("gpt"),
                       k=args.k, appendix_k=args.appendix_k, seed=args.seed, gpus=args.gpus)


def run_cli(main: Callable[[list[str] | None], int | None], prog: str,
            argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; a ``TidyError`` becomes ``<prog>: <message>`` on stderr and exit status 2."""
    try:
        return main(argv) or 0
    except TidyError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head` closed the pipe: not an error of ours, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
