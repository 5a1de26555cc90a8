"""Figure 5 (paper Appendix B): LAWA vs Lookahead vs SGD, mean ± std over seeds.

    $ python plots/fig5_lawa_vs_lookahead.py --appendix runs/appendix --out figs

SGD and Lookahead are the trainers' own curves (optimizer=sgd|lookahead, method=baseline; the sweep's
baseline rows when present, else the log). LAWA averages the SGD trajectories post hoc (method=lawa,
optimizer=sgd, k = --appendix-k, default the paper's 10). Bands are ± one sample standard deviation over
seeds; an epoch missing in any seed is left out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python plots/fig5_....py` finds `plots`

from plots.figstyle import figure_main, optimizer_of, results_of, seed_band_figure
from plots.tidy import Inputs, Run, pick_k, run_cli, seed_curves

STEM = "fig5_lawa_vs_lookahead"


def lines(run: Run, metric: str, k: int | None = None) -> list[tuple[str, str, pd.DataFrame]]:
    """[(kind, label, epochs x seeds)] for SGD, Lookahead and LAWA on SGD; k None: 10, else the nearest."""
    found = [("sgd", "SGD", run.baseline_seeds(metric, optimizer="sgd")),
             ("lookahead", "Lookahead", run.baseline_seeds(metric, optimizer="lookahead"))]
    if run.has(metric, "lawa"):
        frame = results_of(run, "lawa")
        k = pick_k(frame, "lawa", k, default=10)
        optimizer = optimizer_of(frame, "lawa")
        found.append(("lawa", f"LAWA k={k} on {optimizer.upper()}",
                      seed_curves(frame, metric, "lawa", k, optimizer=optimizer)))
    return found


def make(inputs: Inputs, out: Path) -> list[Path]:
    return seed_band_figure(inputs, STEM, out, lambda run, metric: lines(run, metric, inputs.appendix_k),
                            "LAWA vs Lookahead vs SGD")


def main(argv: list[str] | None = None) -> int:
    return figure_main(make, Path(__file__).name, __doc__, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, Path(__file__).name))
