"""What every figure shares: size and fonts for a ~700 px README column, colours, labels, saving, the CLI.

    >>> fig, axes = new_figure(2)
    >>> plot_curve(axes[0], base, **line("baseline"))
    >>> save(fig, Path("figs"), "fig1_averaged_vs_baseline")    # figs/fig1_....png and .pdf

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot): no GUI backend, no global figure
list to leak, and PNG/PDF rendering uses the Agg/PDF canvases whatever MPLBACKEND says.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from lawa_tidy import atomic_write
from plots.claims import share_k
from plots.tidy import Inputs, Run, TidyError, add_input_args, inputs_from_args, pick_k, seed_curves, split_metric

__all__ = ["Skip", "new_figure", "save", "line", "plot_curve", "axis_label", "format_axis", "plot_band",
           "kcolors", "TITLES", "figure_main", "runs_with", "results_of", "seed_band_figure", "optimizer_of",
           "seed_table", "draw_seeds", "lawa_k", "seeds_note"]

WIDTH_IN = 7.0    # 7 in at 100 dpi = the 700 px of a README column; fonts below are sized for that
PANEL_HEIGHT_IN = 3.1
DPI = 150         # PNG pixels: 1050 wide, crisp when scaled down to 700
SHORT_CURVE = 20  # curves with at most this many epochs are drawn with markers
matplotlib.rcParams.update({
    "font.size": 10, "axes.titlesize": 10.5, "axes.labelsize": 10, "xtick.labelsize": 9,
    "ytick.labelsize": 9, "legend.fontsize": 8.5, "legend.framealpha": 0.85, "axes.grid": True,
    "grid.alpha": 0.3, "lines.linewidth": 1.6, "axes.spines.top": False, "axes.spines.right": False,
    "pdf.fonttype": 42,  # TrueType in PDFs: editable text, accepted by paper submission systems
})

# Experiment folder -> panel title.
TITLES = {"imagenet": "vision (imagenet/)", "bert": "masked LM (bert/)", "appendix": "appendix runs"}
STYLES = {
    "baseline": {"color": "0.2", "label": "baseline"},
    "sgd": {"color": "0.2", "label": "SGD"},
    "lookahead": {"color": "tab:green", "label": "Lookahead"},
    "lawa": {"color": "tab:blue", "label": "LAWA"},
    "exp": {"color": "tab:orange", "label": "EXP"},
}
NAMES = {"acc1": "top-1 accuracy", "acc5": "top-5 accuracy", "loss": "loss"}
SPLITS = {"val": "validation", "train": "training"}


class Skip(Exception):
    """The inputs a figure needs are absent; the message says which (make_figures prints it and goes on)."""


def new_figure(ncols: int, nrows: int = 1, *, height: float | None = None) -> tuple[Figure, np.ndarray]:
    """A README-width figure with ``nrows`` x ``ncols`` panels (axes returned flat)."""
    fig = Figure(figsize=(WIDTH_IN, height or PANEL_HEIGHT_IN * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def save(fig: Figure, out: Path, stem: str) -> list[Path]:
    """Write ``out/stem.png`` and ``out/stem.pdf``, each whole or not at all; return both paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    for path in paths:
        atomic_write(path, lambda f, fmt=path.suffix[1:]: fig.savefig(f, dpi=DPI, format=fmt), force=True)
    return paths


def line(kind: str, label: str | None = None, **extra) -> dict:
    """Plot keywords of a curve kind (baseline, sgd, lookahead, lawa, exp) with an optional label."""
    style = dict(STYLES[kind])
    if label is not None:
        style["label"] = label
    return {**style, **extra}


def plot_curve(ax: Axes, curve: pd.Series, **style) -> None:
    """A curve by epoch; short curves (embedded runs of a few epochs) get markers so single points show."""
    if len(curve) <= SHORT_CURVE:
        style = {"marker": "o", "ms": 3, **style}
    ax.plot(curve.index, curve.to_numpy(), **style)
    if curve.index.name == "step":  # step-indexed runs (tidy.curve names the index by the rows' unit)
        ax.set_xlabel("step")


def kcolors(ks) -> dict[int, tuple]:
    """One colour per window size, light (small k) to dark (large k)."""
    ks = sorted(ks)
    cmap = matplotlib.colormaps["viridis"]
    return {k: cmap(0.85 - 0.75 * i / max(len(ks) - 1, 1)) for i, k in enumerate(ks)}


def axis_label(metric: str, run_name: str = "") -> str:
    """``val_acc1`` -> 'validation top-1 accuracy'; BERT losses are in bits (fairseq's unit)."""
    split, name = split_metric(metric)
    text = f"{SPLITS.get(split, split)} {NAMES.get(name, name)}"
    if run_name == "bert" and name == "loss":
        text += " (bits)"
    return text


def format_axis(ax: Axes, metric: str, values) -> None:
    """Integer epochs (or steps) on x; accuracies as percent (stored as fractions or as percent); losses spanning more
    than 20× on a log axis."""
    ax.set_xlabel(ax.get_xlabel() or "epoch")  # 'step' when plot_curve drew a step-indexed curve
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if split_metric(metric)[1].startswith("acc"):
        values = np.asarray(values, dtype=float)
        top = 1.0 if np.nanmax(values) <= 1.0 else 100.0
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=top))
    elif split_metric(metric)[1] == "loss":
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        if values.size and values.min() > 0 and values.max() / values.min() > 20:
            ax.set_yscale("log")  # a first epoch with unsettled BatchNorm can sit 100× above the rest


def plot_band(ax: Axes, table: pd.DataFrame, **style) -> pd.Series:
    """Mean over seeds (columns) as a line, ± one sample std as a band; epochs missing a seed are dropped.

    The legend label gets "(n=…)" appended. Returns the mean.
    """
    table = table.dropna()
    mean = table.mean(axis=1)
    n = table.shape[1]
    style["label"] = f"{style.get('label', '')} (n={n})"
    plot_curve(ax, mean, **style)
    if n > 1:
        std = table.std(axis=1, ddof=1)
        ax.fill_between(mean.index, (mean - std).to_numpy(), (mean + std).to_numpy(),
                        color=style.get("color"), alpha=0.2, linewidth=0)
    return mean


def figure_main(make: Callable[[Inputs, Path], list[Path]], prog: str, doc: str,
                argv: list[str] | None) -> int:
    """The command line of one figure script: parse the shared flags, make the figure, report."""
    parser = add_input_args(argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0]))
    args = parser.parse_args(argv)
    try:
        paths = make(inputs_from_args(args), Path(args.out))
    except Skip as why:
        print(f"{prog}: nothing to plot: {why}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    return 0


def runs_with(inputs: Inputs, wanted: list[tuple[str, str]],
              method: str = "baseline") -> list[tuple[Run, str]]:
    """(run, metric) pairs among ``wanted`` (run name, metric) that have baseline rows and ``method`` rows."""
    pairs = []
    for name, metric in wanted:
        run = getattr(inputs, name)
        if run is not None and run.has(metric) and run.has(metric, method):
            pairs.append((run, metric))
    return pairs


def results_of(run: Run, method: str) -> pd.DataFrame:
    """The frame holding ``method``'s rows: the sweep results, else the trainer log (online averaging)."""
    for frame in (run.results, run.log):
        if frame is not None and (frame["method"] == method).any():
            return frame
    raise TidyError(f"{run.name}: no rows with method={method}")


def seed_band_figure(inputs: Inputs, stem: str, out: Path, lines, title: str) -> list[Path]:
    """Appendix figures: mean ± std over seeds, one column per metric (val top-1, val loss).

    The second row repeats the first over the last half of training with its own y-range: that is where
    the curves differ by less than the first row can show. ``lines(run, metric)`` returns
    ``[(kind, label, table)]`` with table = epochs x seeds; empty tables are left out.
    """
    run = inputs.appendix
    metrics = [m for m in ("val_acc1", "val_loss") if run is not None and run.has(m)]
    if not metrics:
        raise Skip("needs --appendix with val_acc1 or val_loss rows of method=baseline")
    fig, axes = new_figure(len(metrics), 2, height=5.6)
    for col, metric in enumerate(metrics):
        full, zoom = axes[col], axes[len(metrics) + col]
        curves = [(kind, label, table.dropna()) for kind, label, table in lines(run, metric)
                  if not table.dropna().empty]
        last = max(int(t.index.max()) for _, _, t in curves)
        values = []
        for kind, label, table in curves:
            values += list(plot_band(full, table, **line(kind, label)))
            plot_band(zoom, table.loc[table.index >= last / 2], **line(kind, label))  # autoscaled y
        zoom.set_xlim(last / 2, last + 0.5)
        zoom.set_title("second half, zoomed", fontsize=9)
        for ax in (full, zoom):
            ax.set_ylabel(axis_label(metric, run.name))
            format_axis(ax, metric, values)
        full.legend(loc="best")
    n = max(table.shape[1] for _, _, table in curves)
    fig.suptitle(f"{title}: mean ± std over seeds (n={n})")
    return save(fig, out, stem)


def seed_table(run: Run, metric: str, method: str = "baseline", k: int | None = None,
               seed: int | None = None) -> pd.DataFrame:
    """One curve of every seed side by side (index epoch, a column per seed); only ``seed`` when given.

        >>> seed_table(inputs.imagenet, "val_acc1", "lawa", 2).mean(axis=1)    # the seeds' mean curve

    The baseline comes from ``Run.baseline_seeds`` (the sweep's rows, the log filling skipped epochs).
    """
    if method == "baseline":
        table = run.baseline_seeds(metric)
    else:
        table = seed_curves(results_of(run, method), metric, method, k)
    if seed is not None:
        if seed not in table.columns:
            raise TidyError(f"{run.name}: {metric} method={method} has no seed={seed}; available: "
                            f"{', '.join(map(str, table.columns)) or 'none'}")
        table = table[[seed]]
    return table


def draw_seeds(ax: Axes, table: pd.DataFrame, **style) -> pd.Series:
    """One seed: its curve; several: their mean ± one sample std as a band (``plot_band``). Returns the curve."""
    if table.shape[1] == 1:
        curve = table.iloc[:, 0].dropna()
        plot_curve(ax, curve, **style)
        return curve
    return plot_band(ax, table, **style)


def lawa_k(run: Run, k: int | None) -> int:
    """The LAWA window a figure shows: ``k`` if given (it must exist), else the paper's share of the run
    (``plots.claims.share_k``: 6 of 90 epochs, the swept k nearest that share of this run)."""
    frame = results_of(run, "lawa")
    if k is not None:
        return pick_k(frame, "lawa", k, default=k)
    ks = sorted(int(v) for v in frame.loc[frame["method"] == "lawa", "k"].unique())
    horizon = max(int(f.loc[f["method"] == "baseline", "epoch"].max()) for f in run.frames()
                  if (f["method"] == "baseline").any())
    return share_k(ks, horizon)


def seeds_note(table: pd.DataFrame) -> str:
    """'' for one seed, else ', n seeds' for a panel title (the legend's '(n=…)' and band say the rest)."""
    return "" if table.shape[1] <= 1 else f", {table.shape[1]} seeds"


def optimizer_of(frame: pd.DataFrame, method: str) -> str | None:
    """The optimizer whose trajectories ``method`` averaged: the only one in its rows, else sgd."""
    names = set(frame.loc[frame["method"] == method, "optimizer"])
    if len(names) == 1:
        return names.pop()
    if "sgd" in names:
        return "sgd"
    raise TidyError(f"{frame.attrs.get('source')}: method={method} rows mix optimizers "
                    f"{', '.join(sorted(names))}; expected one, or sgd among them")
