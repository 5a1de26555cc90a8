"""What every benchmark shares: the command line, machine and load records, the page cache, result files.

A benchmark builds a :class:`Report`, records raw measurements with ``measure`` (one tidy CSV row each),
states correctness ``check``s and performance ``goal``s, fills ``summary`` (the markdown table) and returns
``report.finish()`` as its exit status: 1 when a correctness check failed, else 0. A missed goal is a result,
not a failure, so it never changes the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CSV_COLUMNS = ["benchmark", "variant", "condition", "repeat", "metric", "value", "unit"]


def parser(description: str, *, repeats: int) -> argparse.ArgumentParser:
    """The flags every benchmark has; scripts add their own sizes."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat, warm cache only (CI: does it run?)")
    p.add_argument("--repeats", type=int, default=repeats, help="repeats of every variant (medians are reported)")
    p.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results[/quick])")
    p.add_argument("--seed", type=int, default=0, help="seed for the synthetic data")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads; with other jobs on 2 cores, 2 threads wait on each other (much slower)",
    )
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line and apply ``--threads``."""
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def out_dir(args: argparse.Namespace) -> Path:
    # A quick run must never overwrite the real numbers that BENCHMARKS.md quotes.
    return args.out if args.out is not None else (RESULTS / "quick" if args.quick else RESULTS)


# --------------------------------------------------------------------------------------------------
# Machine, load, page cache
# --------------------------------------------------------------------------------------------------


def uptime() -> str:
    """`uptime`'s line: other engineers' jobs share these 2 cores, so every result records the load."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def meminfo(field: str) -> int:
    """A /proc/meminfo field in bytes (0 where there is no /proc)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == field:
                return int(rest.split()[0]) * 1024
    return 0


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(meminfo("MemTotal") / 2**30, 1),
        "ram_available_gib_at_start": round(meminfo("MemAvailable") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "git_sha": _git_sha(),
    }


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        return out.stdout.strip()
    except OSError:
        return ""


def drop_page_cache() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``. True if the kernel accepted it (root on Linux)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def cached_fraction(paths: Sequence[Path]) -> float | None:
    """Share of the files' bytes in the page cache, from util-linux ``fincore`` (None if unavailable)."""
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    res = size = 0
    for line in out.stdout.split("\n"):
        if line.strip():
            r, s = line.split()
            res, size = res + int(r), size + int(s)
    return min(1.0, res / size) if size else None  # fincore counts whole pages


def prewarm(paths: Sequence[Path]) -> None:
    """Read files whole so that they sit in the page cache (the 'warm' condition)."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def set_cache(condition: str, paths: Sequence[Path], report: Report) -> str:
    """Put ``paths`` in the page-cache state ``condition`` ('cold' or 'warm'); returns the state achieved.

    'cold' falls back to 'warm' (and says so in the report) where the cache cannot be dropped (not root).
    """
    if condition == "cold":
        if drop_page_cache():
            return "cold"
        report.note("the page cache could not be dropped (not root?): 'cold' runs ran warm")
        condition = "warm"
    prewarm(paths)
    return condition


def free_disk_or_exit(directory: Path, needed: int, hint: str) -> None:
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    if free < needed * 1.2:
        sys.exit(f"benchmark: {directory} has {free / 1e9:.1f} GB free, needs ~{needed / 1e9:.1f} GB; {hint}")


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A directory under /tmp for synthetic checkpoints, deleted afterwards (also on Ctrl-C or SIGTERM)."""

    def terminate(signum, frame):
        raise SystemExit(128 + signum)  # unwinds through the with-block, so the directory is removed

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with tempfile.TemporaryDirectory(prefix=f"lawa-bench-{prefix}-", dir="/tmp") as d:
            yield Path(d)
    finally:
        signal.signal(signal.SIGTERM, previous)


def interleaved(variants: Sequence[str], repeat: int) -> list[str]:
    """Variant order for one repeat: forward on even repeats, reversed on odd ones (ABBA), so a slow drift
    of the machine's load falls on every variant alike."""
    return list(variants) if repeat % 2 == 0 else list(reversed(variants))


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


class Report:
    """Raw rows, summary table, checks, goals and notes of one benchmark run, and the files they go to."""

    def __init__(self, name: str, title: str, args: argparse.Namespace, config: dict[str, Any]) -> None:
        self.name, self.title, self.args = name, title, args
        self.config = {"quick": args.quick, "repeats": args.repeats, "seed": args.seed, **config}
        self.rows: list[dict[str, Any]] = []
        self.summary: list[dict[str, Any]] = []
        self.tables: dict[str, list[dict[str, Any]]] = {}  # further tables under their own captions
        self.checks: list[dict[str, Any]] = []
        self.goals: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.extra: dict[str, Any] = {}
        if args.quick:
            self.note("--quick: tiny sizes and one repeat, to check that the benchmark works; its numbers mean nothing")
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.command = " ".join([Path(sys.executable).name, "-m", f"benchmarks.{name}", *sys.argv[1:]])
        self.load_before = uptime()
        self.machine = machine()
        print(f"== {title}\n   load before: {self.load_before}", flush=True)

    def measure(self, variant: str, condition: str, repeat: int, metric: str, value: float, unit: str) -> None:
        self.rows.append(
            {"benchmark": self.name, "variant": variant, "condition": condition, "repeat": repeat,
             "metric": metric, "value": value, "unit": unit}
        )

    def values(self, variant: str, metric: str, condition: str | None = None) -> list[float]:
        return [
            r["value"]
            for r in self.rows
            if r["variant"] == variant and r["metric"] == metric and condition in (None, r["condition"])
        ]

    def check(self, name: str, value: Any, limit: str, passed: bool) -> None:
        """A correctness condition; a failed one makes the script exit 1."""
        self.checks.append({"check": name, "value": value, "limit": limit, "passed": bool(passed)})
        print(f"   check {'ok  ' if passed else 'FAIL'} {name}: {value} ({limit})", flush=True)

    def goal(self, name: str, measured: str, target: str, met: bool) -> None:
        """A performance goal from the issue: reported as met or missed, never an error."""
        self.goals.append({"goal": name, "measured": measured, "target": target, "met": bool(met)})

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines += _md_table(self.summary)
        for caption, rows in self.tables.items():
            lines += ["", f"*{caption}*", ""] + _md_table(rows)
        if self.goals:
            lines += [""] + _md_table(
                [{**{k: g[k] for k in ("goal", "measured", "target")}, "met": "yes" if g["met"] else "**no**"}
                 for g in self.goals]
            )
        if self.checks:
            lines += [""] + _md_table(
                [{**c, "passed": "yes" if c["passed"] else "**FAILED**"} for c in self.checks]
            )
        lines += ["", f"Load (`uptime`) before: `{self.load_before}`; after: `{self.load_after}`.  "]
        lines += [f"Command: `{self.command}`; config: `{json.dumps(self.config)}`."]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def finish(self) -> int:
        """Write ``<name>.csv``, ``.json`` and ``.md`` to the output directory; exit status for ``sys.exit``."""
        self.load_after = uptime()
        out = out_dir(self.args)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{self.name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
        record = {
            "benchmark": self.name, "title": self.title, "command": self.command, "started": self.started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": self.machine,
            "load_before": self.load_before, "load_after": self.load_after, "config": self.config,
            "summary": self.summary, "tables": self.tables, "goals": self.goals, "checks": self.checks,
            "notes": self.notes, "extra": self.extra, "rows": self.rows,
        }
        (out / f"{self.name}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        text = self.markdown()
        (out / f"{self.name}.md").write_text(text)
        print(text, flush=True)
        print(f"   load after: {self.load_after}\n   results: {out}/{self.name}.{{csv,json,md}}", flush=True)
        return 0 if all(c["passed"] for c in self.checks) else 1


def max_abs_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Largest |a − b| over all tensors; inf if keys, shapes or integer values differ."""
    if a.keys() != b.keys():
        return float("inf")
    worst = 0.0
    for key, t in a.items():
        u = b[key]
        if t.shape != u.shape or t.dtype != u.dtype:
            return float("inf")
        if not t.is_floating_point():
            if not torch.equal(t, u):
                return float("inf")
            continue
        worst = max(worst, float((t - u).abs_().max()) if t.numel() else 0.0)
    return worst


def _md_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    for r in rows[1:]:
        cols += [c for c in r if c not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return f"{value:.2e}"
    return str(value)


def fmt_ratio(x: float) -> str:
    return f"{x:.1f}×" if x == x else "–"
