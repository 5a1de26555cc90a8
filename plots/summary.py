"""The numbers behind the figures: the paper's claims judged over seeds, GPU time saved, best and final metrics
(mean ± std over seeds and each seed), the appendix over seeds, and the averaging methods' epochs to target.

    >>> data = summarize(load_inputs("runs/imagenet", "runs/bert", "runs/appendix"))
    >>> Path("figs/summary.md").write_text(to_markdown(data))

Best is the highest accuracy / lowest loss over epochs, final the value at the last epoch, both taken per seed
first and then as mean ± sample std over seeds (final: the last epoch that every seed reached). The claims
and their rule: plots/claims.py.
"""

from __future__ import annotations

import statistics

from plots import fig5_lawa_vs_lookahead, fig6_uniform_vs_exp, fig7_methods
from plots.claims import judge_all
from plots.figstyle import lawa_k, results_of, seed_table
from plots.hours_saved import hours_saved_for_run
from plots.tidy import Inputs, Run, higher_is_better

__all__ = ["summarize", "to_markdown"]

MAIN_METRIC = {"imagenet": "val_acc1", "bert": "val_loss"}


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _run_rows(run: Run, metric: str, seed: int | None) -> list[dict]:
    """Best and final of the baseline and every lawa/exp k, per seed and as mean ± std over seeds."""
    higher = higher_is_better(metric)
    tables = [("baseline", None, seed_table(run, metric, seed=seed))]
    for method in ("lawa", "exp"):
        if run.has(metric, method):
            frame = results_of(run, method)
            for k in sorted(int(k) for k in frame.loc[frame["method"] == method, "k"].unique()):
                tables.append((method, k, seed_table(run, metric, method, k, seed)))
    rows = []
    for method, k, table in tables:
        complete = table.dropna()
        if complete.empty:
            continue
        per_seed = {}
        for s in table.columns:
            series = table[s].dropna()
            epoch = series.idxmax() if higher else series.idxmin()
            per_seed[int(s)] = {"best": float(series.loc[epoch]), "best_epoch": int(epoch),
                                "final": float(complete[s].iloc[-1])}
        best_mean, best_std = _mean_std([v["best"] for v in per_seed.values()])
        final_mean, final_std = _mean_std([v["final"] for v in per_seed.values()])
        rows.append({"run": run.name, "metric": metric, "method": method, "k": k, "seeds": sorted(per_seed),
                     "n": len(per_seed), "best_mean": best_mean, "best_std": best_std,
                     "final_epoch": int(complete.index[-1]), "final_mean": final_mean, "final_std": final_std,
                     "per_seed": {str(s): v for s, v in per_seed.items()}})
    return rows


def _appendix_rows(run: Run, metric: str, k: int | None) -> list[dict]:
    higher = higher_is_better(metric)
    lines = fig5_lawa_vs_lookahead.lines(run, metric, k)
    if run.has(metric, "exp"):
        lines += [line for line in fig6_uniform_vs_exp.lines(run, metric, k) if line[0] == "exp"]
    rows = []
    for kind, label, table in lines:
        table = table.dropna()
        if table.empty:
            continue
        best = table.max() if higher else table.min()
        final = table.iloc[-1]
        rows.append({"metric": metric, "curve": label, "kind": kind, "seeds": [int(s) for s in table.columns],
                     "n": int(table.shape[1]), "best_mean": float(best.mean()),
                     "best_std": float(best.std(ddof=1)) if table.shape[1] > 1 else None,
                     "final_epoch": int(table.index[-1]), "final_mean": float(final.mean()),
                     "final_std": float(final.std(ddof=1)) if table.shape[1] > 1 else None})
    return rows


def summarize(inputs: Inputs) -> dict:
    """Everything ``to_markdown`` prints, as JSON-ready dicts."""
    data = {"claims": [c.to_dict() for c in judge_all(inputs)], "hours_saved": [], "best_final": [],
            "appendix": [], "methods": None}
    for name, metric in MAIN_METRIC.items():
        run = getattr(inputs, name)
        if run is None or not run.has(metric):
            continue
        if run.has(metric, "lawa"):
            k = lawa_k(run, inputs.k)
            seeds = seed_table(run, metric, "lawa", k, inputs.seed).columns
            for seed in seeds:
                result, info = hours_saved_for_run(run, metric, "lawa", k, seed=int(seed), gpus=inputs.gpus,
                                                   timing_required=False)
                record = {k: v for k, v in result.to_dict().items() if k != "per_epoch"}
                data["hours_saved"].append({"run": name, **info, **record})
        for other in ("val_acc1", "val_acc5", "val_loss"):
            if run.has(other):
                data["best_final"] += _run_rows(run, other, inputs.seed)
    run = inputs.appendix
    if run is not None:
        for metric in ("val_acc1", "val_loss"):
            if run.has(metric):
                data["appendix"] += _appendix_rows(run, metric, inputs.appendix_k)
        if fig7_methods.has_methods(run) and run.has("val_acc1"):
            data["methods"] = fig7_methods.table(run, inputs.appendix_k)
    return data


def _formatter(metric: str, typical: float):
    """Accuracies in percent with two decimals (stored as fractions or as percent); losses with four."""
    if metric.split("_", 1)[1].startswith("acc"):
        scale = 100 if typical <= 1 else 1
        return lambda v: "-" if v is None else f"{scale * v:.2f}"
    return lambda v: "-" if v is None else f"{v:.4f}"


def _pm(mean: float, std: float | None, metric: str) -> str:
    fmt = _formatter(metric, mean)
    return fmt(mean) + ("" if std is None else f" ± {fmt(std)}")


def _epochs(r: dict) -> str:
    """Epochs to target as 'mean ± std (reached/n)', or 'never (0/n)'."""
    if r["target_epochs_mean"] is None:
        return f"never (0/{r['n']})"
    std = "" if r["target_epochs_std"] is None else f" ± {r['target_epochs_std']:.1f}"
    return f"{r['target_epochs_mean']:.1f}{std} ({r['reached']}/{r['n']})"


def _methods_markdown(m: dict) -> list[str]:
    fmt = _formatter("val_acc1", max(m["targets"].values()))
    targets = ", ".join(f"seed {s}: {fmt(v)}" for s, v in m["targets"].items())
    out = ["## Averaging methods on the same trajectories: mean ± std over seeds (accuracies in %)", "",
           f"Target of a seed: its own final baseline val top-1 (epoch {m['baseline_final_epoch']}) minus "
           f"{fmt(m['target_points'])} points ({targets}). Epochs to target: the first end epoch E at which the "
           "curve reaches it, mean ± std over the seeds that do (reached/seeds). TWA is evaluated only at the end "
           "epochs it was trained for, and trains after E on top.", "",
           "| curve | epochs to target | best val top-1 | final val top-1 (epoch) | final − baseline, paired "
           "| final val loss |", "|---|---|---|---|---|---|"]
    for r in m["curves"]:
        final, delta, loss = "-", "-", "-"
        if r["final_epoch"] is not None:
            final = f"{_pm(r['final_mean'], r['final_std'], 'val_acc1')} ({r['final_epoch']})"
            fmt = _formatter("val_acc1", r["final_mean"])  # a difference: scaled as the accuracies themselves
            mean, std = r["final_minus_baseline_mean"], r["final_minus_baseline_std"]
            delta = ("+" if mean > 0 else "") + fmt(mean) + ("" if std is None else f" ± {fmt(std)}")
        if r["final_loss_mean"] is not None:
            loss = _pm(r["final_loss_mean"], r["final_loss_std"], "val_loss")
        out.append(f"| {r['curve']} | {_epochs(r)} | {_pm(r['best_mean'], r['best_std'], 'val_acc1')} | {final} "
                   f"| {delta} | {loss} |")
    return out + [""]


def _claims_markdown(claims: list[dict]) -> list[str]:
    out = ["## The paper's claims, judged over seeds (rule: plots/claims.py)", "",
           "Held: the paired difference d (> 0 is what the paper claims) has the same sign in every seed, or its "
           "95% t interval excludes 0; not held: the same against the claim; inconclusive: otherwise, one seed, "
           "or no data.", "", "| claim | verdict | numbers (mean ± std over seeds; per seed) |", "|---|---|---|"]
    for c in claims:
        out.append(f"| {c['statement']} | **{c['verdict']}** | {c['why']} |")
    out.append("")
    for c in claims:
        for name, part in c["parts"].items():
            if part["values"]:
                each = ", ".join(f"seed {s}: {v:+.4g}" for s, v in part["values"].items())
                out.append(f"- {c['key']} / {name}: {part['measure']} [{part['unit']}]: {each}")
    return out + [""]


def to_markdown(data: dict) -> str:
    """The claims, then four tables: GPU time saved, best/final per run, appendix over seeds, averaging methods."""
    out = ["# Summary", ""]
    if data.get("claims"):
        out += _claims_markdown(data["claims"])
    if data["hours_saved"]:
        out += ["## GPU time saved (largest horizontal gap, paper definition; see plots/hours_saved.py)", "",
                "| run | seed | metric | averaged | maximum saved | timing |", "|---|---|---|---|---|---|"]
        out += [f"| {h['run']} | {'' if h['seed'] is None else h['seed']} | {h['metric']} | {h['label']} | "
                f"{h['headline']} | {h['timing']} |" for h in data["hours_saved"]]
        out += ["", "'≥' marks a lower bound: the baseline never reached that value within its run.", ""]
    if data["best_final"]:
        out += ["## Best and final: mean ± std over seeds, and each seed (accuracies in %)", "",
                "| run | metric | method | k | seeds | best | final (epoch) | per seed: best (epoch) / final |",
                "|---|---|---|---|---|---|---|---|"]
        for r in data["best_final"]:
            fmt = _formatter(r["metric"], r["best_mean"])
            each = "; ".join(f"{s}: {fmt(v['best'])} ({v['best_epoch']}) / {fmt(v['final'])}"
                             for s, v in r["per_seed"].items())
            out.append(f"| {r['run']} | {r['metric']} | {r['method']} | {r['k'] or ''} | {r['n']} | "
                       f"{_pm(r['best_mean'], r['best_std'], r['metric'])} | "
                       f"{_pm(r['final_mean'], r['final_std'], r['metric'])} ({r['final_epoch']}) | {each} |")
        out.append("")
    if data["appendix"]:
        out += ["## Appendix B/C runs: mean ± std over seeds (accuracies in %)", "",
                "| metric | curve | seeds | best | final (epoch) |", "|---|---|---|---|---|"]
        for r in data["appendix"]:
            best, final = _pm(r["best_mean"], r["best_std"], r["metric"]), _pm(
                r["final_mean"], r["final_std"], r["metric"])
            out.append(f"| {r['metric']} | {r['curve']} | {r['n']} | {best} | {final} ({r['final_epoch']}) |")
        out.append("")
    if data.get("methods"):
        out += _methods_markdown(data["methods"])
    if len(out) == 2:
        out += ["No inputs.", ""]
    return "\n".join(out)
