"""Benchmarks: each module is a script, run from the repository root as ``python -m benchmarks.<name>``.

``sweep`` (A), ``fairseq_average`` (B), ``throughput`` (C), ``scheduler`` (D); ``run_all`` runs them in turn and
writes the combined table. Every script takes ``--quick`` (tiny sizes, one repeat: CI checks that it runs) and
writes ``<name>.csv`` (tidy, one row per measurement), ``<name>.json`` and ``<name>.md`` to ``--out``.
"""
