"""plots/claims.py on hand-made tidy CSVs with known verdicts, the README section against the shipped logs, and
make_figures --from docs/results end to end. Torch is never imported here."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `plots`: a top-level folder, not installed

from plots import claims
from plots.claims import HELD, INCONCLUSIVE, NOT_HELD, share_k, spread, t_quantile
from plots.readme_table import BEGIN, END, comparisons, replace_section, section
from plots.tidy import RESULT_COLUMNS, load_inputs

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "docs" / "results"


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({"wall_seconds": "", "unit": "epoch", **r})


def rows_of(curves: dict, metric: str, optimizer: str = "sgd", split: str = "val") -> list[dict]:
    """curves: {(method, k): {seed: {epoch: value}}} -> tidy rows (SWA: k given per epoch as E - start + 1)."""
    out = []
    for (method, k), seeds in curves.items():
        for seed, values in seeds.items():
            for epoch, value in values.items():
                size = epoch - k + 1 if method == "swa" else k   # swa: k is the start epoch here
                out.append({"method": method, "k": size, "epoch": epoch, "split": split, "metric": metric,
                            "value": value, "optimizer": optimizer, "seed": seed})
    return out


def rising(n: int, start: float = 0.5, step: float = 0.02) -> dict[int, float]:
    """An accuracy curve rising by ``step`` per epoch: epoch e -> start + step·(e − 1) (fractions)."""
    return {e: start + step * (e - 1) for e in range(1, n + 1)}


def vision(tmp_path: Path, offsets: dict[int, float], *, ks=(2, 4), early_k4: float = -0.05,
           name: str = "imagenet") -> Path:
    """A 12-epoch vision run per seed: LAWA k=2 = baseline + offset (fraction) at every swept E ≥ 2; k=4 =
    baseline + early_k4 at E ≤ 4 and baseline − 0.01 later. Baseline rows in log.csv (every epoch) only."""
    root = tmp_path / name
    for seed, offset in offsets.items():
        base = rising(12, 0.5 + 0.01 * seed)
        curves = {("baseline", 1): {seed: base}}
        if 2 in ks:
            curves[("lawa", 2)] = {seed: {e: base[e] + offset for e in range(2, 13, 2)}}
        if 4 in ks:
            curves[("lawa", 4)] = {seed: {e: base[e] + (early_k4 if e <= 4 else -0.01) for e in range(4, 13, 2)}}
        write_rows(root / f"seed{seed}" / "log.csv", rows_of({("baseline", 1): {seed: base}}, "acc1"))
        write_rows(root / f"seed{seed}" / "results.csv",
                   rows_of({key: v for key, v in curves.items() if key[0] != "baseline"}, "acc1"))
    return root


def claim(func, **folders):
    return func(load_inputs(**{k: str(v) for k, v in folders.items()}))


# ---------------------------------------------------------------------------------------------------------
# the rule

def test_t_quantiles_match_an_independent_computation():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 10, 30):
        assert t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)


def test_spread_rule_every_seed_or_the_interval():
    s = spread({0: 1.0, 1: 2.0, 2: 3.0})
    assert (s.mean, s.std, s.sign) == (2.0, 1.0, 1)
    assert s.ci == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))
    assert spread({0: -1.0, 1: -0.5, 2: -2.0}).sign == -1
    assert spread({0: 3.0, 1: -2.0, 2: 0.5}).sign == 0          # mixed signs, interval contains 0
    many = {s: 1.0 for s in range(9)} | {9: -0.1}                 # one seed against, interval clear of 0
    assert spread(many).sign == 1 and spread(many).ci[0] > 0
    assert spread({0: 5.0}).sign == 0 and spread({}).n == 0       # one seed: nothing to judge against


def test_share_k_scales_the_papers_six_of_ninety():
    assert share_k([2, 3, 4], 12) == 2 and share_k([2, 4, 6, 8, 10], 90) == 6 and share_k([4, 8], 90) == 4
    assert share_k([2, 4, 6, 8], 40) == 2


# ---------------------------------------------------------------------------------------------------------
# each claim: held, not held, inconclusive on hand-made CSVs

@pytest.mark.parametrize("offsets, verdict", [({0: 0.02, 1: 0.03, 2: 0.01}, HELD),
                                              ({0: -0.01, 1: -0.02, 2: -0.03}, NOT_HELD),
                                              ({0: 0.03, 1: -0.02, 2: 0.005}, INCONCLUSIVE),
                                              ({0: 0.05}, INCONCLUSIVE)])
def test_vision_ahead_mid_run(tmp_path, offsets, verdict):
    c = claim(claims.vision_ahead_mid_run, imagenet=vision(tmp_path, offsets))
    assert c.verdict == verdict
    part = c.parts["lawa_minus_baseline"]
    assert part["k"] == 2 and part["epochs"] == [4, 6, 8]                 # the middle third of 12 epochs
    assert part["values"] == {str(s): pytest.approx(100 * o) for s, o in offsets.items()}   # in points


def test_a_claim_without_its_run_is_inconclusive(tmp_path):
    c = claim(claims.vision_ahead_mid_run, bert=vision(tmp_path, {0: 0.01}, name="bert"))
    assert c.verdict == INCONCLUSIVE and c.why.startswith("no data")


def bert_run(tmp_path: Path, end_gain: dict[int, float]) -> Path:
    """40 epochs of val loss per seed: the baseline bottoms at 8.3 at epoch 25 and overfits to 8.45; LAWA k=2
    (every 4th end epoch) is 0.05 above the baseline until 20, then the baseline minus end_gain from 24 on."""
    root = tmp_path / "bert"
    for seed, gain in end_gain.items():
        base = {e: 8.3 + 0.004 * (e - 25) ** 2 if e <= 25 else 8.3 + 0.01 * (e - 25) for e in range(1, 41)}
        lawa = {e: base[e] + (0.05 if e <= 20 else -gain) for e in range(4, 41, 4)}
        write_rows(root / f"seed{seed}" / "log.csv", rows_of({("baseline", 1): {seed: base}}, "loss", "adam"))
        write_rows(root / f"seed{seed}" / "results.csv",
                   rows_of({("lawa", 2): {seed: lawa}, ("lawa", 8): {seed: {e: base[e] + 0.1 for e in
                                                                            range(8, 41, 4)}}}, "loss", "adam"))
    return root


@pytest.mark.parametrize("gain, verdict", [({0: 0.1, 1: 0.05, 2: 0.2}, HELD),
                                           ({0: -0.02, 1: -0.03, 2: -0.01}, NOT_HELD),
                                           ({0: 0.1, 1: -0.1, 2: -0.05}, INCONCLUSIVE)])
def test_mlm_earlier_or_lower(tmp_path, gain, verdict):
    c = claim(claims.mlm_earlier_or_lower, bert=bert_run(tmp_path, gain))
    assert c.verdict == verdict
    final = c.parts["lower_at_end"]
    assert final["epoch"] == 40 and final["values"] == {str(s): pytest.approx(g) for s, g in gain.items()}
    # The baseline's best (8.3) is at epoch 25. LAWA below the baseline from 24 on gets there at 24 (1 epoch
    # earlier); LAWA above it never does, which counts as epoch 41 (E + 1): 16 epochs late.
    assert c.parts["earlier"]["values"] == {str(s): 1 if g > 0 else -16 for s, g in gain.items()}


@pytest.mark.parametrize("offsets, verdict", [({0: 0.02, 1: 0.03, 2: 0.01}, HELD),       # k=2 beats all
                                              ({0: -0.02, 1: -0.03, 2: -0.04}, NOT_HELD),  # k=4 (−0.01) beats it
                                              ({0: 0.02, 1: -0.005, 2: -0.001}, INCONCLUSIVE)])
def test_share_k_is_a_good_default(tmp_path, offsets, verdict):
    c = claim(claims.share_k_is_a_good_default, imagenet=vision(tmp_path, offsets))
    assert c.verdict == verdict
    assert set(c.parts) == {"imagenet_vs_baseline", "imagenet_vs_k4"}
    assert c.parts["imagenet_vs_k4"]["values"]["0"] == pytest.approx(100 * (offsets[0] + 0.01))


@pytest.mark.parametrize("early, verdict", [(-0.05, HELD), (0.02, NOT_HELD)])
def test_too_early_hurts(tmp_path, early, verdict):
    c = claim(claims.too_early_hurts, imagenet=vision(tmp_path, {0: 0.01, 1: 0.01, 2: 0.01}, early_k4=early))
    assert c.verdict == verdict
    assert c.parts["imagenet"]["epochs"] == [4] and c.parts["imagenet"]["values"]["1"] == pytest.approx(-100 * early)


def test_too_early_hurts_combines_runs(tmp_path):
    bert = bert_run(tmp_path, {0: 0.1, 1: 0.1, 2: 0.1})   # k=8 is 0.1 bits worse at E = 8, 12: held there
    seeds = {0: 0.01, 1: 0.01, 2: 0.01}
    assert claim(claims.too_early_hurts, bert=bert).verdict == HELD
    level = vision(tmp_path / "a", seeds, early_k4=0.0)   # d = 0 in every seed: inconclusive
    assert claim(claims.too_early_hurts, imagenet=level, bert=bert).verdict == INCONCLUSIVE
    against = vision(tmp_path / "b", seeds, early_k4=0.03)
    assert claim(claims.too_early_hurts, imagenet=against, bert=bert).verdict == NOT_HELD


def appendix(tmp_path: Path, lawa: dict[int, float], look: dict[int, float], exp: dict[int, float]) -> Path:
    """10-epoch SGD and Lookahead runs per seed (log.csv); LAWA k=3 and EXP k=3 on SGD, offsets from SGD."""
    root = tmp_path / "appendix"
    for seed in lawa:
        sgd = rising(10, 0.6)
        write_rows(root / f"seed{seed}" / "sgd" / "log.csv", rows_of({("baseline", 1): {seed: sgd}}, "acc1"))
        write_rows(root / f"seed{seed}" / "lookahead" / "log.csv",
                   rows_of({("baseline", 1): {seed: {e: v + look[seed] for e, v in sgd.items()}}}, "acc1",
                           "lookahead"))
        write_rows(root / f"seed{seed}" / "sgd" / "results.csv",
                   rows_of({("lawa", 3): {seed: {e: sgd[e] + lawa[seed] for e in range(3, 11)}},
                            ("exp", 3): {seed: {e: sgd[e] + exp[seed] for e in range(3, 11)}}}, "acc1"))
    return root


@pytest.mark.parametrize("lawa, look, verdict", [
    ({0: 0.02, 1: 0.01, 2: 0.03}, {0: 0.0, 1: 0.01, 2: -0.01}, HELD),
    ({0: 0.02, 1: 0.01, 2: 0.03}, {0: 0.03, 1: 0.02, 2: 0.04}, NOT_HELD),   # Lookahead beats LAWA everywhere
    ({0: 0.02, 1: -0.01, 2: 0.0}, {0: 0.0, 1: 0.0, 2: 0.0}, INCONCLUSIVE)])
def test_lookahead_app_b(tmp_path, lawa, look, verdict):
    c = claim(claims.lookahead_app_b, appendix=appendix(tmp_path, lawa, look, lawa))
    assert c.verdict == verdict
    assert c.parts["lawa_vs_sgd"]["epochs"] == [4, 5, 6]          # the middle third of 10 epochs
    assert c.parts["lawa_vs_lookahead"]["values"]["0"] == pytest.approx(100 * (lawa[0] - look[0]))


@pytest.mark.parametrize("exp, verdict", [({0: 0.0, 1: 0.0, 2: 0.0}, HELD), ({0: 0.05, 1: 0.04, 2: 0.06}, NOT_HELD),
                                          ({0: 0.03, 1: 0.0, 2: 0.02}, INCONCLUSIVE)])
def test_uniform_vs_exp_app_c(tmp_path, exp, verdict):
    lawa = {0: 0.02, 1: 0.01, 2: 0.03}
    c = claim(claims.uniform_vs_exp_app_c, appendix=appendix(tmp_path, lawa, {0: 0, 1: 0, 2: 0}, exp))
    assert c.verdict == verdict and c.parts["lawa_minus_exp"]["epochs"] == [5, 6, 7, 8, 9, 10]


def gpt_run(tmp_path: Path, ewa_gain: dict[int, float]) -> Path:
    """Updates 50..1200 of a high-LR run: EMA and SWA (from 300) at the baseline, spaced LAWA (ewa-s4 k=2)
    ewa_gain below it."""
    root = tmp_path / "gpt" / "lr-high"
    rows = []
    for seed, gain in ewa_gain.items():
        base = {u: 10 - u / 400 for u in range(50, 1201, 50)}
        rows += rows_of({("baseline", 1): {seed: base}, ("ema", 2): {seed: base},
                         ("ewa-s4", 2): {seed: {u: v - gain for u, v in base.items() if u >= 250}}}, "loss", "adamw")
        rows += rows_of({("swa", 300): {seed: {u: base[u] for u in range(300, 1201, 50)}}}, "loss", "adamw")
    for r in rows:
        if r["method"] == "swa":  # SWA's k counts checkpoints 50 updates apart: (E − start)/50 + 1
            r["k"] = (r["epoch"] - 300) // 50 + 1
        r["unit"] = "step"
    write_rows(root / "results.csv", rows)
    return root


@pytest.mark.parametrize("gain, verdict", [({0: 0.05, 1: 0.02, 2: 0.03}, HELD), ({0: -0.05, 1: -0.02}, NOT_HELD),
                                           ({0: 0.1}, INCONCLUSIVE)])
def test_spaced_lawa_high_lr(tmp_path, gain, verdict):
    c = claim(claims.spaced_lawa_high_lr, gpt=gpt_run(tmp_path, gain))
    assert c.verdict == verdict
    assert c.parts["vs_swa"]["values"]["0"] == pytest.approx(gain[0])


def test_spaced_lawa_without_the_gpt_stage_is_inconclusive(tmp_path):
    c = claim(claims.spaced_lawa_high_lr, imagenet=vision(tmp_path, {0: 0.01}))
    assert c.verdict == INCONCLUSIVE and "did not run" in c.why


@pytest.mark.parametrize("offsets, verdict", [({0: 0.041, 1: 0.061, 2: 0.041}, HELD),
                                              ({0: -0.021, 1: -0.021, 2: -0.041}, NOT_HELD),
                                              ({0: 0.041, 1: -0.021, 2: 0.0}, INCONCLUSIVE)])
def test_gpu_time_saved(tmp_path, offsets, verdict):
    # The baseline rises 0.02 per epoch: LAWA 0.041 ahead is matched 3 epochs later (2 epochs: 0.04 < 0.041),
    # 0.061 ahead 4 later; level (0.0) at once (a tie matches); behind, the largest gap is at LAWA's first end
    # epoch, 2, where the baseline can only be 1 epoch earlier: −1.
    c = claim(claims.gpu_time_saved, imagenet=vision(tmp_path, offsets, ks=(2,)))
    assert c.verdict == verdict
    expected = {0.041: 3.0, 0.061: 4.0, 0.0: 0.0, -0.021: -1.0, -0.041: -1.0}
    part = c.parts["imagenet"]
    assert part["values"] == {str(s): expected[o] for s, o in offsets.items()}
    assert part["median"] == sorted(part["values"].values())[1] and part["range"][0] <= part["range"][1]


# ---------------------------------------------------------------------------------------------------------
# the shipped logs: the README section and make_figures --from, end to end

needs_logs = pytest.mark.skipif(not (SHIPPED / "imagenet").is_dir(), reason="docs/results not shipped")


@needs_logs
def test_readme_section_is_what_the_shipped_logs_give():
    text = (REPO / "README.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    expected = section(SHIPPED)
    assert replace_section(text, expected) == text, (
        "README.md's results section differs from docs/results; run: python -m plots.readme_table --from "
        "docs/results --write README.md")


def test_comparisons_set_each_runs_verdicts_beside_the_references(tmp_path):
    # The reference: LAWA k=2 ahead in every seed (held); compare/a the same; compare/b behind in every seed.
    root = tmp_path / "results"
    vision(root, {0: 0.03, 1: 0.02, 2: 0.04})
    for name, offsets in (("a", {0: 0.03, 1: 0.02, 2: 0.04}), ("b", {0: -0.03, 1: -0.02, 2: -0.04})):
        vision(root / "compare" / name, offsets)
        (root / "compare" / name / "about.txt").write_text(f"run {name}\n")
    ours = claims.judge_all(load_inputs(imagenet=str(root / "imagenet")))
    theirs = claims.judge_all(load_inputs(imagenet=str(root / "compare" / "b" / "imagenet")))
    n, same = len(ours), sum(a.verdict == b.verdict for a, b in zip(ours, theirs, strict=True))
    lines = comparisons(root, [c.to_dict() for c in ours])
    assert same <= n - 2 and f"a: {n} of {n}; b: {same} of {n}" in lines[1]
    header, rows = lines[3], lines[5:]
    assert "| reference (" in header and "| run a (" in header and "| run b (" in header
    assert len(rows) == n
    for row, a, b in zip(rows, ours, theirs, strict=True):  # reference, a (= reference), b
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert cells[0] == a.statement and cells[1] == cells[2] and cells[1].startswith(f"**{a.verdict}**, ")
        assert cells[3].startswith(f"**{b.verdict}**, ")
    assert rows[0].startswith("| LAWA is ahead of the baseline mid-training") and "**held**, +3.0" in rows[0]
    assert "**not held**, -3.0" in rows[0]
    assert comparisons(tmp_path / "none", []) == []
    (root / "compare" / "a" / "about.txt").unlink()
    with pytest.raises(claims.TidyError, match="about.txt: missing"):
        comparisons(root, [c.to_dict() for c in ours])


def test_ship_logs_copies_the_text_logs_and_the_job_times(tmp_path):
    from plots.ship_logs import ship

    out = tmp_path / "out"
    files = {"imagenet/seed0/log.csv": "a", "imagenet/seed0/results.csv": "b", "imagenet/seed0/args.json": "{}",
             "imagenet/seed0/checkpoint1.pt": "weights", "bert/seed0/checkpoints/args.json": "{}",
             "bert/seed0/log.csv": "c", "bert/seed0/data-bin/args.json": "x", "figures/summary.json": "{}",
             "appendix/seed0/sgd/train.out": "console", ".done-imagenet-s0": "12\n", ".cpu-imagenet-s0": "10\n"}
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    to = tmp_path / "logs"
    ship(out, to)
    got = sorted(p.relative_to(to).as_posix() for p in to.rglob("*") if p.is_file())
    assert got == ["bert/seed0/args.json", "bert/seed0/log.csv", "imagenet/seed0/args.json", "imagenet/seed0/log.csv",
                   "imagenet/seed0/results.csv", "times.txt"]
    assert (to / "imagenet/seed0/results.csv").read_text() == "b"
    assert "imagenet-s0" in (to / "times.txt").read_text() and "10" in (to / "times.txt").read_text()
    with pytest.raises(claims.TidyError, match="already exists"):
        ship(out, to)
    (out / "imagenet/seed0/results.csv").write_text("new")
    ship(out, to, force=True)
    assert (to / "imagenet/seed0/results.csv").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "out"]  # no temporary folder left


def test_replace_section_refuses_a_file_without_markers():
    with pytest.raises(claims.TidyError, match="no <!-- results:begin -->"):
        replace_section("# a README\n", "x")
    assert replace_section(f"a\n{BEGIN}\nold\n{END}\nb\n", f"{BEGIN}\nnew\n{END}\n") == f"a\n{BEGIN}\nnew\n{END}\nb\n"


@needs_logs
def test_make_figures_from_the_shipped_logs_without_torch(tmp_path):
    code = ("import sys, runpy; sys.argv = ['make_figures.py', '--from', sys.argv[1], '--out', sys.argv[2]]\n"
            "try:\n    runpy.run_path(sys.argv[0] and 'plots/make_figures.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'make_figures imported torch'\n")
    done = subprocess.run([sys.executable, "-c", code, str(SHIPPED), str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.stem for p in tmp_path.glob("fig*.png")) == sorted(p.stem for p in (REPO / "plots").glob(
        "fig[1-9]_*.py"))
    import json
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["key"] for c in summary["claims"]] == [f.__name__ for f in claims.CLAIMS]
    assert {c["verdict"] for c in summary["claims"]} <= {HELD, NOT_HELD, INCONCLUSIVE}
    assert "## The paper's claims" in (tmp_path / "summary.md").read_text()
    assert "claim: " in done.stdout and "GPU time saved, imagenet seed" in done.stdout


def test_figures_1_to_4_draw_a_band_per_curve_when_there_are_several_seeds(tmp_path, monkeypatch):
    from matplotlib.collections import PolyCollection

    from plots import fig1_averaged_vs_baseline, fig2_k_sensitivity, fig4_early_phase, figstyle
    from plots.summary import summarize

    inputs = load_inputs(imagenet=str(vision(tmp_path, {0: 0.02, 1: 0.03, 2: 0.01})))
    drawn = {}
    real_save = figstyle.save
    for module in (fig1_averaged_vs_baseline, fig2_k_sensitivity, fig4_early_phase):
        monkeypatch.setattr(module, "save", lambda fig, out, stem: drawn.setdefault(stem, fig) and
                            real_save(fig, out, stem))
        module.make(inputs, tmp_path / "figs")
    bands = {stem: sum(isinstance(c, PolyCollection) for ax in fig.axes for c in ax.collections)
             for stem, fig in drawn.items()}
    assert bands == {"fig1_averaged_vs_baseline": 2, "fig2_k_sensitivity": 3, "fig4_early_phase": 2}
    assert drawn["fig2_k_sensitivity"].axes[0].get_title().endswith(", 3 seeds")
    rows = {(r["method"], r["k"]): r for r in summarize(inputs)["best_final"] if r["metric"] == "val_acc1"}
    assert rows[("lawa", 2)]["n"] == 3 and set(rows[("lawa", 2)]["per_seed"]) == {"0", "1", "2"}
    finals = [0.5 + 0.01 * s + 0.22 + o for s, o in {0: 0.02, 1: 0.03, 2: 0.01}.items()]   # as stored
    assert rows[("lawa", 2)]["final_mean"] == pytest.approx(sum(finals) / 3)
