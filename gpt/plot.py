#!/usr/bin/env python
"""Figure and table of the Early-Weight-Averaging runs, from gpt/evaluate_lawa.py's tidy results CSVs only.

    python gpt/plot.py --run "LR 3e-2=runs/gpt/lr-high/results.csv" --run "LR 3e-3=runs/gpt/lr-low/results.csv" \
        --k 2 --spacing 4 --ema-k 2 --swa-start 300 --out runs/gpt/figures --table runs/gpt/table.md

One column per run (learning rate): the validation loss (bits) of the plain checkpoints, LAWA over k
consecutive checkpoints, LAWA over k checkpoints spaced s apart (``ewa-s{s}``), the EMA of the checkpoints and
SWA from a start update, by update (top), and each minus the plain checkpoint's loss at the same update
(bottom: below zero is better). The table has every curve in the CSVs (all k, spacings, decays; SWA from
the one start drawn): the loss at a quarter, half and all of the run, and the mean difference to the
baseline over the first and the second half of the run.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plots.figstyle import kcolors, new_figure, plot_curve, save  # noqa: E402
from plots.tidy import TidyError, curve, read_tidy, run_cli  # noqa: E402

PROG = "plot.py"
METRIC = "val_loss"


def lawa_label(spacing: int) -> str:
    """The sweep's label for k checkpoints spaced ``spacing`` apart: ``lawa`` when consecutive, else ``ewa-s{s}``."""
    return "lawa" if spacing == 1 else f"ewa-s{spacing}"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=CSV",
                        help="a run's results CSV and its label (repeat: one column each)")
    parser.add_argument("--k", type=int, default=2, help="LAWA window size to draw, in checkpoints (default: 2)")
    parser.add_argument("--spacing", type=int, default=4, help="spacing of the spaced LAWA curve (default: 4)")
    parser.add_argument("--ema-k", type=int, default=2, help="EMA to draw, by its k = 1/(1-decay) (default: 2)")
    parser.add_argument("--swa-start", type=int, default=None,
                        help="SWA start to draw, in updates (default: the earliest in the CSV)")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpt_ewa.png/.pdf")
    parser.add_argument("--table", type=Path, default=None, help="also write the table (markdown) here")
    return parser


def parse_runs(specs: list[str]) -> list[tuple[str, pd.DataFrame]]:
    runs = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise TidyError(f"--run must be LABEL=CSV, got '{spec}'")
        runs.append((label, read_tidy(path)))
    return runs


def swa_curve(df: pd.DataFrame, start: int | None) -> pd.Series:
    """SWA from one start: rows whose window (k checkpoints ending at E) begins at ``start`` updates."""
    rows = df[(df["method"] == "swa") & (df["split"] == "val") & (df["metric"] == "loss")]
    if rows.empty:
        raise TidyError(f"{df.attrs.get('source')}: no rows with method=swa")
    interval = math.gcd(*(int(e) for e in df["epoch"].unique()))
    starts = rows["epoch"] - (rows["k"] - 1) * interval
    start = int(starts.min()) if start is None else start
    rows = rows[starts == start].drop_duplicates("epoch", keep="last").sort_values("epoch")
    if rows.empty:
        raise TidyError(f"{df.attrs.get('source')}: no SWA from update {start}; starts: "
                        f"{', '.join(str(s) for s in sorted(set(starts)))}")
    return pd.Series(rows["value"].to_numpy(), index=rows["epoch"].to_numpy(), name=f"SWA from {start}")


def named(method: str, k: int, interval: int) -> str:
    """A curve's display name: the method in words, k in checkpoints."""
    if method == "lawa":
        return f"LAWA k={k}"
    if method.startswith("ewa-s"):
        s = int(method[len("ewa-s"):])
        return f"LAWA k={k}, spaced {s} ({method}, {s * interval} updates apart)"
    if method == "ema":
        return f"EMA k={k} (decay {1 - 1 / k:g} per checkpoint)"
    return f"{method} k={k}"


def all_curves(df: pd.DataFrame, swa_start: int | None) -> dict[tuple[str, int], tuple[str, pd.Series]]:
    """Every curve of one run: (method, k) → (display name, loss by update); SWA from one start."""
    interval = math.gcd(*(int(e) for e in df["epoch"].unique()))
    rows = df[(df["split"] == "val") & (df["metric"] == "loss")]
    found = {("baseline", 1): ("baseline", curve(df, METRIC, "baseline"))}
    order = ["lawa", *sorted(m for m in set(rows["method"]) if m.startswith("ewa-s")), "ema"]
    for method in order:
        for k in sorted(int(k) for k in rows.loc[rows["method"] == method, "k"].unique()):
            found[method, k] = (named(method, k, interval), curve(df, METRIC, method, k))
    if (rows["method"] == "swa").any():
        swa = swa_curve(df, swa_start)
        found["swa", 0] = (str(swa.name), swa)
    return found


def plotted(curves: dict, args: argparse.Namespace) -> list[tuple[str, pd.Series, dict]]:
    """The figure's curves: baseline, LAWA k, LAWA k spaced s, EMA, SWA (those present)."""
    colors = kcolors([1, 2, 3, 4])
    wanted = [(("baseline", 1), {"color": "0.2"}), (("lawa", args.k), {"color": colors[1]}),
              ((lawa_label(args.spacing), args.k), {"color": colors[4]}),
              (("ema", args.ema_k), {"color": "tab:orange"}), (("swa", 0), {"color": "tab:red", "linestyle": "--"})]
    missing = [key for key, _ in wanted[:4] if key not in curves]
    if missing:
        raise TidyError(f"no rows for {', '.join(f'{m} k={k}' for m, k in missing)} (--k, --spacing, --ema-k choose; "
                        f"available: {', '.join(f'{m} k={k}' for m, k in curves)})")
    return [(*curves[key], style) for key, style in wanted if key in curves]


def table_rows(label: str, curves: dict) -> list[dict]:
    """Loss at ¼, ½ and the end of the run; mean difference to the baseline over each half of the run
    (over the updates where the curve exists: a window of k checkpoints spaced s apart starts late)."""
    base = curves["baseline", 1][1]
    last = int(base.index.max())
    marks = {f"{q} of run": base.index[abs(base.index - q_frac * last).argmin()]
             for q, q_frac in (("¼", 0.25), ("½", 0.5), ("all", 1.0))}
    rows = []
    for key, (name, series) in curves.items():
        row = {"run": label, "curve": name}
        for mark, update in marks.items():
            row[f"{mark} (update {update})"] = f"{series[update]:.3f}" if update in series.index else "–"
        diff = (series - base).dropna()
        for half, part in (("first", diff[diff.index <= last / 2]), ("second", diff[diff.index > last / 2])):
            row[f"mean Δ, {half} half"] = f"{part.mean():+.3f}" if len(part) and key[0] != "baseline" else "–"
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def make(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    runs = parse_runs(args.run)
    fig, axes = new_figure(len(runs), 2, height=7.2)
    rows = []
    for col, (label, df) in enumerate(runs):
        curves = all_curves(df, args.swa_start)
        rows += table_rows(label, curves)
        top, bottom = axes[col], axes[len(runs) + col]
        base = curves["baseline", 1][1]
        lines = plotted(curves, args)
        for name, series, style in lines:  # a marker on every checkpoint: the curves are sampled there
            plot_curve(top, series, label=name, marker="o", ms=2.5, **style)
            plot_curve(bottom, (series - base).dropna(), label=name, marker="o", ms=2.5, **style)
        # The first updates (loss falling from ~13 bits) would squash the curves: scale to the last 85%.
        cut = 0.15 * base.index.max()
        late = [series[series.index >= cut] for _, series, _ in lines]
        top.set_ylim(min(s.min() for s in late) - 0.05, base[base.index >= cut].max() + 0.1)
        diffs = pd.concat([(s - base).dropna() for s in late])  # a spaced window's first, lagging points clip
        bottom.set_ylim(min(diffs.min(), 0.0) - 0.02, max(diffs.quantile(0.9), 0.05) + 0.02)
        top.set_title(label)
        top.set_ylabel("validation loss (bits)")
        bottom.set_ylabel("minus baseline (bits)")
        bottom.axhline(0.0, color="0.5", linewidth=0.8)
        bottom.set_xlabel("updates")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
    paths = save(fig, args.out, "gpt_ewa")
    table = markdown(rows)
    print(table, end="")
    if args.table is not None:
        args.table.write_text(table)
    print(f"{PROG}: wrote {', '.join(str(p) for p in paths)}" + (f", {args.table}" if args.table else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: bad input prints ``plot.py: <message>`` and returns 2."""
    return run_cli(make, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
