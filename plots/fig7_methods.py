"""Figure 7 and its table: averaging methods side by side on the same SGD trajectories, mean ± std over seeds.

    $ python plots/fig7_methods.py --appendix runs/appendix --out figs

Every curve is built post hoc from the appendix runs' checkpoints (the sweep rows of their results.csv:
reproduce_all.sh's appendix and methods stages): the plain checkpoints (baseline), LAWA and EXP at
--appendix-k (default the paper's 10, else the nearest), EMA per decay d (the CSV's k is 1/(1−d); the legend
shows d = 1 − 1/k, exact for the decays lawa_methods recommends), SWA per start epoch s (the mean of
checkpoints s … E), EWA per spacing and k (k checkpoints s epochs apart, ending at E) and TWA at the end
epochs it was trained for. Bands are ± one sample std over seeds; an epoch missing in any seed is left out.

The table (:func:`table`; summary.md and summary.json): per curve, epochs to target, best and final val
top-1, the final val top-1 minus the same seed's baseline (paired) and the final val loss, mean ± sample std
over seeds. A seed's target is its own baseline's final val
top-1 minus ``TARGET_POINTS`` = 1 point, i.e. "within a point of where plain training ends"; epochs to
target is the first end epoch E at which the curve reaches it. Seeds that never reach it are counted, not
averaged. TWA trains after E (its own passes over the training set): that cost is not in E.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python plots/fig7_....py` finds `plots`

from plots.figstyle import (
    NAMES,
    Skip,
    axis_label,
    figure_main,
    format_axis,
    new_figure,
    optimizer_of,
    plot_curve,
    save,
)
from plots.tidy import Inputs, Run, pick_k, run_cli, split_metric

STEM = "fig7_methods"
TARGET_POINTS = 1.0  # a seed's target: its final baseline val top-1 minus this many percentage points
# The sweep methods, in legend order (the CSV's method column; EWA's is ewa-s{spacing}); this figure needs
# rows of one beyond LAWA and EXP.
ORDER = ("lawa", "exp", "ema", "swa", "ewa", "twa")
COLORS = {"baseline": "0.2", "lawa": "tab:blue", "exp": "tab:orange", "ema": "tab:purple", "swa": "tab:red",
          "ewa": "tab:brown", "twa": "tab:green"}
DASHES = ("-", "--", ":", "-.")  # a method's first, second, … curve


@dataclass
class Curve:
    kind: str  # baseline, lawa, exp, ema, swa, ewa or twa: the colour
    label: str  # legend and table
    table: pd.DataFrame  # index epoch, one column per seed


def _kind(method: str) -> str:
    return "ewa" if method.startswith("ewa-s") else method


def has_methods(run: Run | None) -> bool:
    """Whether ``run`` has sweep rows of a method beyond LAWA and EXP (what this figure adds)."""
    return run is not None and run.results is not None and run.results["method"].map(_kind).isin(ORDER[2:]).any()


def _seed_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Epochs × seeds of ``rows``' values; a cell written twice (a rerun appended to the file) keeps the last."""
    rows = rows.drop_duplicates(["seed", "epoch"], keep="last")
    table = rows.pivot(index="epoch", columns="seed", values="value").sort_index()
    table.columns = [int(s) for s in table.columns]
    return table


def curves(run: Run, metric: str, k: int | None = None) -> list[Curve]:
    """The baseline, then each method's curves (sweep rows of ``run.results``) on the averaged optimizer's runs."""
    frame = run.results
    swept = frame[frame["method"].map(_kind).isin(ORDER)]
    optimizer = optimizer_of(frame, swept["method"].iloc[0]) if len(swept) else "sgd"
    found = [Curve("baseline", f"{optimizer.upper()} baseline", run.baseline_seeds(metric, optimizer=optimizer))]
    split, name = split_metric(metric)
    rows = swept[(swept["split"] == split) & (swept["metric"] == name) & (swept["optimizer"] == optimizer)]
    for method in sorted(rows["method"].unique(), key=lambda m: (ORDER.index(_kind(m)), m)):
        kind, mine = _kind(method), rows[rows["method"] == method]
        sizes = sorted(int(v) for v in mine["k"].unique())
        if kind in ("lawa", "exp"):
            size = pick_k(frame, method, k, default=10)
            groups = [(f"{kind.upper()} k={size}", mine["k"] == size)]
        elif kind == "ema":
            groups = [(f"EMA d={1 - 1 / size:.3g}", mine["k"] == size) for size in sizes]
        elif kind == "swa":  # one curve per start s = E − k + 1; its k grows with E
            start = mine["epoch"] - mine["k"] + 1
            groups = [(f"SWA from epoch {s}", start == s) for s in sorted(start.unique())]
        elif kind == "ewa":
            spacing = method.removeprefix("ewa-s")
            groups = [(f"EWA k={size}, every {spacing}", mine["k"] == size) for size in sizes]
        else:  # twa: a point per trained range, whatever its length
            groups = [("TWA", mine["k"] > 0)]
        found += [Curve(kind, label, _seed_table(mine[chosen])) for label, chosen in groups]
    return found


def _draw(ax, table: pd.DataFrame, style: dict, band: bool) -> None:
    """Mean over seeds (columns), with ± one sample std over seeds as a band (``band``); TWA's separate
    points get error bars instead. Epochs missing in any seed are left out."""
    table = table.dropna()
    mean = table.mean(axis=1)
    std = table.std(axis=1, ddof=1) if band and table.shape[1] > 1 else None
    if style.get("linestyle") == "none":
        ax.errorbar(mean.index, mean.to_numpy(), yerr=None if std is None else std.to_numpy(), capsize=3, **style)
        return
    plot_curve(ax, mean, **style)
    if std is not None:
        ax.fill_between(mean.index, (mean - std).to_numpy(), (mean + std).to_numpy(), color=style["color"],
                        alpha=0.15, linewidth=0)


def make(inputs: Inputs, out: Path) -> list[Path]:
    """Top row: each curve's mean over seeds, the baseline's band showing how far the seeds' runs differ;
    bottom row: each method minus its seed's own baseline (paired), mean ± std over seeds."""
    run = inputs.appendix
    if not has_methods(run):
        raise Skip("needs --appendix with rows of method=ema, swa, ewa-s* or twa (reproduce_all.sh's methods stage)")
    metrics = [m for m in ("val_acc1", "val_loss") if run.has(m)]
    fig, axes = new_figure(len(metrics), 2, height=6.6)
    n = 0
    for col, metric in enumerate(metrics):
        level, paired = axes[col], axes[len(metrics) + col]
        found = [c for c in curves(run, metric, inputs.appendix_k) if not c.table.dropna().empty]
        base, methods = found[0].table, found[1:]
        # Only the epochs where something is compared: the baseline alone before that is fig4's subject.
        first = min(int(c.table.dropna().index.min()) for c in methods)
        last = max(int(c.table.index.max()) for c in found)
        values, used = [], {}
        for c in found:
            style = {"color": COLORS[c.kind], "label": c.label, "linestyle": DASHES[used.get(c.kind, 0) % len(DASHES)]}
            used[c.kind] = used.get(c.kind, 0) + 1
            if c.kind == "twa":  # a few trained end epochs: points, not a line
                style.update(linestyle="none", marker="D", ms=5)
            shown = c.table.loc[c.table.index >= first]
            _draw(level, shown, style, band=c.kind == "baseline")
            values += list(shown.mean(axis=1))
            if c.kind != "baseline":
                _draw(paired, shown.sub(base.reindex(index=shown.index, columns=shown.columns)), style, band=True)
            n = max(n, c.table.shape[1])
        paired.axhline(0.0, color=COLORS["baseline"], linewidth=1.2)
        level.set_ylabel(axis_label(metric, run.name))
        paired.set_ylabel(f"{NAMES[split_metric(metric)[1]]} − baseline")
        paired.set_title("paired: each seed minus its own baseline", fontsize=9)
        format_axis(level, metric, values)
        format_axis(paired, metric, values)
        for ax in (level, paired):
            ax.set_xlim(first - 0.3, last + 0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=8)
    fig.suptitle(f"averaging methods on the same trajectories: mean ± std over seeds (n={n})")
    return save(fig, out, STEM)


def _stats(name: str, values: pd.Series) -> dict:
    """``{name}_mean`` and ``{name}_std`` (sample std; None for one value) of ``values``, NaN left out."""
    values = values.dropna()
    mean = float(values.mean()) if len(values) else None
    return {f"{name}_mean": mean, f"{name}_std": float(values.std(ddof=1)) if len(values) > 1 else None}


def _final(table: pd.DataFrame) -> tuple[int | None, pd.Series]:
    """The last epoch every seed reached, and the seeds' values there."""
    complete = table.dropna()
    return (int(complete.index[-1]), complete.iloc[-1]) if len(complete) else (None, pd.Series(dtype=float))


def table(run: Run, k: int | None = None) -> dict:
    """Epochs to target, best and final val top-1 and final val loss of every curve, mean ± std over seeds.

    ``run`` must have results rows (``has_methods``). Returns the target's definition and per-seed values,
    and one dict per curve; ``target_epochs`` maps each seed to its first epoch at the target, or None.
    """
    acc = curves(run, "val_acc1", k)
    base_epoch, base_final = _final(acc[0].table)
    points = TARGET_POINTS if base_final.max() > 1 else TARGET_POINTS / 100  # percent, or fractions
    targets = base_final - points
    losses = {c.label: c.table for c in curves(run, "val_loss", k)} if run.has("val_loss") else {}
    rows = []
    for c in acc:
        values = c.table[[s for s in c.table.columns if s in targets.index]].dropna(how="all")
        if values.empty:
            continue
        hit = values.ge(targets[values.columns])  # NaN (an epoch not evaluated) never counts as reached
        reached = {int(s): int(hit.index[hit[s]][0]) if hit[s].any() else None for s in values.columns}
        final_epoch, final = _final(values)
        delta = final - acc[0].table.loc[final_epoch, final.index] if final_epoch is not None else final
        loss_epoch, loss = _final(losses.get(c.label, pd.DataFrame()))
        rows.append({"curve": c.label, "kind": c.kind, "seeds": [int(s) for s in values.columns],
                     "n": values.shape[1], "target_epochs": reached,
                     "reached": sum(e is not None for e in reached.values()),
                     **_stats("target_epochs", pd.Series(list(reached.values()), dtype=float)),
                     **_stats("best", values.max()), "final_epoch": final_epoch, **_stats("final", final),
                     **_stats("final_minus_baseline", delta),
                     "final_loss_epoch": loss_epoch, **_stats("final_loss", loss)})
    return {"metric": "val_acc1", "target_points": points, "baseline_final_epoch": base_epoch,
            "targets": {int(s): float(v) for s, v in targets.items()}, "curves": rows}


def main(argv: list[str] | None = None) -> int:
    return figure_main(make, Path(__file__).name, __doc__, argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, Path(__file__).name))
