"""The paper's claims as code: each one judged over the seeds of the tidy CSVs as held, not held or inconclusive.

    >>> from plots.claims import judge_all
    >>> for claim in judge_all(load_inputs_from("docs/results")):
    ...     print(claim.verdict, "-", claim.statement)

The rule, the same for every claim. Each claim names a paired difference d, one number per seed, signed so
that d > 0 is what the paper claims (e.g. LAWA's val top-1 minus the same seed's baseline, averaged over the
mid-run end epochs). With the n seeds' values, their mean, sample standard deviation s and the two-sided 95%
Student-t interval mean ± t(0.975, n−1)·s/√n:

- **held**: n ≥ 2 and d > 0 in every seed, or the interval lies above 0;
- **not held**: n ≥ 2 and d < 0 in every seed, or the interval lies below 0;
- **inconclusive**: anything else: signs differ between seeds and the interval contains 0 (the effect is
  inside the seed spread), only one seed, or the runs the claim needs are absent.

"Every seed" is the weaker half of the rule: with three seeds, a difference of exactly zero plus noise has the
same sign in every seed one time in four; the interval is the stricter test. Both are what the verdicts say, and
``Spread`` keeps the numbers so a reader can tell which one applied.

A claim built from parts (App. B's "LAWA ≥ Lookahead ≈ SGD"; a claim tested on both the vision and the masked-LM
run) says how its parts combine in its docstring. "≈" and "at least as good" cannot be shown by a test that
needs an effect beyond the spread; such parts only fail a claim when the opposite is shown.

Window sizes: the paper's k = 6 of 90 epochs is ``PAPER_SHARE`` of its run; a claim about LAWA uses the swept k
nearest to that share of this run (``share_k``; the smaller on ties), so a 12-epoch run is judged at k = 2 and a
90-epoch run at k = 6. End epochs: "mid-run" is the middle third of the run, ``[E/3, 2E/3]`` with E the last
epoch; "early" the first third; "late" the second half.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import pandas as pd

from plots.hours_saved import hours_saved
from plots.tidy import Inputs, Run, TidyError, higher_is_better, seed_curves

__all__ = ["HELD", "NOT_HELD", "INCONCLUSIVE", "PAPER_SHARE", "Claim", "Spread", "spread", "verdict_of",
           "t_quantile", "share_k", "CLAIMS", "judge_all",
           "vision_ahead_mid_run", "mlm_earlier_or_lower", "share_k_is_a_good_default", "too_early_hurts",
           "lookahead_app_b", "uniform_vs_exp_app_c", "spaced_lawa_high_lr", "gpu_time_saved"]

HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"
PAPER_SHARE = 6 / 90  # the paper's LAWA window: k = 6 checkpoints of a 90-epoch ImageNet run
# Two-sided 95% quantiles of Student's t by degrees of freedom (n − 1); above 30 the normal's 1.96 is close.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (for a two-sided 95% interval).

        >>> t_quantile(2)
        4.303
    """
    if df < 1:
        raise TidyError(f"a t interval needs at least 1 degree of freedom, got {df}")
    return _T975.get(df, 1.96)


@dataclass(frozen=True)
class Spread:
    """Per-seed values of a paired difference d and what they say about its sign."""

    values: dict[int, float]   # seed -> d
    n: int
    mean: float | None
    std: float | None          # sample standard deviation (None below two seeds)
    ci: tuple[float, float] | None  # two-sided 95% t interval of the mean (None below two seeds)
    sign: int                  # +1: d > 0 beyond the spread; −1: d < 0 beyond it; 0: neither, or n < 2


def spread(values: Mapping[int, float]) -> Spread:
    """The seeds' mean, sample std, 95% t interval and sign of a paired difference (the module's rule).

        >>> spread({0: 1.0, 1: 2.0, 2: 3.0}).sign
        1
    """
    values = {int(s): float(v) for s, v in values.items() if v is not None and not math.isnan(v)}
    n = len(values)
    if n == 0:
        return Spread(values, 0, None, None, None, 0)
    mean = statistics.fmean(values.values())
    if n < 2:
        return Spread(values, 1, mean, None, None, 0)
    std = statistics.stdev(values.values())
    half = t_quantile(n - 1) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    sign = 1 if all(v > 0 for v in values.values()) or low > 0 else (
        -1 if all(v < 0 for v in values.values()) or high < 0 else 0)
    return Spread(values, n, mean, std, (low, high), sign)


def verdict_of(s: Spread) -> str:
    """held / not held / inconclusive from a difference's sign beyond the seed spread."""
    return {1: HELD, -1: NOT_HELD, 0: INCONCLUSIVE}[s.sign]


@dataclass(frozen=True)
class Claim:
    """One claim's verdict with the numbers it used."""

    key: str                    # stable name, e.g. "vision_ahead_mid_run"
    statement: str              # the paper's claim, as tested here
    verdict: str                # HELD, NOT_HELD or INCONCLUSIVE
    measure: str                # what d is, in words and units
    why: str                    # one line: how the numbers gave the verdict
    parts: dict[str, dict] = field(default_factory=dict)  # name -> {"measure", "unit", spread fields, extras}

    def to_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def _part(measure: str, unit: str, s: Spread, **extra) -> dict:
    return {"measure": measure, "unit": unit, "values": {str(k): v for k, v in s.values.items()}, "n": s.n,
            "mean": s.mean, "std": s.std, "ci": list(s.ci) if s.ci else None, "sign": s.sign,
            "verdict": verdict_of(s), **extra}


def _missing(key: str, statement: str, what: str) -> Claim:
    return Claim(key, statement, INCONCLUSIVE, "-", f"no data: {what}")


def _pm(s: Spread, unit: str, digits: int) -> str:
    """'+2.31 ± 1.05 pt (n=3)': the seeds' mean ± sample std."""
    if s.n == 0:
        return "no values"
    std = "" if s.std is None else f" ± {s.std:.{digits}f}"
    return f"{s.mean:+.{digits}f}{std} {unit} (n={s.n})"


def _why(s: Spread, unit: str, digits: int) -> str:
    """Why the rule gave this verdict, in one line."""
    if s.n == 0:
        return "no seed has the values this needs"
    if s.n == 1:
        return f"one seed only ({_pm(s, unit, digits)}): no spread to judge against"
    signs = [v > 0 for v in s.values.values()]
    every = "in every seed" if all(signs) or not any(signs) else "not in every seed"
    ci = f"95% interval [{s.ci[0]:+.{digits}f}, {s.ci[1]:+.{digits}f}]"
    return f"{_pm(s, unit, digits)}; sign {every}; {ci}"


# ---------------------------------------------------------------------------------------------------------
# Reading the curves: epochs × seeds tables

def _frame_with(run: Run, method: str) -> pd.DataFrame | None:
    for frame in (run.results, run.log):
        if frame is not None and (frame["method"] == method).any():
            return frame
    return None


def _ks(run: Run, method: str = "lawa") -> list[int]:
    frame = _frame_with(run, method)
    return [] if frame is None else sorted(int(k) for k in frame.loc[frame["method"] == method, "k"].unique())


def share_k(ks: Sequence[int], horizon: int) -> int:
    """The swept window nearest to the paper's share of the run (``PAPER_SHARE`` × horizon; smaller on ties).

        >>> share_k([2, 3, 4], 12), share_k([2, 4, 6, 8, 10], 90)
        (2, 6)
    """
    if not ks:
        raise TidyError("no window sizes k to choose from")
    target = PAPER_SHARE * horizon
    return min(ks, key=lambda k: (abs(k - target), k))


def _scale(metric: str, table: pd.DataFrame) -> float:
    """Accuracies as percentage points whether stored as fractions or percent; losses as they are."""
    if metric.split("_", 1)[1].startswith("acc"):
        return 100.0 if float(table.abs().max().max()) <= 1.0 else 1.0
    return 1.0


def _unit(metric: str) -> str:
    return "pt" if metric.split("_", 1)[1].startswith("acc") else "bits" if "loss" in metric else ""


def _baseline(run: Run, metric: str, optimizer: str | None = None) -> pd.DataFrame:
    return run.baseline_seeds(metric, optimizer=optimizer)


def _averaged(run: Run, metric: str, method: str, k: int, optimizer: str | None = None) -> pd.DataFrame:
    frame = _frame_with(run, method)
    if frame is None:
        return pd.DataFrame()
    return seed_curves(frame, metric, method, k, optimizer=optimizer)


def _gain(metric: str, better: pd.DataFrame, worse: pd.DataFrame) -> pd.DataFrame:
    """(better − worse) signed so that > 0 means ``better`` is better, accuracies in points; epochs × seeds."""
    sign = 1.0 if higher_is_better(metric) else -1.0
    both = better.columns.intersection(worse.columns)
    diff = (better[both] - worse[both].reindex(better.index)) * sign
    return diff * _scale(metric, pd.concat([better[both], worse[both]]))


def _mean_over(diff: pd.DataFrame, epochs: Callable[[int], bool]) -> tuple[dict[int, float], list[int]]:
    """Each seed's mean of ``diff`` over the end epochs that pass ``epochs`` and exist in every seed."""
    diff = diff.dropna()
    chosen = [int(e) for e in diff.index if epochs(int(e))]
    if not chosen:
        return {}, []
    return {int(s): float(diff.loc[chosen, s].mean()) for s in diff.columns}, chosen


def _horizon(table: pd.DataFrame) -> int:
    return int(table.dropna(how="all").index.max())


def _mid(horizon: int) -> Callable[[int], bool]:
    return lambda e: horizon / 3 <= e <= 2 * horizon / 3


def _epochs_text(epochs: Sequence[int]) -> str:
    return ", ".join(str(e) for e in epochs)


def _combine(parts: Sequence[Claim | Spread]) -> str:
    """Across runs: held if held in every run with data, not held if not held in any, else inconclusive."""
    verdicts = [p.verdict if isinstance(p, Claim) else verdict_of(p) for p in parts]
    if not verdicts:
        return INCONCLUSIVE
    if NOT_HELD in verdicts:
        return NOT_HELD
    return HELD if all(v == HELD for v in verdicts) else INCONCLUSIVE


# ---------------------------------------------------------------------------------------------------------
# The claims

def vision_ahead_mid_run(inputs: Inputs) -> Claim:
    """LAWA is ahead of the baseline mid-training on the vision run.

    d = LAWA (k = ``share_k``) minus the same seed's baseline, val top-1 in points, averaged over the swept end
    epochs of the middle third of the run.
    """
    key, statement = "vision_ahead_mid_run", "LAWA is ahead of the baseline mid-training (vision run)"
    run, metric = inputs.imagenet, "val_acc1"
    if run is None or not run.has(metric, "lawa"):
        return _missing(key, statement, "the vision run's lawa rows (--imagenet)")
    base = _baseline(run, metric)
    horizon = _horizon(base)
    k = share_k(_ks(run), horizon)
    values, epochs = _mean_over(_gain(metric, _averaged(run, metric, "lawa", k), base), _mid(horizon))
    s = spread(values)
    measure = f"LAWA k={k} − baseline, val top-1, mean over end epochs {_epochs_text(epochs)} of {horizon}"
    return Claim(key, statement, verdict_of(s), measure, _why(s, "pt", 2),
                 {"lawa_minus_baseline": _part(measure, "pt", s, k=k, epochs=epochs)})


def mlm_earlier_or_lower(inputs: Inputs) -> Claim:
    """LAWA reaches the baseline's best loss earlier, or ends lower, on the masked-LM run.

    Two parts, k = ``share_k``, val loss in bits. ``lower_at_end``: d = baseline − LAWA at the last swept end
    epoch. ``earlier``: d = (the epoch of the baseline's best loss) − (the first swept end epoch at which LAWA
    is at least as low); a seed whose LAWA never gets there counts as E + 1 (a bound). Held if either part is
    held; not held if both are not held; else inconclusive. LAWA is only seen at the swept end epochs, the
    baseline at every epoch, so ``earlier`` leans against LAWA by up to the sweep's spacing.
    """
    key = "mlm_earlier_or_lower"
    statement = "LAWA reaches the baseline's best loss earlier or ends lower (masked-LM run)"
    run, metric = inputs.bert, "val_loss"
    if run is None or not run.has(metric, "lawa"):
        return _missing(key, statement, "the masked-LM run's lawa rows (--bert)")
    base = _baseline(run, metric)
    horizon = _horizon(base)
    k = share_k(_ks(run), horizon)
    lawa = _averaged(run, metric, "lawa", k)
    last = int(lawa.dropna().index.max())
    final = spread({s: float(base.loc[last, s] - lawa.loc[last, s]) for s in lawa.columns if s in base.columns})
    earlier = {}
    for seed in lawa.columns.intersection(base.columns):
        best_epoch = int(base[seed].idxmin())
        reached = lawa[seed].dropna()
        reached = reached[reached <= base[seed].min()]
        earlier[int(seed)] = best_epoch - (int(reached.index[0]) if len(reached) else horizon + 1)
    early = spread(earlier)
    verdicts = {verdict_of(final), verdict_of(early)}
    verdict = HELD if HELD in verdicts else NOT_HELD if verdicts == {NOT_HELD} else INCONCLUSIVE
    m_final = f"baseline − LAWA k={k}, val loss at end epoch {last}"
    m_early = f"epoch of the baseline's best val loss − first end epoch LAWA k={k} is as low"
    why = f"lower at the end: {verdict_of(final)} ({_why(final, 'bits', 4)}); earlier: {verdict_of(early)} " \
          f"({_why(early, 'epochs', 1)})"
    return Claim(key, statement, verdict, f"{m_final}; {m_early}", why,
                 {"lower_at_end": _part(m_final, "bits", final, k=k, epoch=last),
                  "earlier": _part(m_early, "epochs", early, k=k)})


RUNS = (("imagenet", "val_acc1", "vision"), ("bert", "val_loss", "masked LM"))


def share_k_is_a_good_default(inputs: Inputs) -> Claim:
    """k = 6, as a share of the run, is a good default.

    Per run (vision val top-1, masked-LM val loss), over the swept end epochs of the second half: the share k
    (``share_k``) must beat the baseline (``vs_baseline``: d = share k − baseline), and no other swept k may
    beat the share k beyond the spread (``vs_k{j}``: d = share k − k j). A run's verdict: held if it beats the
    baseline beyond the spread and no other k beats it; not held if the baseline or another k beats it beyond
    the spread; else inconclusive. Across runs: held if held in every run with data, not held if not held in
    any, else inconclusive.
    """
    key, statement = "share_k_is_a_good_default", "k=6, as a share of the run (6 of 90 epochs), is a good default"
    parts, runs, whys = {}, [], []
    for name, metric, label in RUNS:
        run = getattr(inputs, name)
        ks = _ks(run) if run is not None and run.has(metric, "lawa") else []
        if len(ks) < 2:
            continue
        base = _baseline(run, metric)
        horizon = _horizon(base)
        k = share_k(ks, horizon)
        late = lambda e, h=horizon: e >= h / 2  # noqa: E731
        mine = _averaged(run, metric, "lawa", k)
        unit, digits = _unit(metric), 2 if metric.endswith("acc1") else 4
        vs_base = spread(_mean_over(_gain(metric, mine, base), late)[0])
        parts[f"{name}_vs_baseline"] = _part(f"{label}: k={k} − baseline, {metric}, second half", unit, vs_base, k=k)
        beaten_by = []
        for other in ks:
            if other == k:
                continue
            s = spread(_mean_over(_gain(metric, mine, _averaged(run, metric, "lawa", other)), late)[0])
            parts[f"{name}_vs_k{other}"] = _part(f"{label}: k={k} − k={other}, {metric}, second half", unit, s, k=k)
            if s.sign < 0:
                beaten_by.append(other)
        verdict = NOT_HELD if beaten_by or vs_base.sign < 0 else HELD if vs_base.sign > 0 else INCONCLUSIVE
        runs.append(verdict)
        others = f"beaten beyond the spread by k={', '.join(map(str, beaten_by))}" if beaten_by else \
            "no other k beats it beyond the spread"
        whys.append(f"{label} k={k} of {horizon} epochs: {verdict} (vs baseline {_pm(vs_base, unit, digits)}; "
                    f"{others})")
    if not runs:
        return _missing(key, statement, "a vision or masked-LM sweep with two or more k")
    verdict = NOT_HELD if NOT_HELD in runs else HELD if all(v == HELD for v in runs) else INCONCLUSIVE
    return Claim(key, statement, verdict, "share k − baseline and share k − every other swept k, second half",
                 "; ".join(whys), parts)


def too_early_hurts(inputs: Inputs) -> Claim:
    """Averaging too early hurts.

    Per run: d = baseline − LAWA at the largest swept k, signed so that d > 0 means LAWA is worse, averaged over
    the swept end epochs of the first third of the run at which that window exists. Across runs: held if held
    in every run with data, not held if not held in any, else inconclusive.
    """
    key, statement = "too_early_hurts", "averaging too early hurts"
    parts, spreads, whys = {}, [], []
    for name, metric, label in RUNS:
        run = getattr(inputs, name)
        if run is None or not run.has(metric, "lawa"):
            continue
        base = _baseline(run, metric)
        horizon = _horizon(base)
        k = max(_ks(run))
        values, epochs = _mean_over(-_gain(metric, _averaged(run, metric, "lawa", k), base),
                                    lambda e, h=horizon: e <= h / 3)
        if not epochs:
            continue
        s = spread(values)
        unit, digits = _unit(metric), 2 if metric.endswith("acc1") else 4
        parts[name] = _part(f"{label}: baseline − LAWA k={k}, {metric}, end epochs {_epochs_text(epochs)}", unit,
                            s, k=k, epochs=epochs)
        spreads.append(s)
        whys.append(f"{label} k={k} at E={_epochs_text(epochs)}: {verdict_of(s)} ({_why(s, unit, digits)})")
    if not spreads:
        return _missing(key, statement, "an early end epoch with the largest k in a vision or masked-LM sweep")
    return Claim(key, statement, _combine(spreads), "baseline − LAWA at the largest k, first third of the run "
                 "(> 0: averaging hurts)", "; ".join(whys), parts)


def _appendix_k(run: Run, method: str, k: int | None) -> int | None:
    ks = _ks(run, method)
    if not ks:
        return None
    if k is not None and k in ks:
        return k
    return min(ks, key=lambda v: (abs(v - 10), v))  # the paper's App. B/C k = 10, else the nearest


def lookahead_app_b(inputs: Inputs) -> Claim:
    """LAWA ≥ Lookahead ≈ SGD mid-run (the paper's Appendix B).

    On the appendix runs, val top-1 in points, averaged over the swept end epochs of the middle third:
    ``lawa_vs_sgd``: d = LAWA (on SGD's trajectory) − SGD; ``lawa_vs_lookahead``: d = LAWA − Lookahead (same
    seed); ``lookahead_vs_sgd`` is reported, not judged ("≈" cannot be shown beyond a spread). Held if LAWA beats
    SGD beyond the spread and Lookahead does not beat LAWA beyond it; not held if SGD or Lookahead beats LAWA
    beyond the spread; else inconclusive.
    """
    key, statement = "lookahead_app_b", "LAWA ≥ Lookahead ≈ SGD mid-run (App. B)"
    run, metric = inputs.appendix, "val_acc1"
    k = None if run is None else _appendix_k(run, "lawa", inputs.appendix_k)
    if run is None or k is None or not run.has(metric, "baseline"):
        return _missing(key, statement, "appendix runs with SGD, Lookahead and lawa rows (--appendix)")
    sgd, look = _baseline(run, metric, "sgd"), _baseline(run, metric, "lookahead")
    if look.empty or sgd.empty:
        return _missing(key, statement, "SGD and Lookahead runs of the appendix")
    horizon = _horizon(sgd)
    lawa = _averaged(run, metric, "lawa", k, optimizer="sgd")
    mid = _mid(horizon)
    s_sgd = spread(_mean_over(_gain(metric, lawa, sgd), mid)[0])
    values, epochs = _mean_over(_gain(metric, lawa, look), mid)
    s_look = spread(values)
    s_ls = spread(_mean_over(_gain(metric, look, sgd), mid)[0])
    verdict = NOT_HELD if s_sgd.sign < 0 or s_look.sign < 0 else HELD if s_sgd.sign > 0 else INCONCLUSIVE
    where = f"val top-1, mean over end epochs {_epochs_text(epochs)} of {horizon}"
    why = f"LAWA − SGD {_why(s_sgd, 'pt', 2)}; LAWA − Lookahead {_why(s_look, 'pt', 2)}; " \
          f"Lookahead − SGD {_pm(s_ls, 'pt', 2)}"
    return Claim(key, statement, verdict, f"LAWA k={k} − SGD and LAWA k={k} − Lookahead, {where}", why,
                 {"lawa_vs_sgd": _part(f"LAWA k={k} − SGD, {where}", "pt", s_sgd, k=k, epochs=epochs),
                  "lawa_vs_lookahead": _part(f"LAWA k={k} − Lookahead, {where}", "pt", s_look, k=k),
                  "lookahead_vs_sgd": _part(f"Lookahead − SGD, {where} (reported, not judged)", "pt", s_ls)})


def uniform_vs_exp_app_c(inputs: Inputs) -> Claim:
    """Uniform coefficients do at least as well as exponential ones (the paper's Appendix C keeps uniform).

    On the appendix runs' SGD trajectories: d = LAWA − EXP at the same k, val top-1 in points, averaged over the
    swept end epochs of the second half. Held if uniform is ahead beyond the spread, not held if EXP is, else
    inconclusive ("as well as" alone cannot be shown beyond a spread).
    """
    key = "uniform_vs_exp_app_c"
    statement = "uniform (LAWA) coefficients do at least as well as exponential (EXP) ones (App. C)"
    run, metric = inputs.appendix, "val_acc1"
    k = None if run is None else _appendix_k(run, "exp", inputs.appendix_k)
    if run is None or k is None or k not in _ks(run, "lawa"):
        return _missing(key, statement, "appendix runs with lawa and exp rows at one k (--appendix)")
    lawa = _averaged(run, metric, "lawa", k, optimizer="sgd")
    exp = _averaged(run, metric, "exp", k, optimizer="sgd")
    horizon = _horizon(_baseline(run, metric, "sgd"))
    values, epochs = _mean_over(_gain(metric, lawa, exp), lambda e: e >= horizon / 2)
    s = spread(values)
    measure = f"LAWA k={k} − EXP k={k}, val top-1, mean over end epochs {_epochs_text(epochs)} of {horizon}"
    return Claim(key, statement, verdict_of(s), measure, _why(s, "pt", 2),
                 {"lawa_minus_exp": _part(measure, "pt", s, k=k, epochs=epochs)})


def spaced_lawa_high_lr(inputs: Inputs) -> Claim:
    """LAWA over spaced checkpoints beats EMA and SWA of the checkpoints at a high learning rate (gpt/ stage).

    On the high-LR GPT run (``--gpt``: its lr-high folder), val loss in bits, over the end updates of the second
    half: ``vs_ema``: d = EMA − spaced LAWA, ``vs_swa``: d = SWA − spaced LAWA (> 0: spaced LAWA lower), spaced
    LAWA = the smallest k at the smallest spacing > 1, EMA = its smallest window, SWA = its earliest start.
    Held if both parts are held, not held if either is not held, else inconclusive (also: one seed).
    """
    key = "spaced_lawa_high_lr"
    statement = "LAWA over spaced checkpoints beats EMA and SWA at a high learning rate (gpt/, when it ran)"
    run, metric = inputs.gpt, "val_loss"
    if run is None or run.results is None:
        return _missing(key, statement, "the gpt/ stage did not run (GPT=1 bash reproduce_all.sh; --gpt)")
    frame = run.results
    methods = set(frame["method"])
    spaced = sorted((int(m.removeprefix("ewa-s")), m) for m in methods if m.startswith("ewa-s")
                    and int(m.removeprefix("ewa-s")) > 1)
    if not spaced or "ema" not in methods or "swa" not in methods:
        return _missing(key, statement, f"{frame.attrs.get('source')}: needs ewa-s*, ema and swa rows")
    method = spaced[0][1]
    ewa = _averaged(run, metric, method, min(_ks(run, method)))
    ema = _averaged(run, metric, "ema", min(_ks(run, "ema")))
    swa_rows = frame[(frame["method"] == "swa") & (frame["split"] == "val") & (frame["metric"] == "loss")]
    # SWA's k counts checkpoints; they sit the run's regular interval apart (updates, for gpt/)
    spacing = int(pd.Series(sorted(frame["epoch"].unique())).diff().mode().iloc[0])
    starts = swa_rows["epoch"] - (swa_rows["k"] - 1) * spacing
    start = int(starts.min())
    chosen = swa_rows[starts == start].drop_duplicates(["seed", "epoch"], keep="last")
    swa = chosen.pivot(index="epoch", columns="seed", values="value").sort_index()
    swa.columns = [int(s) for s in swa.columns]
    horizon = int(frame["epoch"].max())
    late = lambda e: e >= horizon / 2  # noqa: E731
    s_ema = spread(_mean_over(_gain(metric, ewa, ema), late)[0])
    s_swa = spread(_mean_over(_gain(metric, ewa, swa), late)[0])
    verdict = NOT_HELD if NOT_HELD in (verdict_of(s_ema), verdict_of(s_swa)) else HELD if (
        s_ema.sign > 0 and s_swa.sign > 0) else INCONCLUSIVE
    label = f"{method} k={min(_ks(run, method))}"
    return Claim(key, statement, verdict, f"EMA − {label} and SWA from {start} − {label}, val loss, second half",
                 f"vs EMA {_why(s_ema, 'bits', 4)}; vs SWA {_why(s_swa, 'bits', 4)}",
                 {"vs_ema": _part(f"EMA − {label}", "bits", s_ema), "vs_swa": _part(f"SWA − {label}", "bits", s_swa)})


def gpu_time_saved(inputs: Inputs) -> Claim:
    """LAWA saves training time: the largest horizontal gap (plots/hours_saved.py), as a median and range over seeds.

    Per run and seed: d = the epochs saved by LAWA (k = ``share_k``) against the same seed's baseline; a gap the
    baseline never closes counts as its lower bound ("≥ n"). Across runs: held if held in every run with data,
    not held if not held in any, else inconclusive.
    """
    key, statement = "gpu_time_saved", "LAWA saves GPU time (epochs until the baseline matches it)"
    parts, spreads, whys = {}, [], []
    for name, metric, label in RUNS:
        run = getattr(inputs, name)
        if run is None or not run.has(metric, "lawa"):
            continue
        base = _baseline(run, metric)
        horizon = _horizon(base)
        k = share_k(_ks(run), horizon)
        lawa = _averaged(run, metric, "lawa", k)
        saved, bounded = {}, []
        for seed in lawa.columns.intersection(base.columns):
            result = hours_saved(base[seed], lawa[seed], higher_is_better(metric))
            top = result.maximum
            if top is None:
                continue
            saved[int(seed)] = float(top.epochs if top.epochs is not None else top.epochs_at_least)
            if result.censored:
                bounded.append(int(seed))
        s = spread(saved)
        values = sorted(saved.values())
        median = statistics.median(values) if values else None
        at_least = "≥ " if bounded else ""
        parts[name] = _part(f"{label}: epochs saved by LAWA k={k} ({metric})", "epochs", s, k=k, median=median,
                            range=[values[0], values[-1]] if values else None, censored_seeds=bounded)
        spreads.append(s)
        if values:
            whys.append(f"{label} k={k}: {verdict_of(s)}, median {at_least}{median:g} epochs "
                        f"(range {values[0]:g}–{values[-1]:g}, n={len(values)}"
                        f"{', lower bounds in seeds ' + ', '.join(map(str, bounded)) if bounded else ''})")
    if not spreads:
        return _missing(key, statement, "vision or masked-LM runs with lawa rows")
    return Claim(key, statement, _combine(spreads), "epochs saved per seed (paper definition)", "; ".join(whys),
                 parts)


CLAIMS: tuple[Callable[[Inputs], Claim], ...] = (
    vision_ahead_mid_run, mlm_earlier_or_lower, share_k_is_a_good_default, too_early_hurts, lookahead_app_b,
    uniform_vs_exp_app_c, spaced_lawa_high_lr, gpu_time_saved)


def judge_all(inputs: Inputs) -> list[Claim]:
    """Every claim of ``CLAIMS`` on ``inputs``, in order."""
    return [claim(inputs) for claim in CLAIMS]
