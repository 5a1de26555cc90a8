"""Figure 3: top-5 accuracy and the training/validation losses, baseline vs LAWA.

    $ python plots/fig3_top5_and_losses.py --imagenet runs/imagenet --bert runs/bert --out figs

Panels: vision val top-5, train loss, val loss; masked-LM train loss (its val loss is in figure 1). A panel
appears when its baseline rows exist; LAWA is drawn where the sweep evaluated that metric (sweeps often
evaluate only the validation split). With several seeds: the seeds' mean with a ± one-std band.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python plots/fig3_....py` finds `plots`

from plots.figstyle import (
    TITLES,
    Skip,
    axis_label,
    draw_seeds,
    figure_main,
    format_axis,
    lawa_k,
    line,
    new_figure,
    runs_with,
    save,
    seed_table,
    seeds_note,
)
from plots.tidy import Inputs, higher_is_better, run_cli

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
        base_seeds = seed_table(run, metric, seed=inputs.seed)
        values = list(draw_seeds(ax, base_seeds, **line("baseline")))
        if run.has(metric, "lawa"):
            k = lawa_k(run, inputs.k)
            lawa = seed_table(run, metric, "lawa", k, inputs.seed)
            values += list(draw_seeds(ax, lawa, **line("lawa", f"LAWA k={k}")))
        else:
            ax.annotate("LAWA not evaluated on this split", xy=(0.03, 0.03), xycoords="axes fraction",
                        fontsize=8, color="0.4")
        ax.set_title(TITLES.get(run.name, run.name) + seeds_note(base_seeds))
        ax.set_ylabel(axis_label(metric, run.name))
        format_axis(ax, metric, values)
        ax.legend(loc="lower right" if higher_is_better(metric) else "upper right")
    return save(fig, out, STEM)


def main(argv: list[str] | None = None) -> int:
    return figure_main(make, Path(__file__).name, __doc__, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, Path(__file__).name))
