"""Figure 4: the early phase, where averaging hurts: LAWA - baseline per epoch and where LAWA catches up.

    $ python plots/fig4_early_phase.py --imagenet runs/imagenet --bert runs/bert --out figs

Early in training the weights still move fast, so the average of the last k checkpoints lags behind the
newest one; the larger k, the longer. The curve is LAWA minus the baseline (both from the sweep when it
has baseline rows), one line per k; a dot on the zero line marks ``first_crossing``: the first epoch, by
linear interpolation, at which LAWA goes from worse to at least as good as the baseline. With several seeds
the difference is paired (each seed minus its own baseline) and drawn as the seeds' mean ± one std; the dot
is where that mean crosses zero.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from matplotlib.ticker import MaxNLocator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python plots/fig4_....py` finds `plots`

from plots.figstyle import (
    TITLES,
    Skip,
    axis_label,
    draw_seeds,
    figure_main,
    kcolors,
    new_figure,
    results_of,
    runs_with,
    save,
    seed_table,
    seeds_note,
)
from plots.tidy import Inputs, higher_is_better, run_cli, split_metric

STEM = "fig4_early_phase"
PANELS = [("imagenet", "val_acc1"), ("bert", "val_loss")]


def first_crossing(difference: pd.Series, higher_is_better: bool) -> float | None:
    """First epoch at which averaged - baseline turns from worse to at least as good (interpolated).

        >>> first_crossing(pd.Series([-2.0, -1.0, 1.0], index=[2, 3, 4]), higher_is_better=True)
        3.5

    ``difference`` is indexed by epoch. None if the averaged curve is never behind before being at least
    as good (it is ahead from its first epoch, or never catches up).
    """
    gain = difference.dropna().sort_index()
    if not higher_is_better:
        gain = -gain
    epochs, values = gain.index.to_numpy(dtype=float), gain.to_numpy()
    for i in range(1, len(values)):
        if values[i - 1] < 0 <= values[i]:
            return float(epochs[i - 1] + (epochs[i] - epochs[i - 1]) * -values[i - 1]
                         / (values[i] - values[i - 1]))
    return None


def _points(scale: float):
    """Tick labels in signed percentage points ('+2 pt', '0')."""
    return lambda value, _: f"{scale * value:+.3g} pt" if round(scale * value, 6) else "0"


def make(inputs: Inputs, out: Path) -> list[Path]:
    panels = runs_with(inputs, PANELS, "lawa")
    if not panels:
        raise Skip("needs --imagenet (val_acc1) or --bert (val_loss) with baseline and lawa rows")
    fig, axes = new_figure(len(panels), height=4.3)
    for ax, (run, metric) in zip(axes, panels, strict=True):
        frame = results_of(run, "lawa")
        higher = higher_is_better(metric)
        base = seed_table(run, metric, seed=inputs.seed)
        ks = sorted(int(k) for k in frame.loc[frame["method"] == "lawa", "k"].unique())
        ax.axhline(0, color="0.2", lw=1)
        for k, color in kcolors(ks).items():
            lawa = seed_table(run, metric, "lawa", k, inputs.seed)
            paired = lawa.sub(base.reindex(index=lawa.index, columns=lawa.columns)).dropna()  # per seed
            difference = paired.mean(axis=1)
            cross = first_crossing(difference, higher)
            first_gain = difference.iloc[0] * (1 if higher else -1) if len(difference) else -1.0
            note = (f"catches up at epoch {cross:.1f}" if cross is not None
                    else "ahead from the start" if first_gain >= 0 else "never catches up")
            draw_seeds(ax, paired, color=color, label=f"k={k}: {note}")
            if cross is not None:
                ax.plot([cross], [0], "o", color=color, ms=6, mec="black", mew=0.8, zorder=5)
        ax.set_title(TITLES.get(run.name, run.name) + seeds_note(base))
        ax.set_ylabel(f"LAWA − baseline\n{axis_label(metric, run.name)}")
        if split_metric(metric)[1].startswith("acc"):  # points, whether stored as fractions or percent
            ax.yaxis.set_major_formatter(_points(100 if float(base.max().max()) <= 1 else 1))
        # Top right whichever way is better: late in the run the curves meet at 0, far from the top.
        ax.annotate("LAWA better ↑" if higher else "LAWA better ↓", xy=(0.98, 0.97), xycoords="axes fraction",
                    ha="right", va="top", fontsize=8.5, color="0.3")
        ax.set_xlabel(base.index.name if base.index.name == "step" else "epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        # Below the panel: the early, most negative part of the curves is what this figure is about.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=1)
    return save(fig, out, STEM)


def main(argv: list[str] | None = None) -> int:
    return figure_main(make, Path(__file__).name, __doc__, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, Path(__file__).name))
