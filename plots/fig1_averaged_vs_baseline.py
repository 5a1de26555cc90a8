"""Figure 1: LAWA vs the baseline (vision: val top-1; masked LM: val loss), with the hours-saved gap drawn.

    $ python plots/fig1_averaged_vs_baseline.py --imagenet runs/imagenet --bert runs/bert --out figs

The arrow is the largest matched gap of ``hours_saved``: at epoch e LAWA has a value the baseline first
reaches at epoch e'. Where the baseline never reaches LAWA's value within its run, a dashed arrow runs to
the end of the run, labelled "≥ n" (a lower bound, see plots/hours_saved.py). With several seeds the curves
are the seeds' mean with a ± one-std band, the arrow is drawn on the mean curves and the words add each
seed's own gap. k: ``--k``, else the paper's k = 6 of 90 epochs as the same share of this run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python plots/fig1_....py` finds `plots`

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
from plots.hours_saved import epochs_text, format_hours, hours_saved, hours_saved_for_run
from plots.tidy import Inputs, higher_is_better, run_cli

STEM = "fig1_averaged_vs_baseline"
PANELS = [("imagenet", "val_acc1"), ("bert", "val_loss")]


def make(inputs: Inputs, out: Path) -> list[Path]:
    panels = runs_with(inputs, PANELS, "lawa")
    if not panels:
        raise Skip("needs --imagenet (val_acc1) or --bert (val_loss) with baseline and lawa rows")
    fig, axes = new_figure(len(panels))
    for ax, (run, metric) in zip(axes, panels, strict=True):
        k = lawa_k(run, inputs.k)
        lawa_seeds = seed_table(run, metric, "lawa", k, inputs.seed)
        base_seeds = seed_table(run, metric, "baseline", seed=inputs.seed)
        higher = higher_is_better(metric)
        base = draw_seeds(ax, base_seeds, **line("baseline"))
        lawa = draw_seeds(ax, lawa_seeds, **line("lawa", f"LAWA k={k}"))
        if lawa_seeds.shape[1] == 1:  # one seed: the gap with its measured wall-clock time
            saved, _ = hours_saved_for_run(run, metric, "lawa", k, seed=int(lawa_seeds.columns[0]),
                                           gpus=inputs.gpus, timing_required=False)
            _draw_gap(ax, saved)
        else:
            per_seed = [hours_saved(base_seeds[s], lawa_seeds[s], higher) for s in lawa_seeds.columns
                        if s in base_seeds.columns]
            _draw_gap(ax, hours_saved(base, lawa, higher), per_seed)
        ax.set_title(TITLES.get(run.name, run.name) + seeds_note(lawa_seeds))
        ax.set_ylabel(axis_label(metric, run.name))
        format_axis(ax, metric, list(base) + list(lawa))
        if not higher and len(base) > 4:
            # A loss falls by orders of magnitude in the first epochs; the gap lives near the bottom, so the
            # axis starts at the first quarter of the run instead of epoch 1.
            late = list(base.iloc[len(base) // 4 :]) + list(lawa)
            pad = 0.1 * (max(late) - min(late))
            ax.set_ylim(min(late) - pad, max(late) + pad)
        ax.legend(loc="lower right" if higher else "upper right")
    return save(fig, out, STEM)


def _draw_gap(ax, saved, per_seed=()) -> None:
    """Arrow e -> e' at the matched value for the largest matched gap; dashed '≥ n' for a censored one;
    ``per_seed`` (several seeds' results) adds a line with each seed's own maximum.

    The words (short lines, so the box stays narrow) go next to the legend on the side the curves leave empty
    (under a rising accuracy, over a falling loss), tied to the arrow by a thin line, so they do not sit on the
    curves. The arrows are drawn on the mean curves; the last line gives each seed's own gap.
    """
    corner = (0.97, 0.27) if saved.higher_is_better else (0.97, 0.73)
    va = "bottom" if saved.higher_is_better else "top"
    words, anchor = [], None
    g = saved.best_matched
    if g is not None and g.epochs > 0:
        ax.annotate("", xy=(g.baseline_epoch, g.value), xytext=(g.epoch, g.value),
                    arrowprops={"arrowstyle": "-|>", "color": "tab:red", "lw": 1.8, "shrinkA": 0,
                                "shrinkB": 0})
        ax.plot([g.epoch], [g.value], "o", color="tab:red", ms=4, zorder=5)
        hours = "" if g.gpu_hours is None else f" ≈ {format_hours(g.gpu_hours)}"
        words.append(f"{epochs_text(g.epochs)} saved{hours}:\n"
                     f"LAWA at {g.epoch} = baseline at {g.baseline_epoch}")
        anchor = ((g.epoch + g.baseline_epoch) / 2, g.value)
    c = saved.first_censored
    if c is not None and (g is None or c.epochs_at_least > max(g.epochs, 0)):
        ax.annotate("", xy=(saved.horizon + 0.5, c.value), xytext=(c.epoch, c.value),
                    arrowprops={"arrowstyle": "-|>", "color": "tab:red", "lw": 1.2, "ls": "--",
                                "shrinkA": 0, "shrinkB": 0})
        words.append(f"dashed: LAWA at {c.epoch} never\nmatched (≥ {epochs_text(c.epochs_at_least)})")
        anchor = anchor or (c.epoch, c.value)
    if not words:
        words.append("LAWA is never ahead of the baseline")
    if per_seed:
        gaps = [r.maximum for r in per_seed]
        each = ", ".join("-" if g is None else g.epochs_text() for g in gaps)
        words.append(f"per seed: {each} epochs")
    ax.annotate("\n".join(words), xy=anchor or corner, xycoords="data" if anchor else "axes fraction",
                xytext=corner, textcoords="axes fraction", ha="right", va=va, color="tab:red", fontsize=8.5,
                bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1},
                arrowprops=None if anchor is None else {"arrowstyle": "-", "color": "tab:red", "lw": 0.6,
                                                        "alpha": 0.6, "shrinkB": 4})


def main(argv: list[str] | None = None) -> int:
    return figure_main(make, Path(__file__).name, __doc__, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, Path(__file__).name))
