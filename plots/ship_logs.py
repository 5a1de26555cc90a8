"""Copy the small text logs of one ``reproduce_all.sh`` output into a folder of reference logs (docs/results).

    $ python -m plots.ship_logs --from out --to /tmp/logs          # then: make_figures.py --from /tmp/logs

Every ``log.csv``, ``results.csv`` and ``args.json`` below ``--from`` keeps its relative path (a masked-LM run's
``checkpoints/args.json`` lands beside its CSVs, where its trainer's log is); checkpoints, binarized data,
figures and console output stay behind. ``times.txt`` gets the wall and CPU seconds of every job from the
run's stamps (``.done-NAME``, ``.cpu-NAME``). The folder appears whole, by rename, and an existing one is
replaced only with ``--force``. Torch is not imported.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python plots/ship_logs.py` finds `plots`

from plots.tidy import TidyError, run_cli

__all__ = ["ship", "main"]

KEPT = ("log.csv", "results.csv", "args.json")
SKIPPED_DIRS = {"figures", "data-bin"}


def _times(out: Path) -> str:
    lines = ["# Seconds per job, from reproduce_all.sh's stamps: wall (.done-NAME) and CPU, user + sys (.cpu-NAME).",
             f"{'job':<32} {'wall s':>7} {'CPU s':>7}"]
    total = 0
    for done in sorted(out.glob(".done-*"), key=lambda p: p.stat().st_mtime):
        name = done.name[len(".done-"):]
        cpu_file = out / f".cpu-{name}"
        cpu = cpu_file.read_text().strip() if cpu_file.is_file() else "-"
        total += int(cpu) if cpu.isdigit() else 0
        lines.append(f"{name:<32} {done.read_text().strip():>7} {cpu:>7}")
    lines.append(f"{'CPU total':<32} {'':>7} {total:>7}")
    return "\n".join(lines) + "\n"


def ship(out: str | Path, to: str | Path, *, force: bool = False) -> list[Path]:
    """Copy the logs of the reproduce_all.sh output ``out`` into the new folder ``to``; returns the files written."""
    out, to = Path(out), Path(to)
    if not out.is_dir():
        raise TidyError(f"{out}: no such output folder of reproduce_all.sh")
    if to.exists() and not force:
        raise TidyError(f"{to} already exists; pass --force to replace it")
    found = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if path.name in KEPT and path.is_file() and not SKIPPED_DIRS & set(rel.parts[:-1]):
            parts = [p for p in rel.parts[:-1] if p != "checkpoints"] + [rel.parts[-1]]
            found.append((path, Path(*parts)))
    if not found:
        raise TidyError(f"{out}: no log.csv, results.csv or args.json below it")
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{to.name}.", dir=to.parent))
    try:
        for src, rel in found:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        (tmp / "times.txt").write_text(_times(out))
        if to.exists():
            old = to.with_name(f".{to.name}.old")
            to.rename(old)
            tmp.rename(to)
            shutil.rmtree(old)
        else:
            tmp.rename(to)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [to / rel for _, rel in found] + [to / "times.txt"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ship_logs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="out", required=True, metavar="OUT", help="an output folder of reproduce_all.sh")
    parser.add_argument("--to", required=True, metavar="DIR", help="the new folder of reference logs")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")
    args = parser.parse_args(argv)
    files = ship(args.out, args.to, force=args.force)
    print(f"wrote {len(files)} files to {args.to}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "ship_logs.py"))
