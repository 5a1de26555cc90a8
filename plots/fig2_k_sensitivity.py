"""Figure 2: sensitivity to the window size k: the baseline and LAWA for every k in the sweep, over epochs.

    $ python plots/fig2_k_sensitivity.py --imagenet runs/imagenet --bert runs/bert --out figs

A window of size k ending at epoch E averages checkpoints E-k+1 … E, so the curve of size k starts at E = k.
With several seeds each curve is the seeds' mean with a ± one-std band.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python plots/fig2_....py` finds `plots`

from plots.figstyle import (
    TITLES,
    Skip,
    axis_label,
    draw_seeds,
    figure_main,
    format_axis,
    kcolors,
    line,
    new_figure,
    results_of,
    runs_with,
    save,
    seed_table,
    seeds_note,
)
from plots.tidy import Inputs, run_cli

STEM = "fig2_k_sensitivity"
PANELS = [("imagenet", "val_acc1"), ("bert", "val_loss")]


def make(inputs: Inputs, out: Path) -> list[Path]:
    panels = runs_with(inputs, PANELS, "lawa")
    if not panels:
        raise Skip("needs --imagenet (val_acc1) or --bert (val_loss) with baseline and lawa rows")
    fig, axes = new_figure(len(panels))
    for ax, (run, metric) in zip(axes, panels, strict=True):
        frame = results_of(run, "lawa")
        base = draw_seeds(ax, seed_table(run, metric, seed=inputs.seed), **line("baseline", lw=1.3))
        values = list(base)
        ks = sorted(int(k) for k in frame.loc[frame["method"] == "lawa", "k"].unique())
        for k, color in kcolors(ks).items():
            table = seed_table(run, metric, "lawa", k, inputs.seed)
            values += list(draw_seeds(ax, table, color=color, label=f"LAWA k={k}"))
        ax.set_title(TITLES.get(run.name, run.name) + seeds_note(table))
        ax.set_ylabel(axis_label(metric, run.name))
        format_axis(ax, metric, values)
        ax.legend(loc="best")
    return save(fig, out, STEM)


def main(argv: list[str] | None = None) -> int:
    return figure_main(make, Path(__file__).name, __doc__, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, Path(__file__).name))
