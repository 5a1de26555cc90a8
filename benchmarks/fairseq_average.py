"""B. Averaging fairseq-format checkpoints: ``python -m lawa_utils average`` vs loading whole files.

Writes k=10 synthetic fairseq checkpoints of a ≈30M-parameter RoBERTa-shaped encoder (vocab 32000, dim 512,
ffn 2048, 4 layers) with Adam state: keys ``args`` (argparse.Namespace), ``cfg`` (dict), ``model``,
``criterion``, ``optimizer_history``, ``task_state``, ``extra_state``, ``last_optimizer_state`` (``exp_avg``,
``exp_avg_sq``: so the model is a third of each ≈355 MB file, as in the published RoBERTa files). Then, each in
its own process under GNU ``time`` (wall time, CPU time, peak resident memory; the anonymous and file-backed
parts of the peak polled from /proc every 10 ms):

- ``ours``: ``python -m lawa_utils average --files … --out …`` (weights-only ``torch.load`` with mmap; only
  the model tensors are touched);
- ``load-all``: every file ``torch.load``-ed whole without mmap, then averaged (``benchmarks.baselines``);
- ``streaming``: whole files one at a time into a running sum, the first file kept as the output template
  (fairseq's ``scripts/average_checkpoints.py`` order of work);
- ``import-only``: ``python -c "import torch, lawa_utils"``, the floor every variant pays.

Page cache ``cold`` (dropped, then the Python/torch libraries re-cached by an import-only run so that only
the checkpoints are cold) and ``warm`` (every checkpoint cached). Every output is checked against the average.

    python -m benchmarks.fairseq_average            # ≈15 min at load 5–12 on 2 cores; 4 GB of /tmp
    python -m benchmarks.fairseq_average --quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import lawa_utils as lu
from benchmarks import baselines, common, synthetic

NAME = "fairseq_average"
TITLE = "B. Averaging k fairseq checkpoints (Adam state): ours vs whole-file loads"
VARIANTS = ["ours", "load-all", "streaming"]
GNU_TIME = shutil.which("time", path="/usr/bin:/bin") or "/usr/bin/time"  # the program, not the shell keyword


def write_fairseq_checkpoints(directory: Path, layout, k: int, seed: int) -> list[Path]:
    gen = torch.Generator().manual_seed(seed)
    base = synthetic.center(layout, gen)
    names = list(layout)
    paths = []
    for epoch in range(1, k + 1):
        updates = epoch * 1000
        exp_avg = synthetic.like(layout, names, gen, scale=1e-4)
        exp_avg_sq = [t.abs_() for t in synthetic.like(layout, names, gen, scale=1e-7)]
        ckpt = {
            "args": argparse.Namespace(arch="roberta_base", task="masked_lm", criterion="masked_lm", lr=[5e-4],
                                       adam_betas="(0.9,0.98)", max_update=125000, seed=1),
            "cfg": {
                "common": {"seed": 1, "fp16": False, "log_interval": 100},
                "model": {"_name": "roberta_base", "encoder_layers": 4, "encoder_embed_dim": 512},
                "optimization": {"lr": [5e-4], "max_update": 125000, "clip_norm": 0.0},
                "checkpoint": {"save_dir": "checkpoints", "keep_last_epochs": -1},
                "task": {"_name": "masked_lm", "tokens_per_sample": 512},
            },
            "model": synthetic.snapshot(layout, base, step=updates, gen=gen),
            "criterion": None,
            "optimizer_history": [
                {"criterion_name": "MaskedLmLoss", "optimizer_name": "FairseqAdam",
                 "lr_scheduler_state": {"best": 7.5 - 0.1 * epoch}, "num_updates": updates}
            ],
            "task_state": {},
            "extra_state": {
                "epoch": epoch + 1, "train_iterator": {"epoch": epoch + 1, "iterations_in_epoch": 0, "shuffle": True},
                "val_loss": 7.5 - 0.1 * epoch, "best": 7.5 - 0.1 * epoch, "metrics": {},
                "previous_training_time": 600.0 * epoch,
            },
            "last_optimizer_state": {
                "state": {i: {"step": updates, "exp_avg": m, "exp_avg_sq": v}
                          for i, (m, v) in enumerate(zip(exp_avg, exp_avg_sq, strict=True))},
                "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.01,
                                  "amsgrad": False, "params": list(range(len(names)))}],
            },
        }
        paths.append(directory / f"checkpoint{epoch}.pt")
        torch.save(ckpt, paths[-1])
    return paths


def _proc_rss(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of a running process in bytes; (0, 0) once it is gone."""
    anon = file = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith("RssFile:"):
                file = int(line.split()[1]) * 1024
    except OSError:
        pass
    return anon, file


def _child_of(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def run_child(cmd: list[str], threads: int) -> dict[str, float]:
    """Run ``cmd`` from the repository root with ``threads`` OpenMP threads, under GNU time: wall and CPU
    seconds, peak RSS, and polled peaks of its anonymous and file-backed parts.

    The peak comes from GNU time, not from our own ``wait4``: Python starts children with vfork, and Linux
    charges the parent's high-water RSS to a vforked child at exec, so ``ru_maxrss`` of a direct child is at
    least this (large) benchmark process's peak. GNU time's own fork copies only its small address space.
    """
    peaks = {"anon": 0, "file": 0}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        timed = [GNU_TIME, "-f", "%M %U %S", "-o", stats.name, *cmd]
        t0 = time.perf_counter()
        proc = subprocess.Popen(timed, cwd=common.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        done = threading.Event()

        def poll():
            child = None
            while not done.is_set():
                child = child or _child_of(proc.pid)
                if child:
                    anon, file = _proc_rss(child)
                    peaks["anon"], peaks["file"] = max(peaks["anon"], anon), max(peaks["file"], file)
                done.wait(0.01)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        stderr = proc.stderr.read().decode(errors="replace")
        proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        poller.join()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} … exited {proc.returncode}: {stderr.strip()[-2000:]}")
        max_kib, user, system = stats.read().split()[-3:]
    return {
        "wall_seconds": wall,
        "cpu_seconds": float(user) + float(system),
        "peak_rss_mb": int(max_kib) * 1024 / 1e6,  # GNU time reports KiB
        "peak_rss_anon_mb": peaks["anon"] / 1e6,
        "peak_rss_file_mb": peaks["file"] / 1e6,
    }


def command(variant: str, files: list[Path], out: Path, patched: Path | None) -> list[str]:
    py = sys.executable
    if variant == "ours":
        return [py, "-m", "lawa_utils", "average", "--files", *map(str, files), "--out", str(out)]
    if variant == "patched":
        return [py, str(patched), "average", "--files", *map(str, files), "--out", str(out)]
    if variant == "import-only":
        return [py, "-c", "import torch, lawa_utils"]
    return [py, "-m", "benchmarks.baselines", variant, "--files", *map(str, files), "--out", str(out)]


def check_output(out: Path, expected: dict[str, torch.Tensor], keep_keys: bool) -> tuple[float, bool]:
    """(max |model − expected|, whether the fairseq entries besides the model were kept)."""
    obj = lu.load_checkpoint(out)
    kept = all(key in obj for key in ("args", "cfg", "extra_state", "last_optimizer_state"))
    diff = common.max_abs_diff(obj["model"], expected)
    del obj
    return diff, kept or not keep_keys


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], repeats=5)
    p.add_argument("--k", type=int, default=10, help="checkpoints averaged")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--patched", type=Path, help="also time `average` from this copy of lawa_utils.py")
    args = common.parse(p, argv)
    if args.quick:
        args.k, args.vocab, args.dim, args.ffn, args.layers, args.repeats = 3, 100, 16, 32, 1, 1
    layout, _ = synthetic.roberta_layout(args.vocab, args.dim, args.ffn, args.layers)
    model_bytes = synthetic.nbytes(layout)
    conditions = ["warm"] if args.quick else ["cold", "warm"]
    # --quick leaves out streaming (tests/test_benchmarks.py runs it in-process): one process fewer to start.
    variants = [v for v in VARIANTS if not (args.quick and v == "streaming")] + (["patched"] if args.patched else [])
    report = common.Report(NAME, TITLE, args, {
        "k": args.k, "params": synthetic.numel(layout), "model_mb": round(model_bytes / 1e6, 1),
        "file_mb": round(3 * model_bytes / 1e6, 1), "vocab": args.vocab, "dim": args.dim, "ffn": args.ffn,
        "layers": args.layers,
    })
    common.free_disk_or_exit(Path("/tmp"), 4 * model_bytes * args.k, "use smaller --vocab/--dim or --k")
    with common.scratch_dir(NAME) as tmp:
        files = write_fairseq_checkpoints(tmp, layout, args.k, args.seed)
        report.config["file_mb"] = round(files[0].stat().st_size / 1e6, 1)
        expected = baselines.mean_of(lu.load_checkpoint(f)["model"] for f in files)
        for r in range(args.repeats):
            for condition in conditions:
                for variant in common.interleaved(variants, r):
                    out = tmp / f"out-{variant}.pt"
                    achieved = common.set_cache(condition, files, report)
                    if achieved == "cold":
                        # A drop also evicts Python and torch: re-cache them so that only the checkpoints are cold.
                        run_child(command("import-only", files, out, args.patched), args.threads)
                    if variant == variants[0]:  # the floor every variant pays: start Python, import torch
                        floor = run_child(command("import-only", files, out, args.patched), args.threads)
                        for metric, value in floor.items():
                            report.measure("import-only", achieved, r, metric, value, metric.rsplit("_", 1)[-1])
                    cached = common.cached_fraction(files)
                    res = run_child(command(variant, files, out, args.patched), args.threads)
                    for metric, value in res.items():
                        report.measure(variant, achieved, r, metric, value, metric.rsplit("_", 1)[-1])
                    if cached is not None:
                        report.measure(variant, achieved, r, "cached_fraction_at_start", cached, "")
                    diff, kept = check_output(out, expected, keep_keys=True)
                    report.measure(variant, achieved, r, "max_abs_diff", diff, "")
                    report.measure(variant, achieved, r, "kept_fairseq_keys", float(kept), "")
                    out.unlink()
                    print(f"   r{r} {achieved} {variant}: {res['wall_seconds']:.2f} s, peak RSS "
                          f"{res['peak_rss_mb']:.0f} MB (anon {res['peak_rss_anon_mb']:.0f}, file "
                          f"{res['peak_rss_file_mb']:.0f}), page cache {cached}", flush=True)
    summarize(report, variants, conditions)
    return report.finish()


def summarize(report, variants, conditions) -> None:
    med = lambda v, m, c: common.median(report.values(v, m, c))  # noqa: E731
    for c in conditions:
        base_wall, base_rss = med("load-all", "wall_seconds", c), med("load-all", "peak_rss_mb", c)
        floor = med("import-only", "wall_seconds", c)
        for v in [*variants, "import-only"]:
            wall, rss = med(v, "wall_seconds", c), med(v, "peak_rss_mb", c)
            report.summary.append({
                "variant": v, "cache": c, "wall s (median)": wall, "wall − import s": wall - floor,
                "CPU s": med(v, "cpu_seconds", c), "peak RSS MB": rss,
                "anon / file-backed MB": f"{med(v, 'peak_rss_anon_mb', c):.0f} / {med(v, 'peak_rss_file_mb', c):.0f}",
                "n": len(report.values(v, "wall_seconds", c)),
                "speed-up vs load-all": common.fmt_ratio(base_wall / wall),
                "same, net of import": common.fmt_ratio((base_wall - floor) / (wall - floor)) if v != "import-only"
                else "–",
                "RSS reduction vs load-all": common.fmt_ratio(base_rss / rss),
            })
        for v in [x for x in ("ours", "patched") if x in variants]:
            label = "ours" if v == "ours" else "patched lawa_utils (proposal)"
            speed = base_wall / med(v, "wall_seconds", c)
            net = (base_wall - floor) / (med(v, "wall_seconds", c) - floor)
            memory = base_rss / med(v, "peak_rss_mb", c)
            report.goal(f"{label}: ≥2× faster than load-all ({c})",
                        f"{common.fmt_ratio(speed)} ({common.fmt_ratio(net)} net of import)", "≥ 2×", speed >= 2)
            report.goal(f"{label}: ≥3× lower peak RSS than load-all ({c})", common.fmt_ratio(memory), "≥ 3×",
                        memory >= 3)
    for v in variants:
        diffs = report.values(v, "max_abs_diff")
        report.check(f"{v}: output model equals the average (every run)", max(diffs), "≤ 1e-6", max(diffs) <= 1e-6)
        kept = min(report.values(v, "kept_fairseq_keys"))
        report.check(f"{v}: output keeps args/cfg/extra_state/last_optimizer_state", bool(kept), "True", kept == 1.0)
    report.note(
        "Wall times include starting Python and importing torch (the import-only row, the floor of every variant); "
        "'net of import' subtracts it. Baselines write their output with the same tmp + fsync + rename as lawa_utils."
    )
    report.note(
        "Peak RSS is GNU time's %M for the averaging process itself. It counts file-backed pages: the Python/torch "
        "libraries (≈0.46 GB) and the memory-mapped checkpoint pages the process touched."
    )


if __name__ == "__main__":
    sys.exit(main())
