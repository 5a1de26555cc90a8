"""The README's results section, generated from the shipped reference logs so that no hand-typed number can drift.

    $ python -m plots.readme_table --from docs/results --write README.md     # rewrite the section in place
    $ python -m plots.readme_table --from docs/results --check README.md     # exit 1 if it differs
    $ python -m plots.readme_table --from docs/results                       # print it

The section sits between ``BEGIN`` and ``END`` (HTML comments, invisible on GitHub) and is built from
``summarize`` of the logs (what ``summary.json`` holds): one row per claim of plots/claims.py with its verdict
and the seeds' mean ± std of each paired difference it judged; a line on the machine the logs came from (each
run's ``args.json``); how far a change of thread count moved the same seed's numbers (``variation/``: the
appendix SGD run of one seed repeated with another thread count), set against the seed spread; and the
verdicts of each ``compare/NAME/`` (another run of reproduce_all.sh, at other sizes or on another VM, laid out
as the reference, with an ``about.txt``) beside the reference's.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python plots/readme_table.py` finds `plots`

from lawa_tidy import atomic_write
from plots.claims import HELD, NOT_HELD
from plots.summary import summarize
from plots.tidy import TidyError, folders_from, load_inputs, load_run, run_cli, seed_curves

__all__ = ["BEGIN", "END", "section", "replace_section", "machine_line", "variation", "comparisons", "main"]

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
COMMAND = "python -m plots.readme_table --from docs/results --write README.md"
DIGITS = {"pt": 1, "bits": 3, "epochs": 1}


def _pm(part: dict) -> str:
    """'+4.1 ± 2.0 pt (every seed > 0)': a part's mean ± std over seeds and which side of the rule it is on."""
    digits = DIGITS.get(part["unit"], 3)
    if part["std"] is None:
        return f"{part['mean']:+.{digits}f} {part['unit']} (one seed)"
    values = list(part["values"].values())
    low, high = part["ci"]
    side = ("every seed > 0" if all(v > 0 for v in values) else "every seed < 0" if all(v < 0 for v in values)
            else "signs differ")
    ci = "interval clear of 0" if low > 0 or high < 0 else "interval includes 0"
    return f"{part['mean']:+.{digits}f} ± {part['std']:.{digits}f} {part['unit']} ({side}; {ci})"


def _claim_row(claim: dict) -> str:
    parts = [p for p in claim["parts"].values() if p["n"]]
    if not parts:
        measured = claim["why"]
    else:
        measured = "; ".join(f"{p['measure']}: {_pm(p)}"
                             + (" (lower bounds: the baseline never matched)" if p.get("censored_seeds") else "")
                             for p in parts)
        measured += f" (n={max(p['n'] for p in parts)} seeds)"
    return f"| {claim['statement']} | {measured} | **{claim['verdict']}** |"


def _interval_clear(claim: dict) -> bool:
    """Whether a part with the claim's own verdict has its 95% interval clear of 0."""
    return any(p["verdict"] == claim["verdict"] and p["ci"] and (p["ci"][0] > 0 or p["ci"][1] < 0)
               for p in claim["parts"].values())


def _hardware_records(root: Path) -> list[dict]:
    """The ``hardware`` record of every run's args.json below ``root``, variation/ and compare/ aside."""
    records = []
    for path in sorted(root.rglob("args.json")):
        if {"variation", "compare"} & set(path.relative_to(root).parts):
            continue
        try:
            records.append(json.loads(path.read_text())["hardware"])
        except (OSError, ValueError, KeyError) as err:
            raise TidyError(f"{path}: no hardware record ({err})") from None
    return records


def machine_line(root: Path) -> str:
    """The reference machine as the runs' args.json recorded it: CPU, cores, torch build, micro-benchmark."""
    records = _hardware_records(root)
    with_bench = [r for r in records if "benchmark" in r]
    if not with_bench:
        return "The shipped logs do not record the machine."
    first = with_bench[0]
    build = first["torch_build"]
    gflops = [r["benchmark"]["matmul_gflops"] for r in with_bench]
    gbps = [r["benchmark"]["copy_gbps"] for r in with_bench]
    return (f"Reference machine (each run's `args.json`): {first['cpu_model']}, {first['cpu_count']} cores, torch "
            f"{build['version']} ({build['blas']}, {build['parallel']}, {build['cpu_capability']}), one thread per "
            f"run; the micro-benchmark at each of its {len(with_bench)} runs' start: matmul "
            f"{statistics.median(gflops):.0f} GFLOP/s median ({min(gflops):.0f}–{max(gflops):.0f}), copy "
            f"{statistics.median(gbps):.1f} GB/s ({min(gbps):.1f}–{max(gbps):.1f}): other load on the machine "
            "shows up here as a lower number.")


def variation(root: Path, appendix_k: int | None = None) -> str | None:
    """How far another thread count moved one appendix seed's numbers, against the seeds' spread (None: not run)."""
    folder = root / "variation"
    if not folder.is_dir():
        return None
    other = load_run(folder, "variation", recursive=True)
    main = load_inputs(appendix=root / "appendix").appendix
    if other is None or main is None:
        return None
    threads = sorted({int(json.loads(p.read_text())["hardware"]["torch_threads"])
                      for p in folder.rglob("args.json")})
    metric = "val_acc1"
    base_other, base_main = other.baseline_seeds(metric, "sgd"), main.baseline_seeds(metric, "sgd")
    seed = int(base_other.columns[0])
    k = appendix_k or int(sorted(set(main.results.loc[main.results["method"] == "lawa", "k"]))[0])
    lawa_other = seed_curves(other.results, metric, "lawa", k, optimizer="sgd")[seed]
    lawa_main = seed_curves(main.results, metric, "lawa", k, optimizer="sgd")
    horizon = int(base_main.index.max())
    mid = [e for e in lawa_main.dropna().index if horizon / 3 <= e <= 2 * horizon / 3]
    scale = 100.0 if float(base_main.max().max()) <= 1 else 1.0

    def d(lawa, base):
        return scale * float((lawa.loc[mid] - base.loc[mid]).mean())

    d_main = {int(s): d(lawa_main[s], base_main[s]) for s in lawa_main.columns}
    d_other = d(lawa_other, base_other[seed])
    final_gap = scale * abs(float(base_other[seed].iloc[-1] - base_main[seed].iloc[-1]))
    finals = [scale * float(base_main[s].dropna().iloc[-1]) for s in base_main.columns]
    return (f"How much the numbers move with the thread count: one appendix run (SGD, seed {seed}) repeated with "
            f"{'/'.join(map(str, threads))} torch threads instead of 1 (another thread count changes the order of "
            "floating-point sums, as another CPU does; whole runs on other VMs, if any, follow) ended "
            f"{final_gap:.1f} points of val top-1 apart, against a spread of {statistics.stdev(finals):.1f} points "
            f"(std) between the seeds' final values; its LAWA − SGD mid-run difference was {d_other:+.1f} points "
            f"instead of {d_main[seed]:+.1f} (the seeds: {statistics.fmean(d_main.values()):+.1f} ± "
            f"{statistics.stdev(d_main.values()):.1f}). So a single run's numbers are only good to about the seed "
            "spread on another machine; what survives is a verdict that holds in every seed or with an interval "
            "clear of 0, and the direction of the inconclusive ones is not a result.")


def _hardware(root: Path) -> tuple[str, float | None]:
    """The CPU model and median matmul GFLOP/s that the runs below ``root`` recorded (variation/, compare/ aside)."""
    records = _hardware_records(root)
    models = {r.get("cpu_model", "?") for r in records}
    gflops = [r["benchmark"]["matmul_gflops"] for r in records if "benchmark" in r]
    return " / ".join(sorted(models)) or "?", statistics.median(gflops) if gflops else None


def _first_part(claim: dict) -> str:
    parts = [p for p in claim["parts"].values() if p["n"]]
    return "no data" if not parts else _pm(parts[0]).split(" (")[0]


def _column(root: Path, about: str) -> str:
    model, gflops = _hardware(root)
    speed = "" if gflops is None else f", matmul {gflops:.0f} GFLOP/s"
    return f"{about} ({model}{speed})"


def _log_values(path: Path) -> list[tuple[str, ...]]:
    with path.open(newline="") as f:
        return sorted(tuple(row[c] for c in ("method", "k", "epoch", "split", "metric", "value"))
                      for row in csv.DictReader(f))


def _identical_logs(root: Path, other: Path) -> str:
    """Which trainer logs (``log.csv``) of ``other`` equal the reference's value for value, per run: 'bert 3 of 3'."""
    found = []
    for run in ("imagenet", "bert", "appendix"):
        mine = sorted((root / run).rglob("log.csv"))
        if not mine:
            continue
        twins = [(p, other / p.relative_to(root)) for p in mine]
        same = sum(twin.is_file() and _log_values(p) == _log_values(twin) for p, twin in twins)
        found.append(f"{run} {same} of {len(mine)}")
    return ", ".join(found)


def comparisons(root: Path, claims: list[dict], appendix_k: int | None = None) -> list[str]:
    """The verdicts of other runs of reproduce_all.sh beside the reference's: one column per ``root/compare/NAME/``
    (laid out as the reference; its ``about.txt`` says in one line what differs: other sizes, another VM), each
    cell the verdict and the claim's first paired difference, and per column how many verdicts read the same."""
    folder = root / "compare"
    runs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not runs:
        return []
    columns, judged = [], []
    for run in runs:
        about = run / "about.txt"
        if not about.is_file():
            raise TidyError(f"{about}: missing (one line saying how this run differs from the reference)")
        f = folders_from(run)
        theirs = summarize(load_inputs(f["imagenet"], f["bert"], f["appendix"], f["gpt"], appendix_k=appendix_k))
        columns.append(_column(run, about.read_text().strip()))
        judged.append({c["key"]: c for c in theirs["claims"]})
    agree = "; ".join(f"{run.name}: {sum(j.get(c['key'], {}).get('verdict') == c['verdict'] for c in claims)} of "
                      f"{len(claims)}" for run, j in zip(runs, judged, strict=True))
    same_logs = "; ".join(f"{run.name}: {_identical_logs(root, run)}" for run in runs)
    lines = ["", "Other runs of `reproduce_all.sh` beside the reference (each in `" + _shown(folder) + "/NAME/`; "
             "another CPU runs other kernels, so other floating-point sums and other trajectories from the same "
             f"seeds). Verdicts that read as the reference's: {agree}. Trainer logs (`log.csv`) equal to the "
             f"reference's value for value: {same_logs}. Each cell: the verdict and the claim's first paired "
             "difference, mean ± std over seeds.", "",
             "| claim | " + " | ".join([_column(root, "reference")] + columns) + " |",
             "|---" * (len(runs) + 2) + "|"]
    for c in claims:
        cells = [f"**{c['verdict']}**, {_first_part(c)}"]
        for j in judged:
            other = j.get(c["key"])
            cells.append("not run" if other is None else f"**{other['verdict']}**, {_first_part(other)}")
        lines.append(f"| {c['statement']} | " + " | ".join(cells) + " |")
    return lines


def _shown(root: Path) -> str:
    """``root`` as the README names it: relative to the repository when inside it (the same text from any cwd)."""
    repo = Path(__file__).resolve().parents[1]
    try:
        return root.resolve().relative_to(repo).as_posix()
    except ValueError:
        return root.as_posix()


def section(root: str | Path, *, appendix_k: int | None = None) -> str:
    """The README section, markers included, from the logs below ``root`` (layout: plots/make_figures.py)."""
    root = Path(root)
    shown = _shown(root)
    folders = folders_from(root)
    inputs = load_inputs(folders["imagenet"], folders["bert"], folders["appendix"], folders["gpt"],
                         appendix_k=appendix_k)
    data = summarize(inputs)
    claims = data["claims"]
    counts = {v: sum(c["verdict"] == v for c in claims) for v in (HELD, NOT_HELD)}
    lines = [BEGIN, f"<!-- generated by `{COMMAND}` from the logs in {shown}/; do not edit by hand -->",
             "", "## What the reference run shows", "",
             f"`bash reproduce_all.sh` with its defaults, three seeds of every run; its logs are in `{shown}/` "
             f"and `python plots/make_figures.py --from {shown} --out figs` redraws every figure and "
             "`summary.md` from them in seconds. Each claim of the paper is a function in `plots/claims.py` over "
             "these logs. It names a paired difference d, one value per seed, signed so that d > 0 is what the "
             "paper says, and it is **held** when d > 0 in every seed or its 95% t interval excludes 0, **not "
             "held** when the same is true against it, and **inconclusive** otherwise (the effect is inside the seed "
             "spread). With three seeds an effect of zero still shows the same sign in every seed one time in four, "
             "so a verdict on that ground alone is weak; one whose 95% interval is clear of 0 is the stronger kind. "
             f"Of {len(claims)} claims, {counts[HELD]} held and {counts[NOT_HELD]} did not; numbers are the seeds' "
             "mean ± std (per-seed values in `summary.md`).", "",
             "![LAWA vs baseline](docs/figures/fig1_averaged_vs_baseline.png)", "",
             "| claim (paper) | measured: paired difference d, mean ± std over seeds | verdict |", "|---|---|---|"]
    lines += [_claim_row(c) for c in claims]
    lines += ["", "![early phase](docs/figures/fig4_early_phase.png)"]
    strong = [c["statement"] for c in claims if c["verdict"] in (HELD, NOT_HELD) and _interval_clear(c)]
    weak = [c["statement"] for c in claims if c["verdict"] in (HELD, NOT_HELD) and not _interval_clear(c)]
    lines += ["", "Verdicts with a part whose 95% interval is clear of 0 (they should survive another machine): "
              + ("; ".join(strong) or "none") + ". Verdicts resting on every seed agreeing alone: "
              + ("; ".join(weak) or "none") + "."]
    lines += ["", machine_line(root)]
    moved = variation(root, appendix_k)
    if moved:
        lines += ["", moved]
    lines += comparisons(root, claims, appendix_k)
    lines += ["", END]
    return "\n".join(lines) + "\n"


def replace_section(text: str, new: str, where: str = "README.md") -> str:
    """``text`` with the part from BEGIN to END (inclusive, plus its newline) replaced by ``new``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise TidyError(f"{where}: no {BEGIN} … {END} section to replace")
    end += len(END)
    if text[end:end + 1] == "\n":
        end += 1
    return text[:start] + new + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="readme_table.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="root", required=True, metavar="DIR",
                        help="the reference logs (docs/results): imagenet/, bert/, appendix/, variation/, "
                        "compare/NAME/")
    parser.add_argument("--appendix-k", type=int, help="appendix LAWA/EXP window (default: the only one swept)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", metavar="README", help="replace the section in this file")
    action.add_argument("--check", metavar="README", help="exit 1 if this file's section differs")
    args = parser.parse_args(argv)
    new = section(args.root, appendix_k=args.appendix_k)
    target = args.write or args.check
    if target is None:
        sys.stdout.write(new)
        return 0
    path = Path(target)
    try:
        text = path.read_text()
    except OSError as err:
        raise TidyError(f"{path}: cannot read ({err.strerror})") from None
    updated = replace_section(text, new, str(path))
    if args.check:
        if updated != text:
            print(f"readme_table.py: {path}'s results section differs from what {args.root} gives; run: {COMMAND}",
                  file=sys.stderr)
            return 1
        return 0
    if updated != text:
        atomic_write(path, lambda f: f.write(updated.encode()), force=True)
        print(f"wrote the results section of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "readme_table.py"))
