"""GPU-hours saved by weight averaging: how much longer the baseline needs to match the averaged model.

    >>> result = hours_saved(baseline, lawa, higher_is_better=True, wall_seconds=wall, gpus=4)
    >>> result.headline()
    '10 epochs (2.17 GPU-h) at epoch 20: lawa k=6 0.7512; baseline first as good at epoch 30 (0.7520)'

    $ python plots/hours_saved.py --log runs/imagenet/log.csv --results runs/imagenet/results.csv \\
          --metric val_acc1 --k 6 --gpus 4 --json hours.json

The definition of Kaddour (2022), "GPU hours saved": for each epoch e of the averaged curve take the first
baseline epoch e' whose value is at least as good (>= for accuracies, <= for losses; ties count as a match);
saved(e) = e' - e. The report is the largest saved(e), the epoch where it occurs (the earliest on ties) and
the value matched. Epochs are turned into time by the wall-clock the baseline trainer actually spent between
the end of epoch e and the end of epoch e' (the log's cumulative wall_seconds at e' minus at e), not by an
average epoch time, because epochs are uneven (evaluation, checkpoints, a busy machine); ``epoch_hours``
replaces the measurement by a fixed time per epoch. GPU-hours = wall-clock hours x gpus. The cost of
averaging itself is not counted.

Censoring: where the baseline never reaches the averaged value within its horizon of E epochs, saved(e) is
only known to be at least E + 1 - e epochs (at least the wall-clock measured from e to E). Such a gap is
reported as "≥ n", never as a plain number, and the maximum is then a lower bound too.

Which baseline curve: by default the sweep's own baseline rows (results.csv, method=baseline), because the
sweep evaluates the plain checkpoints exactly as it evaluates the averaged ones; the trainer log's rows are
the fallback, and fills the epochs a sparser sweep skipped (``--baseline-from`` chooses). The averaged curve
comes from results.csv (else the log).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python plots/hours_saved.py` finds `plots`

from plots.tidy import Run, TidyError, curve, higher_is_better, pick_k, read_tidy, run_cli, wall_clock

__all__ = ["Gap", "HoursSaved", "hours_saved", "hours_saved_for_run", "epochs_text", "format_hours", "main"]


def epochs_text(n: int, unit: str = "epoch") -> str:
    """'1 epoch', '3 epochs', '-2 epochs'; '500 steps' with ``unit="step"``."""
    return f"{n} {unit}{'' if abs(n) == 1 else 's'}"


def format_hours(hours: float | None, at_least: bool = False) -> str:
    """GPU time for people: '2.51 GPU-h', '3.2 GPU-min' or '25 GPU-s' (small runs); '≥ ' for a bound."""
    if hours is None:
        return "-"
    if abs(hours) >= 1:
        text = f"{hours:.3g} GPU-h"
    elif abs(hours) * 60 >= 1:
        text = f"{hours * 60:.2g} GPU-min"
    else:
        text = f"{hours * 3600:.0f} GPU-s"
    return ("≥ " if at_least else "") + text


@dataclass(frozen=True)
class Gap:
    """saved(e) for one epoch e of the averaged curve."""

    epoch: int                        # e
    value: float                      # the averaged model's value at e
    baseline_epoch: int | None        # e', the first baseline epoch at least as good; None: never (censored)
    baseline_value: float | None      # the baseline's value at e'
    epochs: int | None                # e' - e; None when censored
    epochs_at_least: int | None       # when censored: E + 1 - e, a lower bound; else None
    gpu_hours: float | None           # GPU-hours between e and e'; None when censored or no timing
    gpu_hours_at_least: float | None  # when censored: GPU-hours measured from e to the horizon E

    @property
    def censored(self) -> bool:
        return self.baseline_epoch is None

    def epochs_text(self) -> str:
        return f"≥ {self.epochs_at_least}" if self.censored else str(self.epochs)

    def hours_text(self) -> str:
        return format_hours(self.gpu_hours_at_least if self.censored else self.gpu_hours, self.censored)


@dataclass(frozen=True)
class HoursSaved:
    """All gaps of one averaged curve against one baseline, with the maximum picked out."""

    gaps: tuple[Gap, ...]
    horizon: int                 # the baseline's last epoch E
    higher_is_better: bool
    label: str                   # the averaged curve's name, e.g. "lawa k=6"
    best_matched: Gap | None     # the largest uncensored gap (earliest epoch on ties)
    first_censored: Gap | None   # the earliest epoch the baseline never matches (largest lower bound)
    unit: str = "epoch"          # what the curves' positions count: 'epoch', or 'step' for step-indexed runs

    @property
    def censored(self) -> bool:
        """True when some epoch is never matched: the maximum is then only a lower bound."""
        return self.first_censored is not None

    @property
    def maximum(self) -> Gap | None:
        """The gap that sets the maximum (a lower bound if ``censored``)."""
        if self.first_censored is None:
            return self.best_matched
        if self.best_matched is not None and self.best_matched.epochs >= self.first_censored.epochs_at_least:
            return self.best_matched
        return self.first_censored

    def headline(self) -> str:
        """One line: the maximum, where it occurs and the value matched."""
        top = self.maximum
        unit = self.unit
        if top is None:
            return f"no {unit}s to compare"
        if not top.censored:
            bound = "≥ " if self.censored else ""
            hours = "" if top.gpu_hours is None else f" ({format_hours(top.gpu_hours, self.censored)})"
            text = (f"{bound}{epochs_text(top.epochs, unit)}{hours} at {unit} {top.epoch}: {self.label} "
                    f"{top.value:.4g}; baseline first as good at {unit} {top.baseline_epoch} "
                    f"({top.baseline_value:.4g})")
        else:
            hours = ("" if top.gpu_hours_at_least is None
                     else f" ({format_hours(top.gpu_hours_at_least, True)})")
            text = (f"≥ {epochs_text(top.epochs_at_least, unit)}{hours} at {unit} {top.epoch}: {self.label} "
                    f"{top.value:.4g}, which the baseline never reaches within its {self.horizon} {unit}s")
        if self.censored and top is self.best_matched:
            text += (f"; censored from {unit} {self.first_censored.epoch} "
                     f"(≥ {self.first_censored.epochs_at_least})")
        return text

    def table(self) -> str:
        """Every epoch's gap as a fixed-width text table."""
        u = self.unit
        rows = [(u, self.label, f"baseline {u}", "baseline value", f"{u}s saved", "GPU time saved")]
        for g in self.gaps:
            rows.append((str(g.epoch), f"{g.value:.4f}",
                         f"never (≤ {self.horizon})" if g.censored else str(g.baseline_epoch),
                         "-" if g.censored else f"{g.baseline_value:.4f}", g.epochs_text(), g.hours_text()))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)

    def to_dict(self) -> dict:
        """JSON-ready: censored gaps have ``epochs: null`` and a lower bound in ``epochs_at_least``."""
        def gap(g: Gap | None) -> dict | None:
            return None if g is None else {**asdict(g), "censored": g.censored}

        top, maximum = self.maximum, None
        if top is not None:
            # The maximum is a lower bound whenever any epoch is censored, even if its own gap is matched.
            epochs = top.epochs if top.epochs is not None else top.epochs_at_least
            hours = top.gpu_hours if not top.censored else top.gpu_hours_at_least
            maximum = {"epoch": top.epoch, "value": top.value, "baseline_epoch": top.baseline_epoch,
                       "baseline_value": top.baseline_value, "censored": self.censored,
                       "epochs": None if self.censored else epochs,
                       "epochs_at_least": epochs if self.censored else None,
                       "gpu_hours": None if self.censored else hours,
                       "gpu_hours_at_least": hours if self.censored else None}
        return {"label": self.label, "unit": self.unit, "higher_is_better": self.higher_is_better,
                "horizon": self.horizon,
                "headline": self.headline(), "maximum": maximum, "best_matched": gap(self.best_matched),
                "first_censored": gap(self.first_censored), "per_epoch": [gap(g) for g in self.gaps]}


def hours_saved(baseline: pd.Series, averaged: pd.Series, higher_is_better: bool, *,
                wall_seconds: pd.Series | None = None, epoch_hours: float | None = None,
                gpus: int = 1, tol: float = 0.0) -> HoursSaved:
    """Compare an averaged curve with the baseline it was averaged from (Kaddour 2022, "GPU hours saved").

        >>> base = pd.Series([0.50, 0.60, 0.70, 0.75], index=[1, 2, 3, 4])
        >>> lawa = pd.Series([0.65, 0.72], index=[2, 3])
        >>> hours_saved(base, lawa, True, epoch_hours=0.5, gpus=4).best_matched.epochs   # 0.65 at e=2, e'=3
        1

    Both series are indexed by epoch (1-based, completed epochs), or by step when their index is named
    ``step`` (``tidy.curve`` of rows with unit=step; texts then count steps). ``wall_seconds`` is the baseline's
    cumulative training seconds by epoch: a gap e -> e' costs wall_seconds[e'] - wall_seconds[e].
    ``epoch_hours`` (if given) replaces it with a fixed wall-clock time per epoch. With neither, only epochs
    are reported. ``tol`` lets a baseline value within tol of the averaged one count as a match.
    """
    if gpus < 1:
        raise TidyError(f"gpus must be >= 1, got {gpus}")
    if epoch_hours is not None and not epoch_hours > 0:
        raise TidyError(f"epoch hours must be > 0, got {epoch_hours}")
    baseline = baseline.dropna().sort_index()
    averaged = averaged.dropna().sort_index()
    if baseline.empty:
        raise TidyError("the baseline curve is empty")
    horizon = int(baseline.index.max())
    use_wall = epoch_hours is None and wall_seconds is not None

    def hours_between(start: int, end: int) -> float | None:
        if epoch_hours is not None:
            return (end - start) * epoch_hours * gpus
        if not use_wall:
            return None
        for epoch in (start, end):
            if epoch not in wall_seconds.index or math.isnan(wall_seconds.loc[epoch]):
                raise TidyError(f"wall_seconds has no value for epoch {epoch} (needed for the gap "
                                f"{start} -> {end}); pass --epoch-hours instead")
        return (float(wall_seconds.loc[end]) - float(wall_seconds.loc[start])) / 3600.0 * gpus

    gaps = []
    for epoch, value in averaged.items():
        epoch = int(epoch)
        good = baseline >= value - tol if higher_is_better else baseline <= value + tol
        if good.any():
            match = int(good.idxmax())  # idxmax of a boolean series: the first True
            gaps.append(Gap(epoch, float(value), match, float(baseline.loc[match]), match - epoch, None,
                            hours_between(epoch, match), None))
        else:
            # Never as good within E epochs: e' >= E + 1. Hours: only the time measured up to E counts
            # (with epoch_hours, the E + 1 - e epochs of the bound).
            at_least = horizon + 1 - epoch
            hours = at_least * epoch_hours * gpus if epoch_hours is not None else (
                hours_between(epoch, horizon) if use_wall else None)
            gaps.append(Gap(epoch, float(value), None, None, None, at_least, None, hours))
    matched = [g for g in gaps if not g.censored]
    censored = [g for g in gaps if g.censored]
    best = max(matched, key=lambda g: (g.epochs, -g.epoch)) if matched else None
    unit = "step" if "step" in (averaged.index.name, baseline.index.name) else "epoch"
    return HoursSaved(tuple(gaps), horizon, higher_is_better, str(averaged.name or "averaged"), best,
                      censored[0] if censored else None, unit)


def hours_saved_for_run(run: Run, metric: str, method: str = "lawa", k: int | None = None, *,
                        seed: int | None = None, optimizer: str | None = None, gpus: int = 1,
                        epoch_hours: float | None = None, higher: bool | None = None,
                        baseline_from: str = "auto", tol: float = 0.0,
                        timing_required: bool = True) -> tuple[HoursSaved, dict]:
    """``hours_saved`` on a run's CSVs, plus a dict saying which rows and which timing were used.

    Without ``epoch_hours`` the time comes from the log's wall_seconds; if there is none, this raises,
    or with ``timing_required=False`` reports epochs only.
    """
    higher = higher_is_better(metric) if higher is None else higher
    sources = [("results", run.results), ("log", run.log)]
    averaged_from = next(((w, f) for w, f in sources
                          if f is not None and (f["method"] == method).any()), None)
    if averaged_from is None:
        where = " or ".join(str(f.attrs.get("source")) for _, f in sources if f is not None)
        raise TidyError(f"{where}: no rows with method={method}")
    k = pick_k(averaged_from[1], method, k, default=6)
    averaged = curve(averaged_from[1], metric, method, k, seed=seed, optimizer=optimizer)
    if baseline_from == "auto":
        baseline, base_where = run.baseline(metric, seed=seed, optimizer=optimizer)
    else:
        frame = run.results if baseline_from == "results" else run.log
        if frame is None:
            raise TidyError(f"--baseline-from {baseline_from} needs --{baseline_from}")
        baseline, base_where = curve(frame, metric, "baseline", seed=seed, optimizer=optimizer), baseline_from
    wall, timing = None, f"fixed {epoch_hours} h per epoch x {gpus} GPU(s)"
    if epoch_hours is None:
        try:
            if run.log is None:
                raise TidyError("no timing: pass --log (its wall_seconds column) or --epoch-hours")
            wall = wall_clock(run.log, seed=seed, optimizer=optimizer)
            timing = (f"measured wall_seconds of {run.log.attrs['source']} between epochs e and e' "
                      f"x {gpus} GPU(s)")
        except TidyError:
            if timing_required:
                raise
            timing = "none (no wall_seconds): epochs only"
    result = hours_saved(baseline, averaged, higher, wall_seconds=wall, epoch_hours=epoch_hours,
                         gpus=gpus, tol=tol)
    frames = dict(sources)
    info = {"metric": metric, "method": method, "k": k, "seed": seed, "optimizer": optimizer,
            "averaged_from": averaged_from[1].attrs.get("source"),
            "baseline_from": " + ".join(str(frames[w].attrs.get("source")) for w in base_where.split("+")),
            "timing": timing, "gpus": gpus,
            "epoch_hours": epoch_hours, "tol": tol}
    return result, info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hours_saved.py", description=__doc__.split("\n\n")[0],
        epilog="Censored gaps (the baseline never matches within its run) are printed as '≥ n'.")
    parser.add_argument("--log", metavar="LOG.csv", help="trainer log: wall_seconds, fallback baseline")
    parser.add_argument("--results", metavar="RESULTS.csv", help="sweep results: averaged and baseline rows")
    parser.add_argument("--metric", required=True, help="<split>_<metric>, e.g. val_acc1 or val_loss")
    parser.add_argument("--method", default="lawa", help="averaged method to compare (default lawa)")
    parser.add_argument("--k", type=int, help="window size (default 6, else the nearest k in the file)")
    parser.add_argument("--gpus", type=int, default=1, help="GPU-hours = wall-clock hours x GPUS (default 1)")
    parser.add_argument("--epoch-hours", type=float, metavar="H",
                        help="fixed wall-clock hours per epoch instead of the log's wall_seconds")
    parser.add_argument("--seed", type=int, help="which seed, if the files hold several")
    parser.add_argument("--optimizer", help="which optimizer, if the files hold several")
    parser.add_argument("--baseline-from", choices=("auto", "results", "log"), default="auto",
                        help="baseline rows from results.csv (auto: when present) or the trainer log")
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--higher-is-better", dest="higher", action="store_true", default=None,
                           help="override the direction inferred from the metric name (acc: higher)")
    direction.add_argument("--lower-is-better", dest="higher", action="store_false",
                           help="override the direction inferred from the metric name (loss: lower)")
    parser.add_argument("--tol", type=float, default=0.0, help="count baseline values within TOL as matched")
    parser.add_argument("--json", metavar="OUT.json", help="also write the full result as JSON")
    args = parser.parse_args(argv)
    if args.log is None and args.results is None:
        parser.error("give --results and/or --log")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("hours_saved", read_tidy(args.log) if args.log else None,
              read_tidy(args.results) if args.results else None)
    result, info = hours_saved_for_run(
        run, args.metric, args.method, args.k, seed=args.seed, optimizer=args.optimizer, gpus=args.gpus,
        epoch_hours=args.epoch_hours, higher=args.higher, baseline_from=args.baseline_from, tol=args.tol)
    direction = "higher" if result.higher_is_better else "lower"
    print(f"{result.label} vs baseline on {args.metric} ({direction} is better); averaged rows from "
          f"{info['averaged_from']}, baseline rows from {info['baseline_from']}; time: {info['timing']}")
    print(result.table())
    print(f"maximum saved: {result.headline()}")
    if args.json:
        Path(args.json).write_text(json.dumps({**info, **result.to_dict()}, indent=1, ensure_ascii=False)
                                   + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "hours_saved.py"))
