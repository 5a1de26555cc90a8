"""Figure 6 (paper Appendix C): uniform (LAWA) vs exponential (EXP) coefficients, mean ± std over seeds.

    $ python plots/fig6_uniform_vs_exp.py --appendix runs/appendix --out figs

Both average the same k latest checkpoints of the same trajectories (method=lawa vs method=exp, k =
--appendix-k, default the paper's 10); EXP weights the newest checkpoint by alpha (paper App. C eq. 1).
The trajectories' own baseline is drawn for reference. Bands: ± one sample std over seeds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python plots/fig6_....py` finds `plots`

from plots.figstyle import Skip, figure_main, optimizer_of, results_of, seed_band_figure
from plots.tidy import Inputs, Run, pick_k, run_cli, seed_curves

STEM = "fig6_uniform_vs_exp"


def lines(run: Run, metric: str, k: int | None = None) -> list[tuple[str, str, pd.DataFrame]]:
    """[(kind, label, epochs x seeds)] for the baseline, LAWA and EXP; k None: 10, else the nearest."""
    frame = results_of(run, "exp")
    optimizer = optimizer_of(frame, "exp")
    k = pick_k(frame, "exp", k, default=10)
    found = [("baseline", f"{optimizer.upper()} baseline", run.baseline_seeds(metric, optimizer=optimizer))]
    for method, name in (("lawa", "uniform (LAWA)"), ("exp", "exponential (EXP)")):
        if run.has(metric, method):
            found.append((method, f"{name} k={k}",
                          seed_curves(results_of(run, method), metric, method, k, optimizer=optimizer)))
    return found


def make(inputs: Inputs, out: Path) -> list[Path]:
    run = inputs.appendix
    if run is None or not (run.has("val_acc1", "exp") or run.has("val_loss", "exp")):
        raise Skip("needs --appendix with rows of method=exp (and method=lawa)")
    return seed_band_figure(inputs, STEM, out, lambda run, metric: lines(run, metric, inputs.appendix_k),
                            "uniform vs exponential coefficients")


def main(argv: list[str] | None = None) -> int:
    return figure_main(make, Path(__file__).name, __doc__, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, Path(__file__).name))
