"""E. Where the slowest job of ``reproduce_all.sh`` spends its time: the imagenet/ trainer and sweep, profiled.

Runs ``imagenet/main.py`` at the embedded run's sizes (resnet18 at 28 px, 8192 Fashion-MNIST images, batch 128,
2000 val images; ``--epochs`` epochs of its 12, one thread as in reproduce_all.sh), then
``imagenet/evaluate_lawa.py`` over that trajectory with the embedded sweep's settings, each in its own process
under ``python -m cProfile``. The profiles are split by what the code does: set-up (imports, data, model),
forward, backward, optimizer step and data loading inside the training loop, evaluation, checkpoint writing;
for the sweep, checkpoint reads, averaging, BatchNorm recompute, evaluation and result writing. Times are
cumulative seconds of the named functions as cProfile measured them (its overhead is small here: every call
named below runs whole torch kernels).

    python -m benchmarks.profile_imagenet             # ≈3 min
    python -m benchmarks.profile_imagenet --quick
"""

from __future__ import annotations

import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

NAME = "profile_imagenet"
TITLE = "E. Profile of the slowest job: imagenet/ trainer and sweep (embedded sizes, 1 thread)"
IMAGENET = common.REPO / "imagenet"


def functions(stats: pstats.Stats) -> dict:
    """(file, line, name) → (primitive calls, calls, own seconds, cumulative seconds, callers)."""
    return stats.stats  # type: ignore[attr-defined]


def find(stats: pstats.Stats, file_suffix: str, name: str) -> tuple:
    keys = [key for key in functions(stats) if key[0].endswith(file_suffix) and key[2] == name]
    if len(keys) != 1:
        raise SystemExit(f"profile_imagenet: expected one {file_suffix}:{name} in the profile, found {len(keys)}")
    return keys[0]


def cumulative(stats: pstats.Stats, key: tuple) -> float:
    return functions(stats)[key][3]


def callees(stats: pstats.Stats, caller: tuple) -> dict[tuple, float]:
    """Cumulative seconds of every function when called directly from ``caller``."""
    out = {}
    for key, (_, _, _, _, callers) in functions(stats).items():
        if caller in callers:
            out[key] = callers[caller][3]
    return out


def split(parts: dict[tuple, float], rules: list[tuple[str, callable]]) -> dict[str, float]:
    """Sum callee times into the first rule whose predicate matches (file, line, name); the rest is 'other'."""
    totals = {label: 0.0 for label, _ in rules}
    totals["other"] = 0.0
    for key, seconds in parts.items():
        label = next((label for label, match in rules if match(key)), "other")
        totals[label] += seconds
    return totals


def profiled(script: Path, argv: list[str], prof: Path, threads: int) -> float:
    """Run ``script argv`` under cProfile in a child process; its wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), str(script), *argv], check=True,
                   cwd=common.REPO, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def trainer_breakdown(stats: pstats.Stats, wall: float) -> dict[str, float]:
    main_py = "imagenet/main.py"
    run = cumulative(stats, find(stats, main_py, "train_or_evaluate"))
    epoch = find(stats, main_py, "train_one_epoch")
    loop = split(callees(stats, epoch), [
        ("forward", lambda k: k[2] == "_wrapped_call_impl"),
        ("backward", lambda k: k[0].endswith("torch/_tensor.py") and k[2] == "backward"),
        ("optimizer (zero_grad + step)", lambda k: "torch/optim/" in k[0] or k[2] == "zero_grad"),
        ("data loading", lambda k: "torch/utils/data/" in k[0] or k[2] == "to_device" or "method 'to'" in k[2]),
    ])
    loop["other"] += functions(stats)[epoch][2]  # the loop's own bookkeeping (metrics, progress lines)
    parts = {
        "set-up: imports": stats.total_tt - run,  # type: ignore[attr-defined]
        "set-up: data + model": cumulative(stats, find(stats, "imagenet/common.py", "build_datasets"))
        + cumulative(stats, find(stats, "imagenet/common.py", "build_model")),
        **{f"train: {label}": seconds for label, seconds in loop.items()},
        "val evaluation": cumulative(stats, find(stats, "imagenet/common.py", "evaluate")),
        "checkpoint + log": cumulative(stats, find(stats, main_py, "end_epoch")),
    }
    parts["rest (unprofiled: interpreter start, cProfile)"] = wall - sum(parts.values())
    return parts


def sweep_breakdown(stats: pstats.Stats, wall: float) -> dict[str, float]:
    sweep = cumulative(stats, find(stats, "imagenet/evaluate_lawa.py", "sweep"))
    reads = cumulative(stats, find(stats, "lawa_utils.py", "load_model_state"))
    cells = cumulative(stats, find(stats, "lawa_sweep.py", "_iter_cells"))
    parts = {
        "set-up: imports": stats.total_tt - sweep,  # type: ignore[attr-defined]
        "set-up: data + model": cumulative(stats, find(stats, "imagenet/common.py", "build_datasets"))
        + cumulative(stats, find(stats, "imagenet/common.py", "build_model")),
        "checkpoint reads": reads,
        "averaging (one-pass sweep)": cells - reads,
        "load_state_dict": cumulative(stats, find(stats, "torch/nn/modules/module.py", "load_state_dict")),
        "BatchNorm recompute": cumulative(stats, find(stats, "lawa_utils.py", "recompute_bn")),
        "evaluation (val + train sample)": cumulative(stats, find(stats, "imagenet/common.py", "evaluate")),
        "writing results": cumulative(stats, find(stats, "lawa_tidy.py", "append_rows")),
    }
    parts["rest (unprofiled: interpreter start, cProfile, summary)"] = wall - sum(parts.values())
    return parts


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], repeats=1)
    p.add_argument("--epochs", type=int, default=2, help="training epochs profiled (the embedded run has 12)")
    p.add_argument("--train-subset", type=int, default=8192, help="training images (the embedded run's size)")
    args = common.parse(p, argv)
    if args.quick:
        args.epochs, args.train_subset = 2, 256
    val_subset = 200 if args.quick else 2000
    report = common.Report(NAME, TITLE, args, {
        "arch": "resnet18", "image_size": 28, "train_subset": args.train_subset, "val_subset": val_subset,
        "epochs": args.epochs, "batch": 128, "sweep": "k=2 at every end epoch, BN 16 batches, 1000 train images",
        "threads": args.threads,
    })
    with tempfile.TemporaryDirectory(prefix="lawa-profile-") as tmp:
        tmp = Path(tmp)
        train_argv = ["fashion-mnist", "-a", "resnet18", "--epochs", str(args.epochs), "-b", "128", "--lr", "0.4",
                      "--wd", "5e-4", "-j", "0", "--seed", str(args.seed), "--train-subset", str(args.train_subset),
                      "--val-subset", str(val_subset), "--eval-batch-size", "1000", "--save-dir", str(tmp / "run")]
        sweep_argv = ["fashion-mnist", "--ckpt-dir", str(tmp / "run"), "--ks", "2", "--bn-batches", "16", "-j", "0",
                      "--train-eval-subset", "1000", "--eval-batch-size", "1000", "--out", str(tmp / "results.csv")]
        jobs = {"trainer": (IMAGENET / "main.py", train_argv, trainer_breakdown),
                "sweep": (IMAGENET / "evaluate_lawa.py", sweep_argv, sweep_breakdown)}
        for job, (script, job_argv, breakdown) in jobs.items():
            prof = tmp / f"{job}.prof"
            wall = profiled(script, job_argv, prof, args.threads)
            parts = breakdown(pstats.Stats(str(prof)), wall)
            report.measure(job, "warm", 0, "wall_seconds", wall, "s")
            for part, seconds in parts.items():
                report.measure(job, part, 0, "seconds", seconds, "s")
                report.summary.append({"job": job, "part": part, "seconds": round(seconds, 2),
                                       "% of job": f"{100 * seconds / wall:.1f}%"})
            report.summary.append({"job": job, "part": "**wall (measured outside)**", "seconds": round(wall, 2),
                                   "% of job": "100%"})
            named = sum(seconds for part, seconds in parts.items() if not part.startswith("rest"))
            report.check(f"{job}: the named parts fit in the measured wall time", round(named / wall, 3),
                         "≤ 1.0", named <= wall)
        checkpoints = sorted((tmp / "run").glob("checkpoint*.pt"))
        report.check("trainer wrote one checkpoint per epoch", len(checkpoints), f"= {args.epochs}",
                     len(checkpoints) == args.epochs)
    trainer = {r["condition"]: r["value"] for r in report.rows if r["variant"] == "trainer" and r["unit"] == "s"
               and r["metric"] == "seconds"}
    step = sum(v for k, v in trainer.items() if k in ("train: forward", "train: backward",
                                                        "train: optimizer (zero_grad + step)"))
    train = sum(v for k, v in trainer.items() if k.startswith("train: "))
    report.goal("trainer: model compute (forward + backward + step) share of the training loop",
                f"{100 * step / train:.0f}%", "≥ 85% (nothing but compute left to cut)", step >= 0.85 * train)
    report.note("cProfile attributes each function's time to its direct caller: 'forward' is the model's "
                "__call__ from the training loop, 'data loading' the DataLoader's __next__ and the device copy.")
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
