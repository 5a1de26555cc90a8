"""All seven figures, the GPU-time-saved table, the paper's claims judged over seeds and a summary, from the
experiments' tidy CSVs, in seconds and without torch.

    $ python plots/make_figures.py --from docs/results --out /tmp/figures      # the shipped reference logs
    $ python plots/make_figures.py --from out --out out/figures                # what reproduce_all.sh wrote
    $ python plots/make_figures.py --imagenet runs/imagenet --bert runs/bert --appendix runs/appendix \\
          --out runs/figures [--gpus 4]

Expected layout (what the experiment scripts write; give only the folders you have). Every log.csv and
results.csv below a folder is read, seed and optimizer come from the CSV columns, not from folder names, so
a folder may hold one run or several seeds (reproduce_all.sh: IMAGENET_DIR/seed{N}/log.csv, ...):

    IMAGENET_DIR/**/log.csv                 trainer log: per-epoch metrics and wall_seconds (method=baseline)
    IMAGENET_DIR/**/results.csv             sweep: baseline (k=1) and lawa/exp rows by window end E and k
    BERT_DIR/**/log.csv, results.csv        the same for the masked-LM run (losses in bits)
    APPENDIX_DIR/seed{N}/sgd/log.csv        SGD run of seed N
    APPENDIX_DIR/seed{N}/sgd/results.csv    sweep over it: lawa and exp rows (one k; reproduce_all.sh leaves
                                            the baseline to log.csv), ema, swa, ewa-s* and twa rows
    APPENDIX_DIR/seed{N}/lookahead/log.csv  Lookahead run of seed N
    GPT_DIR/results.csv                     the high-LR run of gpt/ (lr-high/), for its claim only

``--from DIR`` takes DIR/imagenet, DIR/bert, DIR/appendix and DIR/gpt/lr-high. Baseline curves come from a
results.csv when it has baseline rows (evaluated exactly as the averaged models), else from log.csv; times
always from log.csv's wall_seconds. With several seeds, figures 1–4 draw the seeds' mean and a ± one-std band.

Writes FIGDIR/fig{1..7}_*.png and .pdf, FIGDIR/summary.md and FIGDIR/summary.json (the claims first; rule:
plots/claims.py). A figure whose inputs are absent is skipped with a one-line notice; bad input (malformed
CSV, missing columns, unknown metric) stops with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python plots/make_figures.py` finds `plots`

from lawa_tidy import atomic_write
from plots import (
    fig1_averaged_vs_baseline,
    fig2_k_sensitivity,
    fig3_top5_and_losses,
    fig4_early_phase,
    fig5_lawa_vs_lookahead,
    fig6_uniform_vs_exp,
    fig7_methods,
)
from plots.figstyle import Skip
from plots.summary import summarize, to_markdown
from plots.tidy import add_input_args, inputs_from_args, run_cli

FIGURES = [fig1_averaged_vs_baseline, fig2_k_sensitivity, fig3_top5_and_losses, fig4_early_phase,
           fig5_lawa_vs_lookahead, fig6_uniform_vs_exp, fig7_methods]


def main(argv: list[str] | None = None) -> int:
    parser = add_input_args(argparse.ArgumentParser(
        prog="make_figures.py", description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[2:]), formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    inputs = inputs_from_args(args)
    out = Path(args.out)
    made = 0
    for figure in FIGURES:
        try:
            paths = figure.make(inputs, out)
        except Skip as why:
            print(f"make_figures.py: skipping {figure.STEM}: {why}")
            continue
        made += 1
        print(f"wrote {paths[0]} (+ .pdf)")
    data = summarize(inputs)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "summary.json", lambda f: f.write((json.dumps(data, indent=1, ensure_ascii=False)
                                                          + "\n").encode()), force=True)
    atomic_write(out / "summary.md", lambda f: f.write(to_markdown(data).encode()), force=True)
    print(f"wrote {out / 'summary.md'} and summary.json; {made} of {len(FIGURES)} figures")
    for record in data["hours_saved"]:
        print(f"GPU time saved, {record['run']} seed {record['seed']} {record['metric']}: {record['headline']}")
    for claim in data["claims"]:
        print(f"claim: {claim['verdict']:12s} {claim['statement']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "make_figures.py"))
