"""F. Averaging an HF run: ``lawa_utils average --dir`` vs mergekit's ``linear`` merge vs a load-everything loop.

Writes k Hugging Face Trainer checkpoints ``checkpoint-{step}/`` of a Llama-shaped model (``LlamaConfig`` with
TinyLlama's widths and 15 layers: 792M parameters, 1.58 GB in bf16) through ``save_pretrained`` itself, so the
four shards, ``model.safetensors.index.json``, ``config.json`` and ``generation_config.json`` are exactly what
transformers writes; each checkpoint is a seeded random draw around one "trained" model (N(0, 0.02) matrices,
norm scales ≈ 1). Then, each contender in its own process under GNU ``time``, in the same job, interleaved
(order reversed every other repeat), with the page cache ``cold`` (dropped; Python, torch and mergekit
re-cached by an import-only run so that only the checkpoints are cold) and ``warm`` (every input cached):

- ``ours``: ``python -m lawa_utils average --dir RUN --end STEP --k K --out OUT``;
- ``mergekit``: ``mergekit-yaml`` with ``merge_method: linear`` and weight 1 per checkpoint, from its own venv
  (``--mergekit-python``); its ``--out-shard-size`` is set to the input's shard size, so that it keeps no more
  than a shard in memory before writing, as ours does;
- ``load-all``: the loop people write: every shard of every checkpoint loaded (``safetensors.torch.load_file``),
  an fp32 sum per tensor, divided, written in the newest checkpoint's shards (``python -m benchmarks.merge
  load-all``).

Measured per run: wall and CPU seconds; peak RSS of the whole process tree (sampled every 20 ms from /proc,
with its anonymous and file-backed parts) and of its largest process (GNU time ``%M``); bytes read from the
disk (GNU time ``%I``, 512-byte blocks: the process and the children it waited for). The disk's sequential read
throughput is measured in the same job: one checkpoint's shards read cold with 16 MB reads.

Correctness: an fp64 oracle is computed once per data set (the fp64 mean of every tensor). Every output of
every run must hold the same tensors, and each element must be the bf16 value nearest that fp64 mean, or its
neighbour where both are within the rounding of an average computed to 1e-6 relative (a fp32 mean within
1e-6 of the oracle can round either way only there). The first output of each contender is also loaded with
``LlamaForCausalLM.from_pretrained``.

    python -m benchmarks.merge --data /big/disk/merge-data   # ≈12 min on 2 busy cores; 11 GB there, kept
    python -m benchmarks.merge --quick                       # tiny model, warm, one repeat: does it run?
    python -m benchmarks.merge load-all --dirs RUN/checkpoint-500 RUN/checkpoint-1000 --out OUT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import common

NAME = "merge"
TITLE = "F. Averaging an HF run: ours vs mergekit vs load-everything"
VARIANTS = ["ours", "mergekit", "load-all"]
GNU_TIME = shutil.which("time", path="/usr/bin:/bin") or "/usr/bin/time"  # the program, not the shell keyword
DEFAULT_MERGEKIT = Path("/work/mk-venv/bin/python")
STEP = 500  # HF Trainer save_steps of the synthetic run
SHARDS = 4
INDEX = "model.safetensors.index.json"
TOLERANCE = 2e-6  # |q − o| − |nearest − o| ≤ 2e-6·|o|: what a 1e-6-relative mean, rounded to bf16, can reach


# --------------------------------------------------------------------------------------------------
# The synthetic run
# --------------------------------------------------------------------------------------------------


def llama_config(args: argparse.Namespace):
    """A LlamaConfig of the benchmark's sizes (bf16, untied embeddings, grouped-query attention)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16",
    )


def _fill_base(model: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """The 'trained model' every checkpoint is drawn around: matrices N(0, 0.02), norm scales 1 + N(0, 0.02)."""
    base = {}
    for name, p in model.state_dict().items():
        t = torch.empty(p.shape, dtype=p.dtype)
        t.normal_(0.0, 0.02, generator=gen)
        if p.dim() == 1:
            t.add_(1.0)
        base[name] = t
    return base


def write_hf_run(root: Path, config, k: int, seed: int) -> list[Path]:
    """``root/checkpoint-{STEP·i}/`` for i = 1..k, written by ``save_pretrained`` in ``SHARDS`` shards.

    Each checkpoint directory is built under a temporary name and renamed, so a killed run leaves none half
    written; a complete data set is recorded in ``root/manifest.json`` and reused when it matches.
    """
    from transformers import LlamaForCausalLM

    manifest = {"config": config.to_dict(), "k": k, "seed": seed, "shards": SHARDS}
    manifest.pop("transformers_version", None)
    manifest["config"].pop("transformers_version", None)
    dirs = [root / f"checkpoint-{STEP * i}" for i in range(1, k + 1)]
    record = root / "manifest.json"
    if record.is_file() and json.loads(record.read_text()) == json.loads(json.dumps(manifest)):
        if all((d / INDEX).is_file() for d in dirs):
            return dirs
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    base = _fill_base(model, gen)
    total = sum(t.numel() * t.element_size() for t in base.values())
    shard_size = total // SHARDS + total // (8 * SHARDS)  # slack so that greedy packing gives SHARDS files
    state = model.state_dict()
    for i, d in enumerate(dirs, start=1):
        t0 = time.perf_counter()
        with torch.no_grad():
            for name, p in state.items():
                p.normal_(0.0, 0.002, generator=gen).add_(base[name])
        tmp = root / f".{d.name}.tmp"
        model.save_pretrained(tmp, max_shard_size=shard_size)
        trainer_state = {"global_step": STEP * i, "epoch": float(i), "log_history": [], "save_steps": STEP}
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        shards = sorted(tmp.glob("model-*.safetensors"))
        if len(shards) != SHARDS:
            raise RuntimeError(f"save_pretrained wrote {len(shards)} shards, not {SHARDS}: adjust the shard size")
        os.replace(tmp, d)
        print(f"   wrote {d} ({total / 1e9:.2f} GB, {time.perf_counter() - t0:.1f} s)", flush=True)
    os.sync()
    record.write_text(json.dumps(manifest, indent=1))
    return dirs


def weight_files(directory: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of an HF model directory (sharded with an index, or one file)."""
    index = directory / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: directory / name for key, name in weight_map.items()}
    from safetensors import safe_open

    single = directory / "model.safetensors"
    with safe_open(single, framework="pt") as f:
        return {key: single for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def input_files(dirs: Sequence[Path]) -> list[Path]:
    return sorted({p for d in dirs for p in weight_files(d).values()})


@contextlib.contextmanager
def tensor_source(directory: Path) -> Iterator[Any]:
    """``get(key) -> Tensor`` over an HF directory's safetensors files, each opened once."""
    from safetensors import safe_open

    files = weight_files(directory)
    with contextlib.ExitStack() as stack:
        handles = {p: stack.enter_context(safe_open(p, framework="pt")) for p in set(files.values())}
        yield lambda key: handles[files[key]].get_tensor(key), sorted(files)


# --------------------------------------------------------------------------------------------------
# The fp64 oracle and the check
# --------------------------------------------------------------------------------------------------


def build_oracle(dirs: Sequence[Path], dest: Path) -> Path:
    """For every tensor, the bf16 value nearest the fp64 mean of the k inputs (``nearest.safetensors``) and,
    where a second bf16 value is within ``TOLERANCE`` of the mean (the mean is that close to a midpoint), that
    value and its flat index (``alternatives.safetensors``). Reused when present."""
    from safetensors.torch import save_file

    if (dest / "nearest.safetensors").is_file() and (dest / "alternatives.safetensors").is_file():
        return dest
    t0 = time.perf_counter()
    nearest: dict[str, torch.Tensor] = {}
    alternatives: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        sources = [stack.enter_context(tensor_source(d)) for d in dirs]
        keys = sources[-1][1]
        for key in keys:
            mean = sum(get(key).to(torch.float64) for get, _ in sources) / len(sources)
            near, alt_idx, alt_val = _nearest_bf16(mean.flatten())
            nearest[key] = near.reshape(mean.shape)
            alternatives[key + ".index"] = alt_idx
            alternatives[key + ".value"] = alt_val
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(nearest, tmp / "nearest.safetensors")
    save_file(alternatives, tmp / "alternatives.safetensors")
    os.replace(tmp, dest)
    n_alt = sum(v.numel() for k, v in alternatives.items() if k.endswith(".index"))
    print(f"   fp64 oracle: {time.perf_counter() - t0:.0f} s, {n_alt} elements near a bf16 midpoint", flush=True)
    return dest


def _nearest_bf16(mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nearest bf16 values, flat indices where another bf16 value is also acceptable, those values)."""
    guess = mean.to(torch.float32).to(torch.bfloat16)  # within one bf16 step of the nearest
    up = torch.nextafter(guess, torch.full_like(guess, float("inf")))
    down = torch.nextafter(guess, torch.full_like(guess, float("-inf")))
    candidates = torch.stack([guess, down, up])  # (3, n); argmin takes the first of equals: guess, which is
    # round-to-nearest-even of the fp32 mean where the mean is an exact tie
    dist = (candidates.to(torch.float64) - mean).abs_()
    best = dist.argmin(dim=0)
    near = candidates.gather(0, best[None]).squeeze(0)
    slack = (dist - dist.gather(0, best[None])) <= TOLERANCE * mean.abs()
    slack.scatter_(0, best[None], False)
    which, idx = slack.nonzero(as_tuple=True)  # at most one other candidate per element in practice
    return near, idx.to(torch.int64), candidates[which, idx]


def check_output(out: Path, oracle: Path) -> dict[str, float]:
    """Compare an output directory with the oracle: ``bad`` counts elements that are neither the nearest bf16
    value nor an acceptable neighbour (must be 0); ``at_alternative`` those equal to the acceptable neighbour;
    ``missing_or_mismatched`` tensors absent, extra, or of another shape or dtype."""
    from safetensors import safe_open

    bad = at_alt = structural = 0
    with safe_open(oracle / "nearest.safetensors", framework="pt") as near_f, \
            safe_open(oracle / "alternatives.safetensors", framework="pt") as alt_f, \
            tensor_source(out) as (get, keys):
        expected = list(near_f.keys())
        structural += len(set(expected) ^ set(keys))
        for key in sorted(set(expected) & set(keys)):
            r, q = near_f.get_tensor(key), get(key)
            if q.shape != r.shape or q.dtype != r.dtype:
                structural += 1
                continue
            diff = (q != r).flatten().nonzero().flatten()
            if diff.numel():
                alt_idx, alt_val = alt_f.get_tensor(key + ".index"), alt_f.get_tensor(key + ".value")
                order = alt_idx.argsort()
                alt_idx, alt_val = alt_idx[order], alt_val[order]
                pos = torch.searchsorted(alt_idx, diff).clamp_(max=max(alt_idx.numel() - 1, 0))
                ok = int(((alt_idx[pos] == diff) & (q.flatten()[diff] == alt_val[pos])).sum()) if alt_idx.numel() else 0
                at_alt += ok
                bad += diff.numel() - ok
    return {"bad_elements": float(bad), "at_alternative": float(at_alt), "missing_or_mismatched": float(structural)}


def loads_with_from_pretrained(out: Path, oracle: Path) -> bool:
    """``LlamaForCausalLM.from_pretrained(out)`` works and holds the file's tensors (the oracle's, as checked)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    state = model.state_dict()
    with tensor_source(out) as (get, keys):
        same = set(keys) <= set(state) and all(torch.equal(state[k], get(k)) for k in keys)
    with safe_open(oracle / "nearest.safetensors", framework="pt") as f:
        same = same and set(f.keys()) <= set(state)
    del model, state
    return same


# --------------------------------------------------------------------------------------------------
# The load-everything loop (a contender; runs as `python -m benchmarks.merge load-all`)
# --------------------------------------------------------------------------------------------------


def load_all_average(dirs: Sequence[Path], out: Path) -> None:
    """What people write: load every checkpoint whole, sum each tensor in fp32, divide, save in the newest
    checkpoint's shards (with its index and JSON files), built under a temporary name and renamed."""
    from safetensors.torch import load_file, save_file

    states = []
    for d in dirs:
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_files(d).values())):
            state.update(load_file(shard))
        states.append(state)
    newest = dirs[-1]
    average = {}
    for key, t in states[-1].items():
        acc = torch.zeros(t.shape, dtype=torch.float32)
        for s in states:
            acc += s[key]
        average[key] = acc.div_(len(states)).to(t.dtype)
    del states
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    by_shard: dict[str, dict[str, torch.Tensor]] = {}
    for key, path in weight_files(newest).items():
        by_shard.setdefault(path.name, {})[key] = average[key]
    for name, tensors in by_shard.items():
        save_file(tensors, tmp / name, metadata={"format": "pt"})
    for extra in newest.iterdir():
        if extra.suffix == ".json" and extra.name != "trainer_state.json":
            shutil.copy2(extra, tmp / extra.name)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, out)


# --------------------------------------------------------------------------------------------------
# Running a contender: time, peak RSS of the process tree, bytes read
# --------------------------------------------------------------------------------------------------


def error_lines(stderr: str, limit: int = 1500) -> str:
    """What a failed child said: its ``error:`` lines (a CLI's one-line message, on every rank) if any, else
    the end of its stderr."""
    lines = list(dict.fromkeys(line.strip() for line in stderr.splitlines() if "error:" in line))
    return (" | ".join(lines) if lines else stderr.strip())[-limit:]


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants now alive."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
    return seen


def _rss(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile + RssShmem) of a process in bytes; (0, 0) once it is gone."""
    anon = file = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith(("RssFile:", "RssShmem:")):
                file += int(line.split()[1]) * 1024
    return anon, file


def run_tree(cmd: list[str], threads: int, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``cmd`` under GNU time from the repository root with ``threads`` OpenMP threads: wall and CPU
    seconds, bytes read from the disk, peak RSS of its largest process (GNU time ``%M``, the number the
    goals use) and, sampled every 20 ms, the anonymous / file-backed split of that process's peak, the peak
    sum over its process tree and the most processes alive at once.

    The tree sum double-counts pages a forked child shares with its parent, so it is an upper bound; it
    matters only for a contender that starts worker processes (then ``processes`` > 1 says so).
    """
    peak = {"tree": 0, "anon": 0, "file": 0, "one": 0, "procs": 0}
    environ = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", **(env or {})}
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        timed = [GNU_TIME, "-f", "%M %U %S %I", "-o", stats.name, *cmd]
        t0 = time.perf_counter()
        proc = subprocess.Popen(timed, cwd=common.REPO, env=environ, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                sizes = [_rss(p) for p in _tree(proc.pid)[1:]]  # GNU time itself is a few MB, not the contender
                sizes = [s for s in sizes if sum(s)]
                if sizes:
                    anon, file = max(sizes, key=sum)
                    if anon + file > peak["one"]:
                        peak.update(one=anon + file, anon=anon, file=file)
                    peak["tree"] = max(peak["tree"], sum(map(sum, sizes)))
                    peak["procs"] = max(peak["procs"], len(sizes))
                done.wait(0.02)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        stderr = proc.stderr.read().decode(errors="replace")
        proc.wait()
        wall = time.perf_counter() - t0
        done.set()
        poller.join()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:5])} … exited {proc.returncode}: {error_lines(stderr)}")
        max_kib, user, system, blocks = stats.read().split()[-4:]
    return {
        "wall_seconds": wall,
        "cpu_seconds": float(user) + float(system),
        "peak_rss_mb": int(max_kib) * 1024 / 1e6,  # GNU time reports KiB
        "peak_rss_anon_mb": peak["anon"] / 1e6,
        "peak_rss_file_mb": peak["file"] / 1e6,
        "peak_rss_tree_sum_mb": peak["tree"] / 1e6,
        "processes": float(peak["procs"]),
        "read_gb": int(blocks) * 512 / 1e9,
    }


def mergekit_config(dirs: Sequence[Path], path: Path) -> Path:
    """A mergekit YAML: linear merge, weight 1 each (normalised: the plain mean), bf16 like the inputs."""
    lines = ["merge_method: linear", "dtype: bfloat16", "parameters:", "  normalize: true", "models:"]
    for d in dirs:
        lines += [f"  - model: {d}", "    parameters:", "      weight: 1.0"]
    path.write_text("\n".join(lines) + "\n")
    return path


def commands(args: argparse.Namespace, dirs: list[Path], run: Path, out: Path, shard_params: int,
             mk_yaml: Path) -> dict[str, list[str]]:
    py = sys.executable
    floor = "import torch, safetensors, lawa_utils"
    cmds = {
        "ours": [py, "-m", "lawa_utils", "average", "--dir", str(run), "--end", str(STEP * len(dirs)),
                 "--k", str(len(dirs)), "--out", str(out)],
        "load-all": [py, "-m", "benchmarks.merge", "load-all", "--dirs", *map(str, dirs), "--out", str(out)],
        "import-only": [py, "-c", floor],
    }
    if args.patched is not None:  # the same CLI with a modified copy of lawa_io.py (or others) imported first
        boot = f"import sys; sys.path.insert(0, {str(args.patched)!r}); import lawa_utils; sys.exit(lawa_utils.main())"
        cmds["patched"] = [py, "-c", boot, *cmds["ours"][3:]]
    if args.mergekit_python is not None:
        mk = str(args.mergekit_python)
        cmds["mergekit"] = [mk, "-m", "mergekit.scripts.run_yaml", str(mk_yaml), str(out), "--no-cuda",
                            "--out-shard-size", str(shard_params), "--no-copy-tokenizer", "--quiet"]
        cmds["mergekit-import-only"] = [mk, "-c", "import torch, mergekit.merge"]
    return cmds


def disk_read_gbps(files: Sequence[Path]) -> float:
    """Sequential read throughput of the disk: ``files`` read cold, whole, with 16 MB reads."""
    common.drop_page_cache()
    total, t0 = 0, time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    return total / (time.perf_counter() - t0) / 1e9


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = common.parser(__doc__.split("\n\n")[0], repeats=3)
    p.add_argument("--data", type=Path, default=None,
                   help="directory for the synthetic run and its oracle, kept and reused (default: a scratch dir "
                        "under /tmp, removed afterwards)")
    p.add_argument("--k", type=int, default=6, help="checkpoints averaged")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=15)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--mergekit-python", type=Path, default=DEFAULT_MERGEKIT if DEFAULT_MERGEKIT.exists() else None,
                   help="python of a venv with mergekit installed (left out when absent)")
    p.add_argument("--variants", nargs="+", choices=[*VARIANTS, "patched"], default=VARIANTS)
    p.add_argument("--patched", type=Path, default=None,
                   help="also time `average` with the modules in this directory imported first (a proposal)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load-all"]:
        p = argparse.ArgumentParser(prog="benchmarks.merge load-all", description=load_all_average.__doc__)
        p.add_argument("--dirs", type=Path, nargs="+", required=True)
        p.add_argument("--out", type=Path, required=True)
        a = p.parse_args(argv[1:])
        load_all_average(a.dirs, a.out)
        return 0
    args = common.parse(_parser(), argv)
    if args.quick:
        args.vocab, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 512, 64, 160, 2, 4, 2
        args.k, args.repeats = 3, 1
    variants = [v for v in args.variants if v != "mergekit" or args.mergekit_python is not None]
    if args.patched is not None and "patched" not in variants:
        variants.append("patched")
    conditions = ["warm"] if args.quick else ["cold", "warm"]
    config = llama_config(args)
    report = common.Report(NAME, TITLE, args, {
        "k": args.k, "vocab": args.vocab, "hidden": args.hidden, "intermediate": args.intermediate,
        "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads, "dtype": "bfloat16",
        "shards": SHARDS, "variants": variants,
        "mergekit_python": str(args.mergekit_python) if args.mergekit_python else None,
    })
    if "mergekit" in args.variants and "mergekit" not in variants:
        report.note("mergekit left out: no --mergekit-python (a venv with `pip install mergekit`)")
    with contextlib.ExitStack() as stack:
        data = args.data if args.data is not None else stack.enter_context(common.scratch_dir(NAME))
        data.mkdir(parents=True, exist_ok=True)
        h, kv = args.hidden, args.hidden * args.kv_heads // args.heads
        params = 2 * args.vocab * h + args.layers * (2 * h * h + 2 * h * kv + 3 * h * args.intermediate)
        # bf16: the k inputs, the oracle and two outputs at a time
        common.free_disk_or_exit(data, 0 if (data / "run" / "manifest.json").exists() else 2 * params * (args.k + 3),
                                 "use --data on a larger disk, or a smaller --layers/--k")
        run = data / "run"
        dirs = write_hf_run(run, config, args.k, args.seed)
        oracle = build_oracle(dirs, data / "oracle")
        files = input_files(dirs)
        input_bytes = sum(f.stat().st_size for f in files)
        with tensor_source(dirs[-1]) as (get, keys):
            sizes = {key: get(key).numel() * 2 for key in keys}
        largest = max(sizes.values())
        shard_params = input_bytes // len(dirs) // SHARDS // 2 + 1
        report.config.update(params=sum(sizes.values()) // 2, model_gb=round(sum(sizes.values()) / 1e9, 3),
                             input_gb=round(input_bytes / 1e9, 3), largest_tensor_mb=round(largest / 1e6, 1),
                             mergekit_out_shard_params=shard_params)
        mk_yaml = mergekit_config(dirs, data / "mergekit.yml")
        out = data / "out"
        cmds = commands(args, dirs, run, out, shard_params, mk_yaml)
        loaded: set[str] = set()
        failures: list[dict[str, Any]] = []
        status = 0
        for r in range(args.repeats):
            for condition in conditions:
                if condition == "cold":
                    disk = disk_read_gbps(input_files(dirs[:1]))
                    report.measure("disk", "cold", r, "sequential_read_gbps", disk, "GB/s")
                    print(f"   r{r} disk sequential read {disk:.2f} GB/s", flush=True)
                for variant in common.interleaved(variants, r):
                    _run_one(report, cmds, variant, condition, r, files, out, oracle, args, loaded, failures)
            # Results after every repeat: on a shared machine a long run may have to be stopped, and the repeats
            # done so far are then already on disk.
            report.summary.clear(), report.goals.clear()
            report.checks[:] = failures
            report.notes[:] = [n for n in report.notes if not n.startswith("Disk sequential read")]
            summarize(report, variants, conditions, largest)
            status = report.finish()
    return status


def _run_one(report, cmds, variant, condition, r, files, out, oracle, args, loaded, failures) -> None:
    shutil.rmtree(out, ignore_errors=True)
    achieved = common.set_cache(condition, files, report)
    if achieved == "cold":  # a drop evicts Python, torch and mergekit too: re-cache them, not the checkpoints
        for name in ("import-only", "mergekit-import-only"):
            if name in cmds:
                run_tree(cmds[name], args.threads)
    if variant == VARIANTS[0] or "ours" not in cmds:
        floor = run_tree(cmds["import-only"], args.threads)
        for metric, value in floor.items():
            report.measure("import-only", achieved, r, metric, value, metric.rsplit("_", 1)[-1])
    available = common.meminfo("MemAvailable")
    report.measure(variant, achieved, r, "mem_available_gb_at_start", available / 1e9, "GB")
    if variant == "load-all" and available < 1.2 * (args.k + 1) * report.config["model_gb"] * 1e9:
        # It holds all k models and the average at once; other engineers' jobs share this machine's memory,
        # and the kernel's OOM killer would pick among their processes too.
        report.note(f"load-all was skipped where less than 1.2 × the {(args.k + 1) * report.config['model_gb']:.1f} GB "
                    "it holds (k models and the average) was available: rows skipped_for_memory and "
                    "mem_available_gb_at_start")
        report.measure(variant, achieved, r, "skipped_for_memory", 1.0, "")
        return
    cached = common.cached_fraction(files)
    try:
        res = run_tree(cmds[variant], args.threads)
    except RuntimeError as e:
        report.check(f"{variant}: runs ({achieved}, repeat {r})", str(e)[-600:], "exit 0", False)
        failures.append(report.checks[-1])
        return
    for metric, value in res.items():
        report.measure(variant, achieved, r, metric, value, metric.rsplit("_", 1)[-1])
    if cached is not None:
        report.measure(variant, achieved, r, "cached_fraction_at_start", cached, "")
    result = check_output(out, oracle)
    for metric, value in result.items():
        report.measure(variant, achieved, r, metric, value, "")
    if variant not in loaded:
        loaded.add(variant)
        report.measure(variant, achieved, r, "from_pretrained_ok", float(loads_with_from_pretrained(out, oracle)), "")
    shutil.rmtree(out, ignore_errors=True)
    print(f"   r{r} {achieved} {variant}: {res['wall_seconds']:.1f} s (CPU {res['cpu_seconds']:.1f}), peak RSS "
          f"{res['peak_rss_mb']:.0f} MB (anon {res['peak_rss_anon_mb']:.0f}, file {res['peak_rss_file_mb']:.0f}), "
          f"read {res['read_gb']:.2f} GB, cached at start {cached}, oracle {result}", flush=True)


def summarize(report: common.Report, variants: list[str], conditions: list[str], largest: int) -> None:
    med = lambda v, m, c=None: common.median(report.values(v, m, c))  # noqa: E731
    input_gb = report.config["input_gb"]
    disk = med("disk", "sequential_read_gbps")
    floor_rss = med("import-only", "peak_rss_mb")
    for c in conditions:
        for v in [*variants, "import-only"]:
            wall = med(v, "wall_seconds", c)
            report.summary.append({
                "variant": v, "cache": c, "wall s (median)": wall,
                "min–max s": _span(report.values(v, "wall_seconds", c)),
                "CPU s": med(v, "cpu_seconds", c), "peak RSS MB": med(v, "peak_rss_mb", c),
                "anon / file-backed MB": f"{med(v, 'peak_rss_anon_mb', c):.0f} / {med(v, 'peak_rss_file_mb', c):.0f}",
                "tree sum MB / procs": f"{med(v, 'peak_rss_tree_sum_mb', c):.0f} / {med(v, 'processes', c):.0f}",
                "read from disk GB": med(v, "read_gb", c),
                "input GB/s": input_gb / wall if v != "import-only" else float("nan"),
                "n": len(report.values(v, "wall_seconds", c)),
                "speed-up vs mergekit": common.fmt_ratio(med("mergekit", "wall_seconds", c) / wall),
                "RSS vs mergekit": common.fmt_ratio(med("mergekit", "peak_rss_mb", c) / med(v, "peak_rss_mb", c)),
            })
    for ours in [v for v in ("ours", "patched") if v in variants]:
        label = "" if ours == "ours" else "patched: "
        for c in conditions:
            if "mergekit" in variants:
                speed = med("mergekit", "wall_seconds", c) / med(ours, "wall_seconds", c)
                report.goal(f"{label}≥ 2× faster than mergekit ({c})",
                            f"{common.fmt_ratio(speed)} (CPU s: "
                            f"{common.fmt_ratio(med('mergekit', 'cpu_seconds', c) / med(ours, 'cpu_seconds', c))})",
                            "≥ 2×", speed >= 2)
                memory = med("mergekit", "peak_rss_mb", c) / med(ours, "peak_rss_mb", c)
                report.goal(f"{label}peak RSS ≥ 3× below mergekit's ({c})", common.fmt_ratio(memory), "≥ 3×",
                            memory >= 3)
            rss = med(ours, "peak_rss_mb", c)
            bound = floor_rss + 2 * largest / 1e6
            report.goal(f"{label}peak RSS ≤ floor + 2 × largest tensor ({c})",
                        f"{rss:.0f} MB (floor {floor_rss:.0f} + {rss - floor_rss:.0f}; anon "
                        f"{med(ours, 'peak_rss_anon_mb', c):.0f})", f"≤ {bound:.0f} MB", rss <= bound)
        if "cold" in conditions:  # each cold run against the disk as measured in the same repeat
            walls = report.values(ours, "wall_seconds", "cold")
            disks = report.values("disk", "sequential_read_gbps")
            shares = [input_gb / w / d for w, d in zip(walls, disks, strict=False)]
            share = common.median(shares)
            report.goal(f"{label}cold read throughput ≥ 50% of the disk's sequential read",
                        f"{100 * share:.0f}% (per repeat: "
                        + ", ".join(f"{100 * x:.0f}% of {d:.2f} GB/s" for x, d in zip(shares, disks, strict=False))
                        + ")", "≥ 50%", share >= 0.5)
    for v in variants:
        runs = report.values(v, "bad_elements")
        if not runs:
            continue
        report.check(f"{v}: every output equals the fp64 oracle ({len(runs)} runs)",
                     f"{max(runs):.0f} elements off, {max(report.values(v, 'missing_or_mismatched')):.0f} tensors off",
                     "0 and 0 (≤ 1e-6 relative before the bf16 rounding)",
                     max(runs) == 0 and max(report.values(v, "missing_or_mismatched")) == 0)
        loads = report.values(v, "from_pretrained_ok")
        report.check(f"{v}: output loads with LlamaForCausalLM.from_pretrained", bool(loads and min(loads)), "True",
                     bool(loads and min(loads)))
    report.extra["largest_tensor_bytes"] = largest
    report.note(f"Disk sequential read (one checkpoint's shards, cold, 16 MB reads): median {disk:.2f} GB/s. "
                "'input GB/s' is the k checkpoints' bytes over the wall time (Python start-up included).")
    report.note("Peak RSS: GNU time's %M of the contender's largest process; its anonymous / file-backed split and "
                "the sum over the process tree are sampled every 20 ms. The floor is the import-only row (Python, "
                "torch, safetensors, lawa_utils).")


def _span(values: Sequence[float]) -> str:
    return f"{min(values):.1f}–{max(values):.1f}" if values else "–"


if __name__ == "__main__":
    sys.exit(main())
