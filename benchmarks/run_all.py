"""Run benchmarks A–D, E's profile and G's sweep part one after another (never side by side: they would measure
each other) and write the combined table, ``summary.md``, next to their results — the text BENCHMARKS.md quotes.

    python -m benchmarks.run_all              # ≈28 min on 2 busy cores; needs 6 GB of /tmp
    python -m benchmarks.run_all --quick      # ≈1 min: does everything run?
    python -m benchmarks.run_all --only throughput scheduler
    python -m benchmarks.run_all --scale      # also F (merge: 11 GB, mergekit's venv) and G2 (dcp_ranks): ≈20 min more
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common

ORDER = ["sweep", "fairseq_average", "throughput", "scheduler", "profile_imagenet", "distributed_sweep"]
SCALE = ["merge", "dcp_ranks"]  # large data and other tools: only with --scale or --only


def summary_markdown(out: Path, names: list[str]) -> str:
    """Machine, then each benchmark's table, goals and checks, from the files the runs wrote."""
    names = [n for n in names if (out / f"{n}.json").is_file() and (out / f"{n}.md").is_file()]
    if not names:
        return ""
    m = json.loads((out / f"{names[0]}.json").read_text())["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Linux {m['kernel']}, Python {m['python']},"
        f" torch {m['torch']}, {m['torch_threads']} torch thread(s); git {m['git_sha']}. Other engineers' jobs were"
        " running on the same 2 cores: each benchmark records `uptime` before and after.",
        "",
    ]
    lines += [(out / f"{name}.md").read_text() for name in names]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", choices=ORDER + SCALE, default=None)
    p.add_argument("--scale", action="store_true", help=f"also run {', '.join(SCALE)}")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--summary-only", action="store_true", help="only rebuild summary.md from the results present")
    args = p.parse_args(argv)
    out = common.out_dir(argparse.Namespace(out=args.out, quick=args.quick))
    chosen = args.only or ORDER + (SCALE if args.scale else [])
    failed = []
    for name in [] if args.summary_only else [n for n in ORDER + SCALE if n in chosen]:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--out", str(out)] + (["--quick"] if args.quick else [])
        t0 = time.perf_counter()
        code = subprocess.run(cmd, cwd=common.REPO).returncode
        print(f"== benchmarks.{name}: exit {code} after {time.perf_counter() - t0:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    text = summary_markdown(out, [n for n in ORDER + SCALE if n in chosen])
    (out / "summary.md").write_text(text)
    print(f"combined table: {out / 'summary.md'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
