"""A. Trajectory sweep: ``lawa_utils.iter_window_averages`` (one pass) vs reloading every window (the seed).

Writes E synthetic pytorch/examples checkpoints of ResNet-50 size (``{'epoch', 'arch', 'state_dict'`` with
``module.`` keys, ``'optimizer'``: SGD momentum buffers, ``'scheduler'}``; ≈205 MB each, ≈6 GB for 30) to a
temporary directory under /tmp, then produces every (E, k) window average for k ∈ {2, 4, …, 16}:

- ``one-pass``: ``lawa_utils.iter_window_averages`` (mmap, model tensors only, one prefix sum per end epoch),
  timed with the page cache dropped (``cold``) and with every file cached (``warm``); reads are counted with
  its ``load=`` hook (goal: one per checkpoint).
- ``reload-per-cell``: the seed — for every cell, ``torch.load`` the k window files whole and average them.
  That is ≈1.4k whole-file loads per sweep, so by default it is timed on a random sample of cells per k
  (a fresh sample every repeat), warm (its best case), and the full sweep's time is extrapolated from the
  mean time per cell of each k; ``--baseline-all`` times every cell instead.

``--patched PATH`` adds ``patched warm``: the one-pass sweep of a modified copy of lawa_utils.py (a proposal).

Correctness: every cell the one-pass sweep yields is compared (outside the timers) with the seed's arithmetic
on the same weights held in memory; the timed baseline cells are compared with the same reference.

    python -m benchmarks.sweep                    # ≈6 min at load 4–5 on 2 cores; 6 GB of /tmp
    python -m benchmarks.sweep --model resnet18   # the same at 45% of the size
    python -m benchmarks.sweep --quick            # seconds; checks that it works
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch

import lawa_utils as lu
from benchmarks import baselines, common, synthetic

NAME = "sweep"
TITLE = "A. Trajectory sweep: one-pass vs reload-per-cell"


def write_trajectory(directory: Path, layout, param_names, epochs: int, arch: str, seed: int) -> dict[int, Path]:
    """``checkpoint{E}.pt`` for E = 1..epochs in pytorch/examples' format."""
    gen = torch.Generator().manual_seed(seed)
    base = synthetic.center(layout, gen)
    paths = {}
    for epoch in range(1, epochs + 1):
        state = synthetic.snapshot(layout, base, step=epoch * 5005, gen=gen)
        momentum = synthetic.like(layout, param_names, gen, scale=1e-3)
        ckpt = {
            "epoch": epoch,
            "arch": arch,
            "state_dict": {baselines.WRAPPER + k: v for k, v in state.items()},
            "best_acc1": 50.0 + epoch,
            "optimizer": {
                "state": {i: {"momentum_buffer": m} for i, m in enumerate(momentum)},
                "param_groups": [
                    {"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 1e-4, "nesterov": False,
                     "maximize": False, "foreach": None, "differentiable": False, "fused": None,
                     "params": list(range(len(momentum)))}
                ],
            },
            "scheduler": {"step_size": 30, "gamma": 0.1, "base_lrs": [0.1], "last_epoch": epoch, "_last_lr": [0.1]},
        }
        paths[epoch] = directory / f"checkpoint{epoch}.pt"
        torch.save(ckpt, paths[epoch])
    return paths


def all_cells(epochs: int, ks: list[int]) -> list[tuple[int, int]]:
    """Every (E, k) whose window E−k+1 … E lies inside 1 … epochs, in the sweep's order (E, then k)."""
    return [(e, k) for e in range(1, epochs + 1) for k in ks if e - k + 1 >= 1]


def run_one_pass(paths, ks, reference, patched=None) -> tuple[float, int, int, float]:
    """Time the whole sweep (only the generator's own work); returns (seconds, reads, cells, max |diff|)."""
    module = patched or lu
    reads = 0

    def counting_load(p):
        nonlocal reads
        reads += 1
        return module.load_model_state(p)

    it = module.iter_window_averages(paths, ks, load=counting_load)
    seconds, cells, worst = 0.0, 0, 0.0
    while True:
        t0 = time.perf_counter()
        item = next(it, None)
        seconds += time.perf_counter() - t0
        if item is None:
            return seconds, reads, cells, worst
        end, k, state = item
        cells += 1
        if reference is not None:  # untimed: the seed's arithmetic on the same weights, in memory
            expected = baselines.mean_of(reference[i] for i in lu.window(end, k))
            worst = max(worst, common.max_abs_diff(state, expected))
        del item, state


def run_reload(paths, cells, reference) -> tuple[dict[int, list[float]], int, float]:
    """Time the seed on ``cells``; returns ({k: [seconds per cell]}, whole-file loads, max |diff|)."""
    per_k: dict[int, list[float]] = {}
    loads, worst = 0, 0.0
    for end, k in cells:
        files = [paths[i] for i in lu.window(end, k)]
        t0 = time.perf_counter()
        state = baselines.seed_window_average(files)
        per_k.setdefault(k, []).append(time.perf_counter() - t0)
        loads += len(files)
        expected = baselines.mean_of(reference[i] for i in lu.window(end, k))
        worst = max(worst, common.max_abs_diff(state, expected))
        del state
    return per_k, loads, worst


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], repeats=3)
    p.add_argument("--model", default="resnet50", help="torchvision architecture whose shapes are used")
    p.add_argument("--epochs", type=int, default=30, help="checkpoints in the trajectory")
    p.add_argument("--ks", default="2,4,6,8,10,12,14,16", help="window sizes")
    p.add_argument("--no-optimizer", action="store_true", help="omit the SGD state (halves the disk needed)")
    p.add_argument("--baseline-per-k", type=int, default=3, help="reload-per-cell: cells timed per k and repeat")
    p.add_argument("--baseline-all", action="store_true", help="reload-per-cell: time every cell (slow)")
    p.add_argument("--patched", type=Path, help="also time iter_window_averages from this copy of lawa_utils.py")
    args = common.parse(p, argv)
    if args.quick:
        args.model, args.epochs, args.ks, args.repeats, args.baseline_all = "tiny", 6, "2,4", 1, True
    ks = sorted(int(k) for k in args.ks.split(","))
    layout, param_names = synthetic.tiny_cnn_layout() if args.model == "tiny" else synthetic.torchvision_layout(
        args.model
    )
    if args.no_optimizer:
        param_names = []
    model_bytes = synthetic.nbytes(layout)
    file_bytes = model_bytes + sum(synthetic.nbytes({n: layout[n]}) for n in param_names)
    cells = all_cells(args.epochs, ks)
    conditions = ["warm"] if args.quick else ["cold", "warm"]
    report = common.Report(NAME, TITLE, args, {
        "model": args.model, "floats_per_model": synthetic.numel(layout), "epochs": args.epochs, "ks": ks,
        "file_mb": round(file_bytes / 1e6, 1), "cells": len(cells), "baseline_all": args.baseline_all,
        "baseline_per_k": None if args.baseline_all else args.baseline_per_k,
    })
    patched = None
    if args.patched:
        import importlib.util

        spec = importlib.util.spec_from_file_location("lawa_utils_patched", args.patched)
        patched = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(patched)
    variants = [f"one-pass {c}" for c in conditions] + (["patched warm"] if patched else []) + ["reload-per-cell"]

    hint = "use --model resnet18, --no-optimizer or fewer --epochs"
    common.free_disk_or_exit(Path("/tmp"), file_bytes * args.epochs, hint)
    with common.scratch_dir(NAME) as tmp:
        t0 = time.perf_counter()
        paths = write_trajectory(tmp, layout, param_names, args.epochs, args.model, args.seed)
        print(f"   wrote {args.epochs} checkpoints of {file_bytes / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s")
        reference = {e: baselines.load_whole(f)["state_dict"] for e, f in paths.items()}
        files = list(paths.values())
        checked = False
        for r in range(args.repeats):
            for variant in common.interleaved(variants, r):
                if variant == "reload-per-cell":
                    rng = random.Random(args.seed * 1000 + r)
                    sample = cells if args.baseline_all else [
                        c for k in ks for c in rng.sample([c for c in cells if c[1] == k], args.baseline_per_k)
                    ]
                    common.set_cache("warm", files, report)
                    per_k, loads, worst = run_reload(paths, sample, reference)
                    estimate = sum(
                        sum(per_k[k]) / len(per_k[k]) * sum(1 for c in cells if c[1] == k) for k in per_k
                    )
                    report.measure(variant, "warm", r, "sweep_seconds_estimated", estimate, "s")
                    report.measure(variant, "warm", r, "cells_timed", len(sample), "cells")
                    report.measure(variant, "warm", r, "loads_timed", loads, "files")
                    report.measure(variant, "warm", r, "max_abs_diff", worst, "")
                    for k, secs in per_k.items():
                        report.measure(variant, "warm", r, f"seconds_per_cell_k{k}", sum(secs) / len(secs), "s")
                    print(f"   r{r} {variant}: ≈{estimate:.1f} s per sweep ({len(sample)} cells timed)", flush=True)
                    continue
                condition = variant.split()[-1]
                state = common.set_cache(condition, files, report)
                cached = common.cached_fraction(files)
                check_now = not checked and variant.startswith("one-pass")
                seconds, reads, n, worst = run_one_pass(
                    paths, ks, reference if check_now else None, patched if variant.startswith("patched") else None
                )
                report.measure(variant, state, r, "sweep_seconds", seconds, "s")
                report.measure(variant, state, r, "reads", reads, "files")
                report.measure(variant, state, r, "cells", n, "cells")
                if cached is not None:
                    report.measure(variant, state, r, "cached_fraction_at_start", cached, "")
                if check_now:
                    checked = True
                    report.check(f"{variant}: every cell equals the seed's average (max abs diff)", worst,
                                 "≤ 1e-6 over all cells", worst <= 1e-6)
                    report.check(f"{variant}: cells produced", n, f"= {len(cells)}", n == len(cells))
                print(f"   r{r} {variant}: {seconds:.2f} s, {reads} reads, page cache {cached}", flush=True)
        del reference
    summarize(report, args, cells, ks, file_bytes, model_bytes, variants)
    return report.finish()


def summarize(report, args, cells, ks, file_bytes, model_bytes, variants) -> None:
    full_loads = sum(k for _, k in cells)
    reload = report.values("reload-per-cell", "sweep_seconds_estimated")
    base = common.median(reload)
    ours = {v: report.values(v, "sweep_seconds") for v in variants if v != "reload-per-cell"}
    for v, secs in ours.items():
        reads = report.values(v, "reads")
        report.summary.append({
            "variant": v, "sweep s (median)": common.median(secs), "min–max": f"{min(secs):.3g}–{max(secs):.3g}",
            "n": len(secs), "reads/sweep": int(max(reads)), "GB read": reads[0] * model_bytes / 1e9,
            "speed-up vs reload": common.fmt_ratio(base / common.median(secs)),
        })
    report.summary.append({
        "variant": "reload-per-cell warm" + ("" if args.baseline_all else " (extrapolated)"),
        "sweep s (median)": base, "min–max": f"{min(reload):.3g}–{max(reload):.3g}", "n": len(reload),
        "reads/sweep": full_loads, "GB read": full_loads * file_bytes / 1e9, "speed-up vs reload": "1×",
    })
    for k in ks:
        report.extra[f"reload seconds per cell, k={k} (median over repeats)"] = common.median(
            report.values("reload-per-cell", f"seconds_per_cell_k{k}")
        )
    if "one-pass cold" in ours:
        cold = base / common.median(ours["one-pass cold"])
        report.goal("≥10× faster (one-pass cold vs reload warm)", common.fmt_ratio(cold), "≥ 10×", cold >= 10)
    warm = base / common.median(ours["one-pass warm"])
    report.goal("≥10× faster (both warm)", common.fmt_ratio(warm), "≥ 10×", warm >= 10)
    reads = int(max(report.values("one-pass warm", "reads")))
    report.goal("checkpoint reads per sweep", str(reads), f"= {args.epochs}", reads == args.epochs)
    report.check("one-pass reads every checkpoint once", reads, f"= {args.epochs}", reads == args.epochs)
    diffs = report.values("reload-per-cell", "max_abs_diff")
    report.check("timed reload-per-cell cells equal the in-memory reference", max(diffs), "≤ 1e-6", max(diffs) <= 1e-6)
    if not args.baseline_all:
        report.note(
            f"reload-per-cell is timed on {args.baseline_per_k} random cells per k each repeat (a fresh sample per "
            f"repeat) and extrapolated: Σ_k mean s/cell(k) × cells(k), {len(cells)} cells, {full_loads} whole-file "
            "loads per sweep. It ran warm (every file in the page cache), its best case."
        )
    report.note(
        "Times are in-process (the seed started one process per cell, ≈5 s of Python+torch import each here, "
        "not counted). one-pass time counts only the generator's work; the equality check between cells is untimed."
    )


if __name__ == "__main__":
    sys.exit(main())
