"""LAWA utilities: checkpoint I/O, averaging, the one-pass trajectory sweep, BatchNorm recompute, a CLI.

LAWA (LAtest Weight Averaging; Kaddour 2022, "Stop Wasting My Time! Saving Days of ImageNet and BERT
Training with Latest Weight Averaging") evaluates, at the end of epoch E, the average of the k latest
per-epoch checkpoints::

    θ_E^LAWA = (1/k) Σ_{i=E−k+1..E} θ_i          (the paper's default: k = 6)

**The window.** Everywhere in this repository "the window of size k ending at E" means the k latest
checkpoints, epochs E−k+1 … E *inclusive* (``window(E, k)``). (The original scripts averaged
``start..end`` with ``start = end − k``, i.e. k+1 checkpoints, by accident.)

Usage::

    import lawa_utils as lu
    ckpts = lu.find_checkpoints("runs/imagenet")              # {epoch: Path("checkpoint{E}.pt")}
    for end, k, state in lu.iter_window_averages(ckpts, ks=[2, 6]):
        model.load_state_dict(state)                           # every file is read from disk once
        lu.recompute_bn(model, train_loader, num_batches=50)

    python -m lawa_utils average --dir runs/imagenet --end 30 --k 6 --out lawa30.pt

Pure functions (``average_state_dicts``, ``method_weights``, ``iter_window_averages`` given a loader) do
no I/O of their own beyond loading; ``load_*``/``save_checkpoint`` and ``main`` are the thin I/O layer.
Errors meant for people are :class:`LawaError` with a one-line message naming the file or value.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import pickle
import platform
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lawa_io import SAFE_GLOBALS, open_checkpoint

# The tidy CSV and atomic files live in the torch-free lawa_tidy; they stay importable from here.
from lawa_tidy import (
    RESULT_COLUMNS,
    LawaError,
    append_rows,
    atomic_write,
    done_cells,
    read_results,
    record_run,
)

__all__ = [
    "LawaError",
    "RESULT_COLUMNS",
    "SAFE_GLOBALS",
    "append_rows",
    "atomic_write",
    "add_average_args",
    "average_command",
    "average_main",
    "average_state_dicts",
    "check_compatible",
    "check_finite",
    "done_cells",
    "find_checkpoints",
    "iter_window_averages",
    "load_checkpoint",
    "load_model_state",
    "main",
    "method_weights",
    "parse_epochs",
    "read_results",
    "recompute_bn",
    "record_run",
    "run_info",
    "save_checkpoint",
    "split_checkpoint",
    "window",
    "with_model_state",
]

CHECKPOINT_RE = re.compile(r"^checkpoint(\d+)\.pt$")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP/DataParallel and torch.compile wrappers


# --------------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------------


# SAFE_GLOBALS (types that cannot run code when unpickled) is defined in lawa_io beside the safe unpickler.


def _unsafe_hint(exc: Exception) -> str:
    match = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc))
    return f"it needs {match.group(1)}" if match else "it holds objects outside the safe allowlist"


def load_checkpoint(path: str | os.PathLike, *, trust: bool = False, mmap: bool = True) -> Any:
    """Load a checkpoint file safely and return the object stored in it.

    ``.safetensors`` files are read with safetensors. Everything else goes through
    ``torch.load(weights_only=True)`` with :data:`SAFE_GLOBALS` allowed and ``mmap=True``, so tensors that
    are never touched (optimizer state) are never read from disk. A file whose pickle needs arbitrary code
    is refused unless ``trust=True`` (only for files from a source you trust: unpickling can run code).

    >>> obj = load_checkpoint("checkpoint5.pt")            # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise LawaError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise LawaError(f"{path} is not a readable safetensors file ({_short(exc)})") from None
    if path.stat().st_size == 0:
        raise LawaError(f"{path} is empty (a truncated or interrupted write?)")
    use_mmap = mmap and zipfile.is_zipfile(path)  # legacy (pre-1.6) files cannot be memory-mapped
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=use_mmap)
        # The context manager restores the allowlist on exit, so entries registered before (e.g. by the
        # fairseq plugin for fairseq's own loader) must not be part of it, or they would be removed.
        already = set(torch.serialization.get_safe_globals())
        with torch.serialization.safe_globals([g for g in SAFE_GLOBALS if g not in already]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc) and "GLOBAL" in str(exc):
            raise LawaError(
                f"{path} was refused: {_unsafe_hint(exc)}, and unpickling it could run arbitrary code; "
                "if you trust its source, rerun with --trust-checkpoints (trust=True)"
            ) from None
        raise LawaError(f"{path} is not a readable PyTorch checkpoint ({_short(exc)})") from None
    except Exception as exc:  # torch.load fails on damaged files in many ways (EOFError, IndexError, ...)
        raise LawaError(f"{path} is not a readable PyTorch checkpoint, or is truncated ({_short(exc)})") from None


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes shared by every key."""
    prefix = ""
    keys = list(state)
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if keys and all(k.startswith(prefix + p) for k in keys):
                prefix += p
                changed = True
    return {k[len(prefix) :]: v for k, v in state.items()}, prefix


def split_checkpoint(obj: Any, name: str = "checkpoint") -> tuple[str, dict[str, torch.Tensor]]:
    """Return ``(format, model_state)`` for a loaded checkpoint object; wrapper prefixes are stripped.

    Formats: ``fairseq`` (``model`` plus ``cfg``, ``optimizer_history`` or ``extra_state``), ``torchvision``
    (its references/classification/train.py: ``model`` plus ``lr_scheduler`` and ``epoch``), ``examples``
    (pytorch/examples: ``state_dict``), ``nanogpt`` (``model`` or ``net``), ``plain`` (a bare state dict,
    also safetensors). Only the name differs between the ``model`` formats: the weights are read from and
    written back to the same key.
    """
    if _is_tensor_dict(obj):
        return "plain", _strip_wrappers(obj)[0]
    if isinstance(obj, Mapping):
        model = obj.get("model")
        if _is_tensor_dict(model) and any(key in obj for key in ("cfg", "optimizer_history", "extra_state")):
            return "fairseq", _strip_wrappers(model)[0]
        if _is_tensor_dict(model) and "lr_scheduler" in obj and "epoch" in obj:
            return "torchvision", _strip_wrappers(model)[0]
        if _is_tensor_dict(obj.get("state_dict")):
            return "examples", _strip_wrappers(obj["state_dict"])[0]
        for key in ("model", "net"):
            if _is_tensor_dict(obj.get(key)):
                return "nanogpt", _strip_wrappers(obj[key])[0]
        keys = ", ".join(map(str, list(obj)[:8]))
        raise LawaError(f"{name} holds no model weights that LAWA recognises (top-level keys: {keys})")
    raise LawaError(f"{name} is not a checkpoint (it holds a {type(obj).__name__}, not a dict of tensors)")


_MODEL_KEY = {"fairseq": "model", "torchvision": "model", "examples": "state_dict"}


def with_model_state(template: Any, fmt: str, state: Mapping[str, torch.Tensor], **extra: Any) -> Any:
    """Put ``state`` back into a copy of ``template`` (a loaded checkpoint of format ``fmt``).

    The template's other entries (fairseq ``cfg``/``args``/``extra_state``, pytorch/examples ``epoch``/
    ``arch``…) are kept, so the tools that read the original format read the result; the wrapper prefix the
    template's keys carried (``module.``) is put back. ``extra`` entries are added to dict containers.
    """
    if fmt == "plain":
        _, prefix = _strip_wrappers(template)
        return {prefix + k: v for k, v in state.items()}
    key = _MODEL_KEY.get(fmt) or ("model" if _is_tensor_dict(template.get("model")) else "net")
    _, prefix = _strip_wrappers(template[key])
    out = dict(template)
    out[key] = {prefix + k: v for k, v in state.items()}
    out.update(extra)
    return out


def check_finite(state: Mapping[str, torch.Tensor], name: str) -> None:
    """Refuse NaN/Inf weights: averaging a diverged checkpoint silently poisons every window it is in."""
    for key, t in state.items():
        # t.sum() is one cheap pass and is NaN/Inf whenever an element is; isfinite(t) allocates full-size
        # temporaries (≈20× slower, benchmarks/), so it only confirms (a finite tensor whose sum overflows).
        if t.is_floating_point() and not torch.isfinite(t.sum()) and not bool(torch.isfinite(t).all()):
            raise LawaError(f"{name}: tensor '{key}' has NaN/Inf values; refusing to average it")


def load_model_state(
    path: str | os.PathLike, *, trust: bool = False, entry: str | None = None
) -> dict[str, torch.Tensor]:
    """Model tensors only (wrapper prefixes stripped) from any checkpoint file or directory lawa_io reads.

    >>> state = load_model_state("runs/hf/checkpoint-500")                      # doctest: +SKIP
    >>> ema = load_model_state("checkpoint-7.pth.tar", entry="state_dict_ema")  # doctest: +SKIP

    ``entry`` picks one weights dict of a file that holds several (``lawa_io.CheckpointReader.entries``);
    the default is the first, the one a training trajectory is made of. Pickles are read without running
    code from them (``lawa_io.InertUnpickler``) unless ``trust``; tensors are memory-mapped where the
    container allows.
    """
    with open_checkpoint(path, trust=trust) as ckpt:
        return ckpt.state(entry)


# --------------------------------------------------------------------------------------------------
# Saving and run records
# --------------------------------------------------------------------------------------------------


def save_checkpoint(obj: Any, path: str | os.PathLike, *, force: bool = False) -> None:
    """Save atomically (temporary file, fsync, rename); ``.safetensors`` paths get a safetensors file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        fmt, state = split_checkpoint(obj, name=str(path))
        data = save({k: v.contiguous() for k, v in state.items()})
        atomic_write(path, lambda f: f.write(data), force=force)
    else:
        atomic_write(path, lambda f: torch.save(obj, f), force=force)


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_build() -> dict[str, str]:
    """The few facts of torch's build that decide CPU speed: BLAS, oneDNN, the parallel backend, the vector ISA.

        >>> torch_build()["parallel"]       # doctest: +SKIP
        'OpenMP'
    """
    info = torch.__config__.parallel_info()
    backend = re.search(r"ATen parallel backend: (.+)", info)
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return {"version": torch.__version__, "blas": blas.group(1) if blas else "unknown",
            "mkldnn": str(torch.backends.mkldnn.is_available()), "parallel": backend.group(1).strip() if backend
            else "unknown", "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def micro_benchmark(seconds: float = 0.1) -> dict[str, float]:
    """This machine's speed now, in two numbers measured in about ``2 × seconds``: matmul GFLOP/s, copy GB/s.

        >>> micro_benchmark()                # doctest: +SKIP
        {'matmul_gflops': 61.2, 'copy_gbps': 7.9, 'threads': 2}

    A 256×256 float32 matmul (2·256³ flops) and a copy of 8 Mi float32 (32 MB read + 32 MB written), each
    repeated for ``seconds``, with torch's current thread count. The fastest repetition counts: other load on
    the machine only ever slows a repetition down, so the best one is the closest to the machine's own speed.
    """
    def best_rate(work: float, step) -> float:
        step()  # first call: allocation and kernel selection, not timed
        best, stop = math.inf, time.perf_counter() + seconds
        while True:
            start = time.perf_counter()
            step()
            end = time.perf_counter()
            best = min(best, end - start)
            if end >= stop:
                return work / best / 1e9

    # A private generator: a trainer that restored its RNG state before recording the run must draw the same
    # numbers afterwards as an uninterrupted run (bit-identical resume).
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(256, 256, generator=g), torch.rand(256, 256, generator=g)
    src, dst = torch.rand(8 << 20, generator=g), torch.empty(8 << 20)
    return {"matmul_gflops": round(best_rate(2 * 256**3, lambda: torch.mm(a, b)), 1),
            "copy_gbps": round(best_rate(2 * src.numel() * 4, lambda: dst.copy_(src)), 2),
            "threads": torch.get_num_threads()}


def run_info(argv: Sequence[str] | None = None) -> dict:
    """What every run records beside its outputs: command, versions, git sha, hardware, time.

        >>> run_info()["hardware"]["cpu_model"]          # doctest: +SKIP
        'Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz'

    ``hardware`` names the CPU, its core and torch thread counts, torch's build (``torch_build``) and a
    ``micro_benchmark`` taken now: on CPU, results and times differ between machines, and these say which
    machine and how fast it was while this run started.
    """
    repo = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "fairseq", "numpy", "pandas"):
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = getattr(mod, "__version__", "?")
    cuda = torch.cuda.is_available()
    return {
        "command": " ".join([sys.executable, *(sys.argv if argv is None else argv)]),
        "git_sha": sha + ("-dirty" if dirty else ""),
        "versions": versions,
        "hardware": {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "torch_threads": torch.get_num_threads(),
            "torch_build": torch_build(),
            "benchmark": micro_benchmark(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --------------------------------------------------------------------------------------------------
# Averaging (pure)
# --------------------------------------------------------------------------------------------------


def window(end: int, k: int) -> range:
    """Epochs in the LAWA window of size ``k`` ending at ``end``: E−k+1 … E inclusive (k checkpoints)."""
    if k < 1:
        raise LawaError(f"k must be a positive integer, got {k}")
    return range(end - k + 1, end + 1)


DEFAULT_ALPHA = 0.9  # exp: the newest checkpoint's weight when none is given (the paper's Appendix C)


def method_weights(method: str, k: int, alpha: float = DEFAULT_ALPHA) -> list[float]:
    """Coefficients for the k checkpoints of a window, oldest first; they sum to 1.

    ``uni``: 1/k each (LAWA). ``exp``: the paper's Appendix C, eq. (1), θ_E^EXP = α θ_E + (1−α) θ_{E−1}^EXP
    started from the oldest checkpoint of the window, so the newest gets α, the one before α(1−α), …, and
    the oldest (1−α)^(k−1). (The original code gave the newest checkpoint 1−α = 0.1; we follow the paper.)

    >>> method_weights("exp", 3, alpha=0.5)
    [0.25, 0.25, 0.5]
    """
    if k < 1:
        raise LawaError(f"k must be a positive integer, got {k}")
    if method == "uni":
        return [1.0 / k] * k
    if method == "exp":
        if not 0.0 < alpha <= 1.0:
            raise LawaError(f"alpha must be in (0, 1], got {alpha}")
        newest_first = [alpha * (1 - alpha) ** j for j in range(k - 1)] + [(1 - alpha) ** (k - 1)]
        return newest_first[::-1]
    raise LawaError(f"unknown averaging method '{method}' (choose uni or exp)")


def check_compatible(
    ref: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], names: tuple[str, str]
) -> None:
    """Refuse to average ``state`` with ``ref`` unless both have the same keys and each key the same shape.

        >>> check_compatible(first, state, ("checkpoint1.pt", "checkpoint7.pt"))

    ``names`` label the two in the :class:`LawaError`, which names the first key found in only one of them
    or the first key whose shapes differ. dtypes may differ (averages accumulate in float32); ``ref`` may be
    on the meta device, as only shapes are compared.
    """
    if ref.keys() != state.keys():
        only_ref = sorted(set(ref) - set(state))
        only_new = sorted(set(state) - set(ref))
        what = f"'{only_ref[0]}' is only in {names[0]}" if only_ref else f"'{only_new[0]}' is only in {names[1]}"
        raise LawaError(f"mismatched keys between {names[0]} and {names[1]}: {what}")
    for key, t in state.items():
        if t.shape != ref[key].shape:
            raise LawaError(
                f"mismatched shapes for '{key}': {tuple(ref[key].shape)} in {names[0]}, {tuple(t.shape)} in {names[1]}"
            )


def average_state_dicts(
    states: Iterable[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts (oldest first); uniform when ``weights`` is None.

    Floating tensors are accumulated in float32 (float64 stays float64) and returned in their own dtype;
    integer tensors (BatchNorm ``num_batches_tracked``, step counters) are copied from the newest, last,
    state dict, never divided. Keys and shapes must match; ``names`` label the inputs in errors.
    ``states`` may be a generator: the states are consumed one at a time into the running sum, so only
    the sum and one state need to be in memory (``main`` loads each checkpoint file this way).
    In-place float32 accumulation keeps the relative error ≤ 3e-7 for k = 64 (tests/test_lawa_utils.py);
    float64 accumulation measured 10–20× slower on CPU, so it is not used.

    >>> a, b = {"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}
    >>> average_state_dicts([a, b])["w"]
    tensor([2.])
    """
    if weights is not None:
        weights = [float(w) for w in weights]
        if not all(math.isfinite(w) for w in weights):
            raise LawaError(f"weights must be finite, got {weights}")
    acc: dict[str, torch.Tensor] = {}
    first: tuple[str, Mapping[str, torch.Tensor]] | None = None
    newest: Mapping[str, torch.Tensor] = {}
    n = 0
    for n, state in enumerate(states, start=1):
        name = names[n - 1] if names is not None else f"state dict #{n - 1}"
        if weights is not None and n > len(weights):
            raise LawaError(f"{len(weights)} weights given for more state dicts ({name} has none)")
        if first is None:
            first = (name, {k: t.to("meta") for k, t in state.items()})  # shapes only, no memory
            for key, t in state.items():
                if t.is_floating_point():
                    acc[key] = torch.zeros(t.shape, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
        else:
            check_compatible(first[1], state, (first[0], name))
        w = 1.0 if weights is None else weights[n - 1]
        for key, a in acc.items():
            t = state[key]
            a.add_(t if t.dtype == a.dtype else t.to(a.dtype), alpha=w)
        newest = state
    if n == 0:
        raise LawaError("nothing to average: no state dicts given")
    if weights is not None and n != len(weights):
        raise LawaError(f"{len(weights)} weights given for {n} state dicts")
    out: dict[str, torch.Tensor] = {}
    for key, t in newest.items():
        if key not in acc:
            out[key] = t.clone()
            continue
        avg = acc[key].div_(n) if weights is None else acc[key]
        out[key] = avg if avg.dtype == t.dtype else avg.to(t.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# The one-pass trajectory sweep
# --------------------------------------------------------------------------------------------------


def find_checkpoints(ckpt_dir: str | os.PathLike) -> dict[int, Path]:
    """``{E: path}`` for every ``checkpoint{E}.pt`` in ``ckpt_dir`` (E = completed epochs, 1-based).

    >>> find_checkpoints("runs/imagenet")                  # doctest: +SKIP
    {1: PosixPath('runs/imagenet/checkpoint1.pt'), 2: ...}

    This repository's layout only: ``lawa_trajectory.find_trajectory`` reads every layout, and its
    ``checkpoints()`` is the index space ``iter_window_averages`` and ``lawa_methods`` take.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise LawaError(f"checkpoint directory {ckpt_dir} does not exist")
    found = {}
    for p in ckpt_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    if not found:
        from lawa_trajectory import find_trajectory

        try:  # say what the directory holds instead, if it is a run in another layout
            other = find_trajectory(ckpt_dir)
        except LawaError:
            raise LawaError(f"{ckpt_dir} has no checkpoint{{E}}.pt files") from None
        raise LawaError(f"{ckpt_dir} has no checkpoint{{E}}.pt files; it holds {other.layout} checkpoints "
                        f"({other.describe()}): read it with lawa_trajectory.find_trajectory")
    return dict(sorted(found.items()))


def parse_epochs(text: str | None, checkpoints) -> list[int]:
    """A sweep's ``--epochs``: end positions from ``'A:B'``, ``'A:B:STEP'`` (inclusive) or ``'E'``; ``None``: every
    checkpoint's. ``checkpoints`` is a ``{E: path}`` mapping or a :class:`lawa_trajectory.Trajectory`.

    >>> parse_epochs("4:10:2", find_checkpoints("runs/imagenet"))      # doctest: +SKIP
    [4, 6, 8, 10]

    Numbers name checkpoints by the number in their names (for a trajectory saved every 500 steps, ``'500:2000'``
    is 500, 1000, 1500, 2000: STEP defaults to the run's interval). Every end named must have a checkpoint.
    """
    from lawa_trajectory import Trajectory

    positions = list(checkpoints.positions) if isinstance(checkpoints, Trajectory) else sorted(checkpoints)
    if text is None:
        return positions
    interval = (checkpoints.interval if isinstance(checkpoints, Trajectory) else None) or 1
    try:
        parts = [int(p) for p in text.split(":")]
        step = parts[2] if len(parts) == 3 else interval
        ends = list(range(parts[0], parts[1] + 1, step)) if len(parts) > 1 else parts
    except (ValueError, IndexError):
        raise LawaError(f"--epochs must be 'A:B', 'A:B:STEP' or 'E', got '{text}'") from None
    if not ends or len(parts) > 3:
        raise LawaError(f"--epochs must be 'A:B', 'A:B:STEP' or 'E' with A ≤ B, got '{text}'")
    have = set(positions)
    missing = [e for e in ends if e not in have]
    if missing:
        if isinstance(checkpoints, Trajectory):
            raise LawaError(f"--epochs {text}: no checkpoint at {checkpoints.unit} {missing[0]} "
                            f"(have {checkpoints.describe()})")
        span = f"checkpoint{positions[0]}.pt..checkpoint{positions[-1]}.pt" if positions else "none"
        raise LawaError(f"--epochs {text}: no checkpoint{missing[0]}.pt (have {span})")
    return ends


def _plan_cells(
    checkpoints: Mapping[int, Any], ks: Iterable[int], ends: Iterable[int] | None
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Validate the request and list the (E, k) cells whose windows lie inside the trajectory."""
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise LawaError(f"window sizes must be positive integers, got {ks}")
    epochs = sorted(checkpoints)
    if not epochs:
        raise LawaError("no checkpoints given")
    ends = sorted(set(int(e) for e in ends)) if ends is not None else epochs
    first = epochs[0]
    for e in ends:
        if e not in checkpoints:
            raise LawaError(f"end epoch {e} has no checkpoint (have {epochs[0]}..{epochs[-1]})")
    span = epochs[-1] - first + 1
    for k in ks:
        if k > span:
            raise LawaError(f"k={k} is larger than the trajectory (epochs {first}..{epochs[-1]})")
    cells = []
    for e in ends:
        for k in ks:
            if e - k + 1 < first:
                continue  # the window would reach before the first checkpoint: not defined yet
            for i in window(e, k):
                if i not in checkpoints:
                    raise LawaError(f"checkpoint{i}.pt is missing (window {e - k + 1}..{e} needs it)")
            cells.append((e, k))
    return ks, ends, cells


def iter_window_averages(
    checkpoints,
    ks: Iterable[int],
    ends: Iterable[int] | None = None,
    *,
    method: str = "uni",
    alpha: float = DEFAULT_ALPHA,
    trust: bool = False,
    skip: Iterable[tuple[int, int]] = (),
    load=None,
) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """Yield ``(E, k, θ_E)`` — the ``method`` average of ``window(E, k)`` — reading each checkpoint once.

    ``checkpoints`` maps epoch → path (``find_checkpoints``, or a trajectory's index space
    ``Trajectory.checkpoints()``), or is a :class:`lawa_trajectory.Trajectory` itself: then ``ends``, ``skip``
    and the yielded E are positions (the numbers in the names), k counts checkpoints, and a window across a
    gap is refused. Cells are produced in order of E, then k;
    cells whose window would start before the first checkpoint are skipped, and so are those in ``skip``
    (already done in an earlier run). Only the max(k) latest model states are held (memory-mapped), and
    for each E all windows are built from one prefix sum running back from the newest checkpoint::

        S_k = Σ_{j<k} r^j θ_{E−j};   uni: θ = S_k / k (r = 1);   exp: θ = α S_k + r^k θ_{E−k+1} (r = 1−α)

    so the cost per end epoch is max(k) in-place adds whatever the number of k. A missing checkpoint
    inside a needed window, keys or shapes that differ, or NaN/Inf weights raise :class:`LawaError`.
    ``load(path) -> state`` replaces :func:`load_model_state` (tests count reads with it).
    """
    method_weights(method, 1, alpha)  # validates method and alpha
    from lawa_trajectory import Trajectory

    if isinstance(checkpoints, Trajectory):
        yield from _iter_trajectory_windows(checkpoints, ks, ends, method=method, alpha=alpha, trust=trust,
                                            skip=skip, load=load)
        return
    ks, ends, cells = _plan_cells(checkpoints, ks, ends)
    skip = set(skip)
    todo: dict[int, list[int]] = collections.defaultdict(list)
    for e, k in cells:
        if (e, k) not in skip:
            todo[e].append(k)
    if not todo:
        return
    needed = sorted({i for e, klist in todo.items() for i in window(e, max(klist))})
    load = load or (lambda p: load_model_state(p, trust=trust))
    r = 1.0 if method == "uni" else 1.0 - alpha
    held: dict[int, dict[str, torch.Tensor]] = {}
    reference: tuple[str, dict] | None = None
    for epoch in needed:
        source = checkpoints[epoch]
        # A mapping of in-memory states (with load=) is named by its key, not by printing a whole state.
        name = str(source) if isinstance(source, (str, os.PathLike)) else f"checkpoint {epoch}"
        state = load(source)
        if reference is None:
            reference = (name, state)
        else:
            check_compatible(reference[1], state, (reference[0], name))
        check_finite(state, name)
        held[epoch] = state
        if epoch in todo:
            klist = sorted(todo[epoch])
            yield from _windows_ending_at(held, epoch, klist, method, alpha, r)
        start = _next_needed_start(todo, epoch)
        for old in [i for i in held if i < start]:
            del held[old]  # no window still to come needs it


def _iter_trajectory_windows(run, ks, ends, *, skip, **options):
    """iter_window_averages on a Trajectory: ends and skip in positions, gaps refused, cells in positions."""
    ks = sorted(set(int(k) for k in ks))
    ends = list(run.positions) if ends is None else sorted(set(int(e) for e in ends))
    for k in ks:
        if k > len(run):
            raise LawaError(f"k={k} is larger than the trajectory ({run.describe()})")
    for e in ends:
        for k in ks:
            if k <= run.index(e):
                run.window(e, k)  # refuses a window across a gap, naming its two sides
    skip_index = {(run.index(e), k) for e, k in skip if e in run.positions}
    for end, k, state in iter_window_averages(run.checkpoints(), ks, [run.index(e) for e in ends],
                                              skip=skip_index, **options):
        yield run.position(end), k, state


def _next_needed_start(todo: Mapping[int, list[int]], epoch: int) -> int:
    """The earliest epoch any window still to be produced (ending after ``epoch``) needs."""
    starts = [e - max(kl) + 1 for e, kl in todo.items() if e > epoch]
    return min(starts, default=epoch + 1)


def _windows_ending_at(held, end, klist, method, alpha, r):
    newest = held[end]
    acc: dict[str, torch.Tensor] = {}
    for key, t in newest.items():
        if t.is_floating_point():
            acc[key] = torch.zeros(t.shape, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    j = 0
    for k in klist:
        while j < k:
            coeff = r**j
            for key, a in acc.items():
                t = held[end - j][key]
                a.add_(t if t.dtype == a.dtype else t.to(a.dtype), alpha=coeff)
            j += 1
        oldest = held[end - k + 1]
        out = {}
        for key, t in newest.items():
            if key not in acc:
                out[key] = t.clone()  # integer buffers come from the newest checkpoint
                continue
            if method == "uni":
                avg = acc[key] / k
            else:
                avg = torch.add(acc[key] * alpha, oldest[key].to(acc[key].dtype), alpha=r**k)
            out[key] = avg if avg.dtype == t.dtype else avg.to(t.dtype)
        yield end, k, out


# --------------------------------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def recompute_bn(
    model: torch.nn.Module,
    loader: Iterable,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Recompute BatchNorm running statistics of ``model`` as a cumulative average over ``loader``.

    Averaged weights do not match the averaged running statistics, so the paper recomputes them with a
    pass over the training set before evaluating θ^LAWA. Like ``torch.optim.swa_utils.update_bn``: every
    BN layer is reset and given ``momentum=None`` (a cumulative moving average); afterwards each layer's
    momentum and the model's train/eval mode are restored. ``num_batches`` limits the pass to the first N
    batches. Batches may be tensors or ``(input, target, ...)`` sequences. No-op without BN layers.

    >>> recompute_bn(model, train_loader, num_batches=50)   # doctest: +SKIP
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    try:
        for i, batch in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if device is not None:
                x = x.to(device, non_blocking=True)
            model(x)
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def add_average_args(avg: argparse.ArgumentParser) -> None:
    """The ``average`` command's flags, on ``avg`` (``python -m lawa_utils average`` and ``lawa average``).

    >>> parser = argparse.ArgumentParser(prog="lawa average")
    >>> add_average_args(parser)
    >>> args = parser.parse_args(["--dir", "out", "--k", "6", "--out", "lawa"])
    >>> average_command(args)                                # doctest: +SKIP
    """
    src = avg.add_argument_group("inputs: either --dir [--pattern] [--end] --k, or --files")
    src.add_argument("--dir", type=Path, help="a run directory in any layout LAWA recognises: checkpoint{E}.pt, "
                     "checkpoint_{E}_{U}.pt, checkpoint-{step}/, step{N}/ (or a hub cache models--ORG--NAME/), "
                     "Accelerate's checkpoint_{i}/, "
                     "epoch={E}-step={S}.ckpt, "
                     "checkpoint-{E}.pth.tar, model_{E}.pth, numbered DCP directories")
    src.add_argument("--pattern", help="names of the checkpoints in --dir when no layout fits, e.g. 'ep{E:03d}.pt' "
                     "({E} epochs, {E0} 0-based epochs, {S} steps, * any text)")
    src.add_argument("--end", type=int, help="the window's last checkpoint, by the number in its name "
                     "(default: the newest)")
    src.add_argument("--k", type=int, help="window size: the k latest checkpoints up to --end")
    src.add_argument("--files", type=Path, nargs="+", help="explicit checkpoint files or directories; ordered by "
                     "the numbers in their names when every name carries one, else taken oldest first as given")
    avg.add_argument("--method", choices=["uni", "exp"], default="uni", help="uniform (LAWA) or exponential")
    avg.add_argument("--alpha", type=float, default=None,
                     help=f"exp: weight of the newest checkpoint (default {DEFAULT_ALPHA})")
    avg.add_argument("--weights", metavar="KEY", help="average only this model-weight entry (e.g. state_dict_ema); "
                     "default: every entry, each on its own")
    avg.add_argument("--dtype", choices=sorted(DTYPES), help="cast the output (needed when a window mixes dtypes; "
                     "a torch-file output keeps its pickle, so cast into .safetensors or with --trust-checkpoints)")
    avg.add_argument("--copy-training-state", action="store_true",
                     help="also copy the newest input's optimizer, scheduler and RNG state")
    avg.add_argument("--out", type=Path, required=True,
                     help="output file, or a directory for directory layouts (HF, DCP); the newest input's layout")
    avg.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    avg.add_argument("--trust-checkpoints", action="store_true",
                     help="allow arbitrary unpickling (can run code): only for files from a source you trust")


def _build_parser(prog: str = "lawa_utils") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="LAWA checkpoint tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    avg = sub.add_parser(
        "average",
        help="average the k latest checkpoints of a run, or an explicit list of files",
        description="Average checkpoints into one output in the newest input's layout (Hugging Face, "
        "Lightning, timm, torchvision, DCP, fairseq, pytorch/examples, nanoGPT, plain state dict, safetensors).",
    )
    add_average_args(avg)
    return parser


def _average_inputs(args: argparse.Namespace):
    """The trajectory and the positions of the checkpoints to average, from --dir/--pattern/--end/--k or --files."""
    from lawa_trajectory import find_trajectory, trajectory_from_files

    if args.files and (args.dir or args.pattern or args.end is not None or args.k is not None):
        raise LawaError("give either --files or --dir [--pattern] [--end] --k, not both")
    if args.files:
        run = trajectory_from_files(args.files)
        if run.sorted_by_name:
            print(f"ordered by the numbers in their names ({run.unit}s {', '.join(map(str, run.positions))}), "
                  "not as given")
        return run, list(run.positions)
    if args.dir is None:
        raise LawaError("give --dir RUN --k K (or --files)")
    if args.k is None:
        raise LawaError("give --k, the number of checkpoints to average")
    run = find_trajectory(args.dir, pattern=args.pattern)
    end = run.positions[-1] if args.end is None else args.end
    return run, run.window(end, args.k)


def average_command(args: argparse.Namespace) -> None:
    """Run ``average`` from parsed :func:`add_average_args` flags; prints what was averaged, raises LawaError.

    >>> average_command(parser.parse_args(["--dir", "out", "--k", "6", "--out", "lawa"]))   # doctest: +SKIP
    """
    import lawa_io  # the containers (files and directories of every layout), read tensor by tensor

    if args.alpha is not None and args.method != "exp":
        raise LawaError(f"--alpha applies to --method exp, not {args.method}")
    run, positions = _average_inputs(args)
    files = [run.path(p) for p in positions]
    if args.out.exists() and not args.force:
        raise LawaError(f"{args.out} already exists; pass --force to overwrite it")
    weights = method_weights(args.method, len(files), DEFAULT_ALPHA if args.alpha is None else args.alpha)
    provenance = {"files": [str(f) for f in files], "weights": weights, "method": args.method,
                  "layout": run.layout, "unit": run.unit, "positions": positions}
    # Under torchrun/SLURM with several processes: join the group, so that a DCP run is averaged share by share
    # on the ranks (lawa_io) and published once; the same rendezvous and timeout as the sweeps.
    from lawa_sweep import _init_distributed

    rank, _, started = _init_distributed(None)
    readers = []
    try:
        for f in files:
            readers.append(lawa_io.open_checkpoint(f, trust=args.trust_checkpoints))
        report = lawa_io.average_checkpoints(
            readers, None if args.method == "uni" else weights, args.out,
            entries=[args.weights] if args.weights else None, dtype=DTYPES.get(args.dtype), force=args.force,
            copy_training_state=args.copy_training_state, provenance=provenance,
        )
    finally:
        for reader in readers:
            reader.close()
        if started:
            torch.distributed.destroy_process_group()
    if rank != 0:
        return  # rank 0 speaks for the job
    entries = ", ".join(map(str, report.get("entries") or []))
    _print_averaged(run, positions, weights, f"{args.method}, {readers[-1].layout} layout; entries averaged: "
                    f"{entries or 'none'}", args.out)
    for note in report.get("notes") or []:
        print(f"note: {note}")


def _print_averaged(run, positions: list[int], weights: list[float], what: str, out: Path) -> None:
    """What was averaged, printed once it is written: each input with its weight and number, then the output."""
    for p, w in zip(positions, weights, strict=True):
        where = "" if run.layout == "files" else f"  ({run.unit} {p})"
        print(f"  {w:.4f}  {run.path(p)}{where}")
    print(f"averaged {len(positions)} checkpoints ({what}) -> {out}")


def average_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lawa-average`` console script: ``lawa_utils average`` with the same flags."""
    return main(["average", *(sys.argv[1:] if argv is None else argv)])


def main(argv: Sequence[str] | None = None, *, prog: str = "lawa_utils") -> int:
    """Entry point of ``python -m lawa_utils``; returns the exit status (2 and one line on stderr for errors).

    >>> main(["average", "--dir", "runs/x", "--k", "6", "--out", "lawa.pt"], prog="lawa")   # doctest: +SKIP
    0

    ``prog`` names the command in usage and error lines (``lawa average`` passes ``"lawa"``).
    """
    args = _build_parser(prog).parse_args(argv)
    try:
        if args.command == "average":
            average_command(args)
    except LawaError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
