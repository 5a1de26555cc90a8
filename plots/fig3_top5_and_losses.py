"""Figure 3: top-5 accuracy and the training/validation losses, baseline vs LAWA.

    $ python plots/fig3_top5_and_losses.py --imagenet runs/imagenet --bert runs/bert --out figs

Panels: vision val top-5, train loss, val loss; masked-LM train loss (its val loss is in figure 1). A panel
appears when its baseline rows exist; LAWA is drawn where the sweep evaluated that metric (sweeps often
evaluate only the validation split).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python plots/fig3_....py` finds `plots`

from plots.figstyle import (
    TITLES,
    Skip,
    axis_label,
    figure_main,
    format_axis,
    line,
    new_figure,
    plot_curve,
    results_of,
    runs_with,
    save,
)
from plots.tidy import Inputs, curve, higher_is_better, pick_k, run_cli

STEM = "fig3_top5_and_losses"
PANELS = [("imagenet", "val_acc5"), ("imagenet", "train_loss"), ("imagenet", "val_loss"),
          ("bert", "train_loss")]


def make(inputs: Inputs, out: Path) -> list[Path]:
    panels = runs_with(inputs, PANELS)
    if not panels:
        raise Skip("needs --imagenet with val_acc5/train_loss/val_loss or --bert with train_loss rows")
    ncols = min(len(panels), 2)
    nrows = -(-len(panels) // ncols)
    fig, axes = new_figure(ncols, nrows)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (run, metric) in zip(axes, panels, strict=False):
        base, _ = run.baseline(metric, seed=inputs.seed)
        plot_curve(ax, base, **line("baseline"))
        values = list(base)
        if run.has(metric, "lawa"):
            frame = results_of(run, "lawa")
            k = pick_k(frame, "lawa", inputs.k, default=6)
            lawa = curve(frame, metric, "lawa", k, seed=inputs.seed)
            plot_curve(ax, lawa, **line("lawa", f"LAWA k={k}"))
            values += list(lawa)
        else:
            ax.annotate("LAWA not evaluated on this split", xy=(0.03, 0.03), xycoords="axes fraction",
                        fontsize=8, color="0.4")
        ax.set_title(TITLES.get(run.name, run.name))
        ax.set_ylabel(axis_label(metric, run.name))
        format_axis(ax, metric, values)
        ax.legend(loc="lower right" if higher_is_better(metric) else "upper right")
    return save(fig, out, STEM)


def main(argv: list[str] | None = None) -> int:
    return figure_main(make, Path(__file__).name, __doc__, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, Path(__file__).name))
