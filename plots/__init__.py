"""Figures and numbers from the tidy CSV logs and results; reads CSVs only (pandas), never the trainers.

    python plots/make_figures.py --from docs/results --out FIGDIR      # or --imagenet DIR --bert DIR ...
    python plots/hours_saved.py --log LOG.csv --results RESULTS.csv --metric val_acc1 --k 6

tidy.py reads and checks the CSVs (the schema is RESULT_COLUMNS there); hours_saved.py is the paper's
"GPU hours saved"; claims.py judges each of the paper's claims over seeds (held / not held / inconclusive);
fig1..fig7 are one script each; figstyle.py holds what they share; summary.py the tables; readme_table.py
writes the README's results section from the shipped logs in docs/results. The expected directory layout is
in make_figures.py's docstring.
"""
