"""G2. DCP averaging on W ranks (peak RSS, bytes read and time per rank) and G3, a cost model on paper.

G2 writes k torch.distributed.checkpoint (DCP) directories ``step-{N}/`` with ``dcp.save`` in one process, as
an FSDP2 / torchtitan stack lays them out: the model under ``model.`` (a RoBERTa-base-shaped fp32 encoder,
125M parameters, 0.50 GB: the paper's masked-LM model) and Adam's two moments under ``optimizer.`` (so a
checkpoint is 1.5 GB, like the paper's 1.57 GB files, and an averager that reads only the model reads a third
of it). Then, interleaved, with the page cache ``cold`` and ``warm``:

- ``single``: ``python -m lawa_utils average --dir RUN --end N --k K --out OUT`` (one process, no torchrun);
- ``W=1``, ``W=2``: the same CLI under ``torchrun --nproc-per-node W`` (rendezvous on 127.0.0.1, a free port),
  each rank in a gloo process group (``python -m benchmarks.dcp_ranks rank-main average ...``).

Per rank: peak RSS (the kernel's ``VmHWM`` of each worker, read from /proc every 10 ms: exact, since it only
grows), bytes read from the disk (``read_bytes`` of /proc/PID/io) and the wall time of the whole command.
Correctness: every output is loaded with ``dcp.load`` and compared with the fp64 mean of the k model states
(≤ 1e-6 absolute at these magnitudes), and every W's output with the single-process one (bit for bit).

G3 is arithmetic, no run: bytes read per rank and time at a stated filesystem bandwidth, for the paper's RoBERTa
trajectory (200 × 1.57 GB) and a 70B-parameter run checkpointed 50 times, on 64 ranks (:func:`cost_model`).

    python -m benchmarks.dcp_ranks            # ≈5 min on 2 busy cores; 6 GB in /tmp
    python -m benchmarks.dcp_ranks --quick    # tiny sizes, warm, one repeat: does it run?
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import common, merge, synthetic

NAME = "dcp_ranks"
TITLE = "G2. DCP averaging on W ranks: peak RSS and bytes read per rank"
STEP = 1000


# --------------------------------------------------------------------------------------------------
# The synthetic DCP run
# --------------------------------------------------------------------------------------------------


def write_dcp_run(root: Path, layout: synthetic.Layout, k: int, seed: int) -> tuple[list[Path], dict[str, Any]]:
    """``root/step-{STEP·i}/`` for i = 1..k (model + Adam moments + step), and the fp64 mean of the models."""
    import torch.distributed.checkpoint as dcp

    gen = torch.Generator().manual_seed(seed)
    base = synthetic.center(layout, gen)
    total: dict[str, torch.Tensor] = {}
    dirs = []
    for i in range(1, k + 1):
        model = synthetic.snapshot(layout, base, step=STEP * i, gen=gen)
        moments = {name: {"exp_avg": torch.randn(t.shape, generator=gen).mul_(1e-4),
                          "exp_avg_sq": torch.randn(t.shape, generator=gen).abs_().mul_(1e-7)}
                   for name, t in model.items()}
        state = {"model": model, "optimizer": {"state": moments}, "step": STEP * i}
        d = root / f"step-{STEP * i}"
        with _quiet():
            dcp.save(state, checkpoint_id=str(d))
        for name, t in model.items():
            total[name] = total[name].add_(t.to(torch.float64)) if name in total else t.to(torch.float64)
        dirs.append(d)
        del state, moments, model
    return dirs, {name: t.div_(k) for name, t in total.items()}


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        yield


def load_dcp_model(directory: Path, layout: synthetic.Layout) -> dict[str, torch.Tensor]:
    """The ``model.`` subtree of a DCP directory, read with DCP's own ``dcp.load`` (no lawa code involved)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    names = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    model = {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in layout.items()
             if f"model.{name}" in names}
    with _quiet():
        dcp.load({"model": model}, checkpoint_id=str(directory))
    return model


# --------------------------------------------------------------------------------------------------
# Running one averaging command and watching its ranks
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def _status(pid: int) -> tuple[int, int]:
    """(VmHWM, read_bytes) of a live process in bytes; (0, 0) once it is gone."""
    hwm = read = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                read = int(line.split()[1])
    return hwm, read


def _rank_of(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"RANK="):
                return int(item[5:])
    return None


def command(variant: str, run: Path, end: int, k: int, out: Path) -> list[str]:
    flags = ["average", "--dir", str(run), "--end", str(end), "--k", str(k), "--out", str(out)]
    if variant == "single":
        return [sys.executable, "-m", "lawa_utils", *flags]
    world = int(variant.removeprefix("W="))
    # Each rank runs lawa_utils' CLI in a gloo group (rank_main): `-m lawa_utils` under torchrun does not join
    # a process group itself, so every rank would average alone.
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--nnodes=1",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", "--max-restarts=0",
            "-m", "benchmarks.dcp_ranks", "rank-main", *flags]


def rank_main(argv: Sequence[str]) -> int:
    """One torchrun worker: join the gloo group torchrun set up (127.0.0.1), then run ``lawa_utils`` ``argv``."""
    import datetime

    import torch.distributed as dist

    import lawa_utils

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    try:
        return lawa_utils.main(list(argv))
    finally:
        dist.destroy_process_group()


def run_ranks(cmd: list[str], threads: int, timeout: float = 900.0) -> dict[str, Any]:
    """Run ``cmd``; per rank (the processes with a RANK variable; the command itself for a single process)
    the peak RSS and bytes read, and the wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}
    seen: dict[int, tuple[int, int, int | None]] = {}  # pid -> (VmHWM, read_bytes, rank)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=common.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            pids = [proc.pid]
            for p in list(pids):
                pids += _children(p)
            for p in pids:
                hwm, read = _status(p)
                if hwm:
                    rank = seen[p][2] if p in seen else _rank_of(p)
                    seen[p] = (max(hwm, seen.get(p, (0,))[0]), max(read, seen.get(p, (0, 0))[1]), rank)
            done.wait(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    if proc.returncode != 0:
        said = merge.error_lines(stderr.decode(errors="replace"))
        raise RuntimeError(f"{' '.join(cmd[:6])} … exited {proc.returncode}: {said}")
    ranks = {rank: (hwm, read) for hwm, read, rank in seen.values() if rank is not None}
    if not ranks:  # a plain process: the command itself is rank 0
        hwm, read, _ = seen.get(proc.pid, (0, 0, None))
        ranks = {0: (hwm, read)}
    return {"wall_seconds": wall, "ranks": dict(sorted(ranks.items()))}


# --------------------------------------------------------------------------------------------------
# G3: the cost model
# --------------------------------------------------------------------------------------------------


def cost_model(*, ranks: int = 64, fs_gbps: float = 32.0, reader_gbps: float = 2.0, k: int = 6,
               k_max: int = 10) -> list[dict[str, Any]]:
    """Bytes read per rank and read time, on paper.

    >>> rows = cost_model(ranks=64)
    >>> rows[0]["scenario"]
    'RoBERTa (paper): 200 × 1.57 GB'

    Each rank reads at ``min(reader_gbps, fs_gbps / W)`` (a parallel filesystem of ``fs_gbps`` shared by
    the W readers, each capped at ``reader_gbps``). Averagers read only the model subtree: a third of a file
    holding Adam's two moments beside an fp32 model. Strategies:

    - *one average* (k checkpoints, the DCP merge): every rank reads 1/W of each of the k models and holds its
      1/W of the output plus one tensor being read;
    - *sweep by end blocks* (the distributed sweep): each rank takes ⌈N/W⌉ contiguous end positions and reads
      those checkpoints plus the ``k_max − 1`` before its first end, whole models;
    - *sweep by tensor shares* (every rank 1/W of every tensor, one pass over the trajectory): each checkpoint
      read once in total, N/W models' worth per rank; every window of every k then costs no further reads.

    Sweeps hold the last ``k_max`` checkpoints (their share) and a running sum: ``(k_max + 1)`` models per rank
    by end blocks, ``(k_max + 1) / W`` by tensor shares.
    """
    scenarios = [
        # name, checkpoints, file GB, model GB (fp32 weights), largest tensor GB
        ("RoBERTa (paper): 200 × 1.57 GB", 200, 1.57, 125e6 * 4 / 1e9, 50265 * 768 * 4 / 1e9),
        ("70B parameters, checkpointed 50 times", 50, 70e9 * 12 / 1e9, 70e9 * 4 / 1e9, 128256 * 8192 * 4 / 1e9),
    ]
    rows = []
    for name, n, file_gb, model_gb, largest_gb in scenarios:
        for w in (1, ranks):
            bw = min(reader_gbps, fs_gbps / w)
            ends_per_rank = math.ceil(n / w)
            strategies = [  # (name, GB read per rank, GB held per rank)
                (f"one average, k = {k}", k * model_gb / w, model_gb / w + largest_gb),
                (f"sweep by end blocks, k ≤ {k_max}", min(n, ends_per_rank + k_max - 1) * model_gb,
                 (k_max + 1) * model_gb),
                ("sweep by tensor shares", n * model_gb / w, (k_max + 1) * model_gb / w),
            ]
            for strategy, per_rank_gb, memory_gb in strategies:
                rows.append({
                    "scenario": name, "W": w, "strategy": strategy,
                    "model GB / file GB": f"{model_gb:.3g} / {file_gb:.3g}",
                    "read per rank GB": per_rank_gb, "read in total GB": per_rank_gb * w,
                    "GB/s per rank": bw, "read time s": per_rank_gb / bw,
                    "memory per rank GB": memory_gb,
                })
    return rows


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rank-main"]:
        return rank_main(argv[1:])
    p = common.parser(__doc__.split("\n\n")[0], repeats=2)
    p.add_argument("--k", type=int, default=4, help="checkpoints averaged")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="torchrun --nproc-per-node values")
    p.add_argument("--vocab", type=int, default=50265)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--cost-only", action="store_true", help="only G3's table, no runs")
    args = common.parse(p, argv)
    if args.quick:
        args.k, args.vocab, args.dim, args.ffn, args.layers, args.repeats = 3, 100, 16, 32, 1, 1
    layout, _ = synthetic.roberta_layout(args.vocab, args.dim, args.ffn, args.layers)
    model_bytes = synthetic.nbytes(layout)
    largest = max(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())
    variants = ["single", *(f"W={w}" for w in args.worlds)]
    conditions = ["warm"] if args.quick else ["cold", "warm"]
    report = common.Report(NAME, TITLE, args, {
        "k": args.k, "params": synthetic.numel(layout), "model_mb": round(model_bytes / 1e6, 1),
        "largest_tensor_mb": round(largest / 1e6, 1), "worlds": args.worlds, "vocab": args.vocab, "dim": args.dim,
        "ffn": args.ffn, "layers": args.layers,
    })
    report.tables["G3. Cost model on paper (no run): bytes read per rank and read time"] = cost_model()
    report.note("G3: each rank reads at min(2 GB/s, 32 GB/s ÷ W): a 32 GB/s parallel filesystem shared by the W "
                "readers, one reader capped at 2 GB/s. Models are fp32; the 70B files hold Adam's moments beside "
                "them (12 bytes per parameter); its largest tensor is a 128256 × 8192 embedding (4.2 GB).")
    if args.cost_only:
        return report.finish()
    common.free_disk_or_exit(Path("/tmp"), 3 * model_bytes * args.k * 2, "use a smaller --vocab/--dim or --k")
    with common.scratch_dir(NAME) as tmp:
        run = tmp / "run"
        dirs, expected = write_dcp_run(run, layout, args.k, args.seed)
        files = sorted(f for d in dirs for f in d.iterdir())
        report.config["checkpoint_mb"] = round(sum(f.stat().st_size for f in files) / len(dirs) / 1e6, 1)
        reference: dict[str, torch.Tensor] | None = None
        for r in range(args.repeats):
            for condition in conditions:
                for variant in common.interleaved(variants, r):
                    out = tmp / f"out-{variant.replace('=', '')}"
                    shutil.rmtree(out, ignore_errors=True)
                    achieved = common.set_cache(condition, files, report)
                    if achieved == "cold":  # re-cache Python and torch, not the checkpoints
                        run_ranks([sys.executable, "-c", "import torch, torch.distributed.run, lawa_utils"], 1)
                    try:
                        res = run_ranks(command(variant, run, STEP * args.k, args.k, out), args.threads)
                    except RuntimeError as e:
                        report.check(f"{variant}: runs ({achieved}, repeat {r})", str(e)[-600:], "exit 0", False)
                        continue
                    report.measure(variant, achieved, r, "wall_seconds", res["wall_seconds"], "seconds")
                    for rank, (hwm, read) in res["ranks"].items():
                        report.measure(variant, achieved, r, f"rank{rank}_peak_rss_mb", hwm / 1e6, "mb")
                        report.measure(variant, achieved, r, f"rank{rank}_read_mb", read / 1e6, "mb")
                    got = load_dcp_model(out, layout)
                    report.measure(variant, achieved, r, "max_abs_diff_vs_fp64",
                                   common.max_abs_diff(got, {n: t.to(torch.float32) for n, t in expected.items()}), "")
                    if variant == "single" and reference is None:
                        reference = got
                    if reference is not None:
                        report.measure(variant, achieved, r, "max_abs_diff_vs_single",
                                       common.max_abs_diff(got, reference), "")
                    shutil.rmtree(out, ignore_errors=True)
                    print(f"   r{r} {achieved} {variant}: {res['wall_seconds']:.1f} s, per rank (peak RSS MB, read MB) "
                          + ", ".join(f"{k}: ({h / 1e6:.0f}, {b / 1e6:.0f})" for k, (h, b) in res["ranks"].items()),
                          flush=True)
        floor = run_ranks([sys.executable, "-c", "import torch, torch.distributed, lawa_utils"], args.threads)
        report.measure("import-only", "warm", 0, "rank0_peak_rss_mb", floor["ranks"][0][0] / 1e6, "mb")
    summarize(report, variants, conditions, args.worlds, model_bytes, largest)
    return report.finish()


def summarize(report: common.Report, variants: Sequence[str], conditions: Sequence[str], worlds: Sequence[int],
              model_bytes: int, largest: int) -> None:
    med = lambda v, m, c=None: common.median(report.values(v, m, c))  # noqa: E731
    floor = med("import-only", "rank0_peak_rss_mb")
    for c in conditions:
        for v in variants:
            w = 1 if v == "single" else int(v.removeprefix("W="))
            rss = [med(v, f"rank{i}_peak_rss_mb", c) for i in range(w)]
            read = [med(v, f"rank{i}_read_mb", c) for i in range(w)]
            report.summary.append({
                "variant": v, "cache": c, "wall s (median)": med(v, "wall_seconds", c),
                "peak RSS per rank MB": " / ".join(f"{x:.0f}" for x in rss),
                "peak − floor per rank MB": " / ".join(f"{x - floor:.0f}" for x in rss),
                "model/W + largest tensor MB": (model_bytes / w + largest) / 1e6,
                "read per rank MB": " / ".join(f"{x:.0f}" for x in read),
                "n": len(report.values(v, "wall_seconds", c)),
            })
    for w in worlds:
        v = f"W={w}"
        for c in conditions:
            worst = max(med(v, f"rank{i}_peak_rss_mb", c) for i in range(w)) - floor
            bound = (model_bytes / w + largest) / 1e6
            report.goal(f"{v}: peak RSS per rank − floor ≈ model/W + one tensor ({c})", f"{worst:.0f} MB",
                        f"≤ {1.25 * bound:.0f} MB (1.25 × {bound:.0f})", worst <= 1.25 * bound)
    for v in variants:
        diffs = report.values(v, "max_abs_diff_vs_fp64")
        if diffs:
            report.check(f"{v}: output (dcp.load) equals the fp64 mean", max(diffs), "≤ 1e-6", max(diffs) <= 1e-6)
        same = report.values(v, "max_abs_diff_vs_single")
        if same and v != "single":
            report.check(f"{v}: output equals the single-process one", max(same), "0 (bit for bit)", max(same) == 0)
    report.note(f"Floor: peak RSS of `python -c 'import torch, torch.distributed, lawa_utils'` = {floor:.0f} MB; "
                "each rank pays it. Peak RSS per rank is the kernel's VmHWM (anonymous + file-backed).")


if __name__ == "__main__":
    sys.exit(main())
