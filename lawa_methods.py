"""Averaging methods beyond uniform LAWA: EMA, SWA, EWA (spaced checkpoints) as one-pass sweeps, and TWA.

The sweeps have the shape of ``lawa_utils.iter_window_averages``: they yield ``(E, k, θ)`` cells, read every
checkpoint once per sweep (``lawa_utils.load_model_state`` or a ``load=`` hook), hold a bounded number of
states, take integer buffers (BatchNorm's ``num_batches_tracked``) from the newest checkpoint, refuse NaN/Inf
weights and raise :class:`lawa_utils.LawaError` with one line for bad input. A sweep script writes each cell
as rows ``method_label(...), k, E, …`` of the tidy CSV::

    import lawa_methods as lm, lawa_utils as lu
    ckpts = lu.find_checkpoints("runs/fmnist")
    for end, k, state in lm.iter_method_averages("ema", ckpts, decays=[0.5, 0.9]):
        model.load_state_dict(state)               # then recompute BN and evaluate, as for LAWA

What each method averages at end epoch E, and what the CSV's ``method`` and ``k`` columns hold
(f = the first checkpoint given; a checkpoint missing where one is needed is an error that names it):

=================  ===============================================  =============  ==============
method             checkpoints and weights                          ``method``     ``k``
=================  ===============================================  =============  ==============
EMA, decay d       ema_f = θ_f;  ema_E = d·ema_{E−1} + (1−d)·θ_E    ``ema``        round(1/(1−d))
SWA, start s       (1/k) Σ θ_i,  i = s … E                          ``swa``        E − s + 1
EWA, k, spacing s  (1/k) Σ θ_{E−j·s},  j = 0 … k−1                  ``ewa-s{s}``   k
=================  ===============================================  =============  ==============

- **EMA** runs over the whole saved trajectory from its first checkpoint (pass a sliced mapping to start
  later). Unrolled, θ_i gets (1−d)·d^(E−i) and θ_f the remainder d^(E−f): it is ``method_weights('exp', E−f+1,
  alpha=1−d)`` over every checkpoint so far. ``k`` holds the effective window 1/(1−d) rounded, exact for the
  recommended decays d = 1 − 1/k (k=2 → 0.5, k=10 → 0.9); two decays with the same label are refused.
- **SWA** (Izmailov et al., 2018) with start s is the LAWA window ``window(E, E−s+1)``: ``k`` keeps the
  repository's one meaning (the k latest checkpoints), and a curve with a fixed start is the rows with
  ``epoch − k + 1 == s``. A running sum per start makes every E cost one add.
- **EWA** (Sanyal et al., 2024, "Early Weight Averaging meets High Learning Rates for LLM Pre-training"):
  LAWA over checkpoints spaced s apart, E, E−s, …, E−(k−1)s. Their ``nanoGPT2-Experiments/EWA.py`` and
  ``lawa.py`` sort the saved checkpoints (saved at a fixed iteration interval) and average non-overlapping
  blocks of ``interval = NUM_MODELS = 5`` consecutive files, ``paths[i:i+5]`` for i = 0, 5, 10, …, writing each
  average under its last file's number. So their variants here are

  (a) *spaced* (the default): every E whose window reaches no earlier than f — a sliding window of spaced
      checkpoints, the paper's "checkpoints sampled with considerable spacing in training steps";
  (b) *blocks* (``blocks=True``, their script run on every s-th checkpoint from f): only the ends
      E_b = f + ((b+1)·k − 1)·s, b = 0, 1, …, whose windows {f + (b·k + j)·s : j < k} tile the spaced
      sub-trajectory without overlap. A block average *is* the spaced average at E_b (the same checkpoints),
      so (b) is a subset of the cells of (a) and shares its label. Their script also averaged a trailing
      block of fewer than 5 files (and silently skipped one of a single file); we yield complete blocks only.

  With s = 1, (a) is LAWA itself and (b) is LAWA at every k-th epoch. ``s`` goes into the ``method`` column
  (``ewa-s4``) because ``k`` alone would merge different spacings.

The sweep scripts (``imagenet/evaluate_lawa.py``, ``bert/evaluate_lawa.py``) share their ``--method`` flags
through this module: :func:`add_method_args` adds them, :func:`method_options` checks them (one line per
mistake) and returns :func:`iter_method_averages`' keywords, :func:`csv_method` gives the CSV label,
:func:`iter_sweep_cells` yields the cells still to do (method and baseline), :func:`split_methods` turns
``--method uni,exp,…`` into one namespace per method (one process sweeps several) and :func:`summary_table`
pivots the results for the summary a sweep prints::

    lm.add_method_args(parser)                              # --method --ks --alpha --decays --swa-starts …
    args = parser.parse_args()
    done = lu.done_cells(out, [lm.csv_method(args), "baseline"], ["val"], ["loss"], optimizer, seed)
    for label, end, k, state in lm.iter_sweep_cells(args, ckpts, None, done):
        ...                                                 # evaluate, lu.append_rows(out, rows)

TWA (Li et al., ICLR 2023, "Trainable Weight Averaging: Efficient Training by Optimizing Historical
Solutions") trains the averaging coefficients: SGD in the linear span of n checkpoints' parameters. See
:func:`build_subspace` (the orthonormal basis P, memory n × D floats, one block of rows per process) and
:class:`TWAProjector` (the gradient replaced by Pᵀ(P g), all-reduced across processes: exact)::

    sub = lm.build_subspace(model, ckpts, lm.twa_epochs(ckpts, "60:70"))
    model.load_state_dict(sub.start_state("mean"))                     # the SWA point
    optimizer = torch.optim.SGD(model.parameters(), lr=2, momentum=0.9)   # no weight_decay here …
    projector = lm.TWAProjector(sub.basis, sub.names, weight_decay=1e-5)  # … it goes into the projection
    scheduler = lm.twa_scheduler(optimizer, "step", epochs=2, iters_per_epoch=len(loader))
    for x, y in loader:                                                # for each of the 2 epochs
        optimizer.zero_grad(); F.cross_entropy(model(x), y).backward()
        projector.project_(model); optimizer.step(); scheduler.step()
"""

from __future__ import annotations

import argparse
import collections
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

import lawa_utils as lu
from lawa_utils import LawaError, check_compatible, check_finite

__all__ = [
    "CLI_METHODS",
    "DEFAULT_KS",
    "METHODS",
    "METHOD_FLAGS",
    "TWA_SCHEDULES",
    "Subspace",
    "TWAProjector",
    "add_method_args",
    "build_subspace",
    "csv_method",
    "default_max_bytes",
    "ema_label",
    "ewa_window",
    "flatten_params",
    "iter_ema_averages",
    "iter_ewa_averages",
    "iter_method_averages",
    "iter_runs_cells",
    "iter_swa_averages",
    "iter_sweep_cells",
    "method_label",
    "method_options",
    "orthonormalize_rows_",
    "param_names",
    "parse_ks",
    "parse_list",
    "row_block",
    "split_methods",
    "summary_table",
    "twa_epochs",
    "twa_lr_factor",
    "twa_memory_bytes",
    "twa_scheduler",
]

# The CSV's method column for every sweep method (lawa and exp come from lawa_utils.iter_window_averages).
METHODS = ("lawa", "exp", "ema", "swa", "ewa")
TWA_SCHEDULES = ("step", "constant", "linear")

Cell = tuple[int, int, dict[str, torch.Tensor]]


# --------------------------------------------------------------------------------------------------
# Shared machinery of the sweeps
# --------------------------------------------------------------------------------------------------


def _name(checkpoints: Mapping[int, Any], epoch: int) -> str:
    value = checkpoints[epoch]
    return str(value) if isinstance(value, (str, os.PathLike)) else f"checkpoint{epoch}"


class _Reader:
    """Loads states (each call one file), checks them against the first one read and for NaN/Inf."""

    def __init__(self, checkpoints: Mapping[int, Any], load: Callable | None, trust: bool):
        self.checkpoints = checkpoints
        self.load = load or (lambda p: lu.load_model_state(p, trust=trust))
        self.reference: tuple[str, dict] | None = None

    def __call__(self, epoch: int) -> dict[str, torch.Tensor]:
        name = _name(self.checkpoints, epoch)
        state = self.load(self.checkpoints[epoch])
        if self.reference is None:
            self.reference = (name, state)
        else:
            check_compatible(self.reference[1], state, (self.reference[0], name))
        check_finite(state, name)
        return state


def _ends(checkpoints: Mapping[int, Any], ends: Iterable[int] | None) -> list[int]:
    if not checkpoints:
        raise LawaError("no checkpoints given")
    epochs = sorted(checkpoints)
    if ends is None:
        return epochs
    ends = sorted({int(e) for e in ends})
    for e in ends:
        if e not in checkpoints:
            raise LawaError(f"end epoch {e} has no checkpoint (have {epochs[0]}..{epochs[-1]})")
    return ends


def _require(checkpoints: Mapping[int, Any], epochs: Iterable[int], why: str) -> None:
    for i in epochs:
        if i not in checkpoints:
            raise LawaError(f"checkpoint{i}.pt is missing ({why} needs it)")


def _accumulator(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float32 zeros for every floating tensor (float64 stays float64), as lawa_utils accumulates."""
    return {
        key: torch.zeros(t.shape, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
        for key, t in state.items()
        if t.is_floating_point()
    }


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _finish(acc: Mapping[str, torch.Tensor], newest: Mapping[str, torch.Tensor], scale: float = 1.0) -> dict:
    """``scale · acc`` in each tensor's own dtype; integer tensors copied from the newest state."""
    out = {}
    for key, t in newest.items():
        if key in acc:
            out[key] = _as(acc[key] * scale if scale != 1.0 else acc[key].clone(), t.dtype)
        else:
            out[key] = t.clone()
    return out


# --------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------


def ema_label(decay: float) -> int:
    """The ``k`` column of an EMA with ``decay``: its effective window 1/(1−d), rounded (d=0.9 → 10)."""
    if not (isinstance(decay, (int, float)) and 0.0 <= decay < 1.0):
        raise LawaError(f"EMA decay must be in [0, 1), got {decay}")
    return round(1.0 / (1.0 - decay))


def iter_ema_averages(
    checkpoints: Mapping[int, Any],
    decays: Iterable[float],
    ends: Iterable[int] | None = None,
    *,
    trust: bool = False,
    skip: Iterable[tuple[int, int]] = (),
    load: Callable | None = None,
) -> Iterator[Cell]:
    """Yield ``(E, ema_label(d), ema_E)`` for every E in ``ends`` (default: all) and every decay d.

    ema_f = θ_f at the first checkpoint f, then ema_E = d·ema_{E−1} + (1−d)·θ_E for every epoch up to the
    last end needed, so the epochs f … max(ends) must all be there. One float32 state per decay.

    >>> [(e, k) for e, k, _ in iter_ema_averages(ckpts, [0.5, 0.9], ends=[3])]    # doctest: +SKIP
    [(3, 2), (3, 10)]
    """
    decays = [float(d) for d in decays]
    if not decays:
        raise LawaError("EMA needs at least one decay")
    labels: dict[int, float] = {}
    for d in decays:
        label = ema_label(d)
        if label in labels and labels[label] != d:
            raise LawaError(f"EMA decays {labels[label]} and {d} share the label k={label}; use d = 1 − 1/k")
        labels[label] = d
    ends = _ends(checkpoints, ends)
    skip = set(skip)
    todo = {e: [k for k in sorted(labels) if (e, k) not in skip] for e in ends}
    todo = {e: ks for e, ks in todo.items() if ks}
    if not todo:
        return
    first, last = min(checkpoints), max(todo)
    _require(checkpoints, range(first, last + 1), f"the EMA from epoch {first} to {last}")
    read = _Reader(checkpoints, load, trust)
    acc: dict[int, dict[str, torch.Tensor]] = {}
    for epoch in range(first, last + 1):
        state = read(epoch)
        for label, d in labels.items():
            if epoch == first:
                acc[label] = _accumulator(state)
                for key, a in acc[label].items():
                    a.copy_(state[key])
            else:
                for key, a in acc[label].items():
                    a.mul_(d).add_(_as(state[key], a.dtype), alpha=1.0 - d)
        for label in todo.get(epoch, []):
            yield epoch, label, _finish(acc[label], state)


# --------------------------------------------------------------------------------------------------
# SWA
# --------------------------------------------------------------------------------------------------


def iter_swa_averages(
    checkpoints: Mapping[int, Any],
    starts: Iterable[int],
    ends: Iterable[int] | None = None,
    *,
    trust: bool = False,
    skip: Iterable[tuple[int, int]] = (),
    load: Callable | None = None,
) -> Iterator[Cell]:
    """Yield ``(E, E−s+1, mean of θ_s … θ_E)`` for every E in ``ends`` and every start s ≤ E.

    Cells come in order of E, then k. A running sum per start: one add per checkpoint and start, one
    float32 state per start. The SWA point of start s at E equals the LAWA window ``window(E, E−s+1)``.

    >>> [(e, k) for e, k, _ in iter_swa_averages(ckpts, [2], ends=[2, 3, 4])]     # doctest: +SKIP
    [(2, 1), (3, 2), (4, 3)]
    """
    starts = sorted({int(s) for s in starts})
    if not starts:
        raise LawaError("SWA needs at least one start epoch")
    for s in starts:
        if s not in checkpoints:
            raise LawaError(f"SWA start epoch {s} has no checkpoint (have {min(checkpoints)}..{max(checkpoints)})")
    ends = _ends(checkpoints, ends)
    skip = set(skip)
    todo = {e: [e - s + 1 for s in reversed(starts) if s <= e and (e, e - s + 1) not in skip] for e in ends}
    todo = {e: ks for e, ks in todo.items() if ks}
    if not todo:
        return
    last = max(todo)
    _require(checkpoints, range(starts[0], last + 1), f"SWA from epoch {starts[0]} to {last}")
    read = _Reader(checkpoints, load, trust)
    sums: dict[int, dict[str, torch.Tensor]] = {}
    for epoch in range(starts[0], last + 1):
        state = read(epoch)
        if epoch in starts:
            sums[epoch] = _accumulator(state)
        for acc in sums.values():
            for key, a in acc.items():
                a.add_(_as(state[key], a.dtype))
        for k in todo.get(epoch, []):
            yield epoch, k, _finish(sums[epoch - k + 1], state, 1.0 / k)


# --------------------------------------------------------------------------------------------------
# EWA: spaced checkpoints, sliding or in non-overlapping blocks
# --------------------------------------------------------------------------------------------------


def ewa_window(end: int, k: int, spacing: int) -> range:
    """Epochs averaged by EWA at ``end``: E−(k−1)s, …, E−s, E (k checkpoints, oldest first)."""
    if k < 1 or spacing < 1:
        raise LawaError(f"EWA needs k ≥ 1 and spacing ≥ 1, got k={k}, spacing={spacing}")
    return range(end - (k - 1) * spacing, end + 1, spacing)


def iter_ewa_averages(
    checkpoints: Mapping[int, Any],
    ks: Iterable[int],
    spacing: int = 1,
    ends: Iterable[int] | None = None,
    *,
    blocks: bool = False,
    trust: bool = False,
    skip: Iterable[tuple[int, int]] = (),
    load: Callable | None = None,
) -> Iterator[Cell]:
    """Yield ``(E, k, (1/k) Σ_j θ_{E−j·s})`` for the windows ``ewa_window(E, k, spacing)``.

    Every E in ``ends`` (default: all) whose window starts no earlier than the first checkpoint f; with
    ``blocks=True`` only the block ends E = f + ((b+1)·k − 1)·s of Sanyal et al.'s script (module docstring).
    Only checkpoints some window uses are read, each once; a state is held until the last window that needs
    it, i.e. at most (max k − 1)·s + 1 of them (memory-mapped). Windows ending at one E share a running sum.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise LawaError(f"EWA window sizes must be positive integers, got {ks}")
    if not isinstance(spacing, int) or spacing < 1:
        raise LawaError(f"EWA spacing must be a positive integer, got {spacing}")
    ends = _ends(checkpoints, ends)
    first = min(checkpoints)
    skip = set(skip)
    todo: dict[int, list[int]] = collections.defaultdict(list)
    for e in ends:
        for k in ks:
            start = e - (k - 1) * spacing
            if start < first or (e, k) in skip:
                continue
            if blocks and ((e - first) % spacing or ((e - first) // spacing + 1) % k):
                continue
            _require(checkpoints, ewa_window(e, k, spacing), f"EWA window {start}..{e} spaced {spacing}")
            todo[e].append(k)
    if not todo:
        return
    last_use: dict[int, int] = {}
    for e, klist in todo.items():
        for i in ewa_window(e, max(klist), spacing):
            last_use[i] = max(last_use.get(i, e), e)
    read = _Reader(checkpoints, load, trust)
    held: dict[int, dict[str, torch.Tensor]] = {}
    for epoch in sorted(last_use):
        held[epoch] = read(epoch)
        if epoch in todo:
            newest, acc = held[epoch], _accumulator(held[epoch])
            window = list(reversed(ewa_window(epoch, max(todo[epoch]), spacing)))  # newest first
            j = 0
            for k in todo[epoch]:  # ascending: the sum over the j newest grows into the next window
                for i in window[j:k]:
                    for key, a in acc.items():
                        a.add_(_as(held[i][key], a.dtype))
                j = k
                yield epoch, k, _finish(acc, newest, 1.0 / k)
        for done in [i for i in held if last_use[i] <= epoch]:
            del held[done]


# --------------------------------------------------------------------------------------------------
# One entry point for sweep scripts
# --------------------------------------------------------------------------------------------------


def method_label(method: str, *, spacing: int = 1) -> str:
    """The CSV ``method`` column for a sweep method: the name itself, or ``ewa-s{spacing}`` for EWA."""
    if method not in METHODS:
        raise LawaError(f"unknown averaging method '{method}' (choose {', '.join(METHODS)})")
    return f"ewa-s{spacing}" if method == "ewa" else method


def iter_method_averages(
    method: str,
    checkpoints: Mapping[int, Any],
    *,
    ks: Iterable[int] = (),
    decays: Iterable[float] = (),
    starts: Iterable[int] = (),
    spacing: int = 1,
    blocks: bool = False,
    alpha: float = lu.DEFAULT_ALPHA,
    ends: Iterable[int] | None = None,
    trust: bool = False,
    skip: Iterable[tuple[int, int]] = (),
    load: Callable | None = None,
) -> Iterator[Cell]:
    """Dispatch a sweep by the CSV's method name: ``lawa``/``exp`` (``ks``, ``alpha``), ``ema`` (``decays``),
    ``swa`` (``starts``), ``ewa`` (``ks``, ``spacing``, ``blocks``). Write rows with ``method_label``.

    >>> cells = iter_method_averages("swa", ckpts, starts=[5], skip=done)       # doctest: +SKIP
    """
    common = {"trust": trust, "skip": skip, "load": load}
    if method in ("lawa", "exp"):
        if not ks:
            raise LawaError(f"{method} needs window sizes k")
        return lu.iter_window_averages(checkpoints, ks, ends, method="uni" if method == "lawa" else "exp",
                                       alpha=alpha, **common)
    if method == "ema":
        return iter_ema_averages(checkpoints, decays, ends, **common)
    if method == "swa":
        return iter_swa_averages(checkpoints, starts, ends, **common)
    if method == "ewa":
        if not ks:
            raise LawaError("ewa needs window sizes k")
        return iter_ewa_averages(checkpoints, ks, spacing, ends, blocks=blocks, **common)
    raise LawaError(f"unknown averaging method '{method}' (choose {', '.join(METHODS)})")


# --------------------------------------------------------------------------------------------------
# The sweep scripts' --method flags (imagenet/evaluate_lawa.py, bert/evaluate_lawa.py)
# --------------------------------------------------------------------------------------------------

# --method → the name iter_method_averages (and the CSV's method column, but for EWA's spacing) uses for it.
CLI_METHODS = {"uni": "lawa", "exp": "exp", "ema": "ema", "swa": "swa", "ewa": "ewa"}
# Flags that belong to one or a few methods; given to another they are refused rather than ignored.
METHOD_FLAGS = {"ks": ("uni", "exp", "ewa"), "alpha": ("exp",), "decays": ("ema",), "swa_starts": ("swa",),
                "spacing": ("ewa",), "ewa_blocks": ("ewa",)}
DEFAULT_KS = "2,4,6,8,10"


def add_method_args(parser: argparse.ArgumentParser, default_ks: str = DEFAULT_KS) -> None:
    """Add ``--method uni|exp|ema|swa|ewa`` and its flags (``--ks``, ``--alpha``, ``--decays``,
    ``--swa-starts``, ``--spacing``, ``--ewa-blocks``) to a sweep script's parser; :func:`method_options`
    turns the parsed flags into :func:`iter_method_averages`' keywords. ``--ks`` defaults to ``default_ks``
    (kept as ``args.default_ks``) for the methods that take it."""
    parser.add_argument("--method", default="uni", metavar="M[,M…]",
                        help="uni: LAWA's uniform average (default); exp: the paper's Appendix C exponential "
                        "weights; ema: exponential moving average; swa: the mean from a start epoch; ewa: "
                        "LAWA over checkpoints spaced s epochs apart. Several, comma-separated, are swept in "
                        "one process (one set-up; each method's flags apply to it alone)")
    parser.add_argument("--ks", default=None, help=f"uni, exp, ewa: window sizes k, comma-separated "
                        f"(default: {default_ks})")
    parser.add_argument("--alpha", type=float, default=None,
                        help=f"exp: weight of the newest checkpoint (default {lu.DEFAULT_ALPHA})")
    parser.add_argument("--decays", default=None, metavar="D,...",
                        help="ema: decays d per epoch, comma-separated, e.g. 0.5,0.75 (k column: 1/(1−d))")
    parser.add_argument("--swa-starts", default=None, metavar="S,...",
                        help="swa: start epochs s, comma-separated; the SWA point at E averages s..E")
    parser.add_argument("--spacing", type=int, default=None, metavar="S",
                        help="ewa: epochs between the averaged checkpoints (1 would be LAWA)")
    parser.add_argument("--ewa-blocks", action="store_true",
                        help="ewa: only the non-overlapping blocks of Sanyal et al.'s script, not every E")
    parser.set_defaults(default_ks=default_ks)


def parse_ks(text: str) -> list[int]:
    """``--ks``: distinct window sizes k ≥ 2, sorted (k=1 is the plain checkpoint: the baseline rows)."""
    try:
        ks = sorted({int(k) for k in text.split(",")})
    except ValueError:
        raise LawaError(f"--ks must be comma-separated integers such as 2,4,6, got '{text}'") from None
    if ks[0] < 2:
        raise LawaError(f"--ks must be ≥ 2 (k=1 is the plain checkpoint: the baseline rows), got '{text}'")
    return ks


def parse_list(text: str | None, kind: Callable, flag: str, example: str, method: str) -> list:
    """A comma-separated ``flag`` that ``--method method`` needs, each value converted by ``kind``."""
    if text is None:
        raise LawaError(f"--method {method} needs {flag}, e.g. {flag} {example}")
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise LawaError(f"{flag} must be comma-separated numbers such as {example}, got '{text}'") from None


def method_options(args: argparse.Namespace) -> dict:
    """:func:`iter_method_averages`' keywords for ``args.method`` (flags from :func:`add_method_args`): a
    method's flags are required (or defaulted, ``--ks``), flags of other methods refused."""
    for flag, methods in METHOD_FLAGS.items():
        if getattr(args, flag) not in (None, False) and args.method not in methods:
            raise LawaError(f"--{flag.replace('_', '-')} applies to --method {' or '.join(methods)}, "
                            f"not {args.method}")
    default_ks = getattr(args, "default_ks", DEFAULT_KS)
    if args.method in ("uni", "exp"):
        return {"ks": parse_ks(args.ks or default_ks), "alpha": lu.DEFAULT_ALPHA if args.alpha is None else args.alpha}
    if args.method == "ema":
        return {"decays": parse_list(args.decays, float, "--decays", "0.5,0.75", "ema")}
    if args.method == "swa":
        return {"starts": parse_list(args.swa_starts, int, "--swa-starts", "6", "swa")}
    if args.spacing is None:
        raise LawaError("--method ewa needs --spacing, e.g. --spacing 2")
    return {"ks": parse_ks(args.ks or default_ks), "spacing": args.spacing, "blocks": args.ewa_blocks}


def split_methods(args: argparse.Namespace) -> list[argparse.Namespace]:
    """``--method m1,m2,…`` → one namespace per method (in the order given, duplicates dropped), each with
    only its own method flags (``method_options`` checked on each). A flag that none of the methods takes is
    refused. The baseline cells go with one of them (uni's, where the baseline rides in LAWA's pass, else the
    last); the others get ``no_baseline``."""
    methods = list(dict.fromkeys(m.strip() for m in str(args.method).split(",")))
    unknown = [m for m in methods if m not in CLI_METHODS]
    if unknown or not methods:
        raise LawaError(f"--method {args.method}: unknown method '{(unknown or [''])[0]}'; choose from "
                        f"{', '.join(CLI_METHODS)} (several: comma-separated)")
    for flag, owners in METHOD_FLAGS.items():
        if getattr(args, flag) not in (None, False) and not set(methods) & set(owners):
            raise LawaError(f"--{flag.replace('_', '-')} applies to --method {' or '.join(owners)}, "
                            f"not {args.method}")
    runs = []
    for method in methods:
        unset = {flag: False if flag == "ewa_blocks" else None  # as if not given: the flag is another's
                 for flag, owners in METHOD_FLAGS.items() if method not in owners}
        run = argparse.Namespace(**{**vars(args), **unset, "method": method})
        method_options(run)
        runs.append(run)
    keeper = next((run for run in runs if run.method == "uni"), runs[-1])
    for run in runs:
        run.no_baseline = getattr(args, "no_baseline", False) or run is not keeper
    return runs


def csv_method(args: argparse.Namespace) -> str:
    """The CSV's method column for ``args.method``: lawa, exp, ema, swa or ewa-s{spacing}."""
    return method_label(CLI_METHODS[args.method], spacing=args.spacing or 1)


def iter_sweep_cells(
    args: argparse.Namespace,
    checkpoints: Mapping[int, Any],
    ends: Iterable[int] | None,
    done: Mapping[str, set[tuple[int, int]]],
    *,
    baseline_in_pass: bool = False,
    load: Callable | None = None,
) -> Iterator[tuple[str, int, int, dict[str, torch.Tensor]]]:
    """``(CSV method, E, k, state)`` for every cell of a sweep script still to do: ``--method``'s averages
    (:func:`iter_method_averages`, every checkpoint read once) and then, unless ``args.no_baseline``, the
    baseline (k=1: the plain checkpoints, CSV method ``baseline``) in a second pass over the checkpoints
    whose baseline cell is still to do. ``args`` holds :func:`add_method_args`' flags, ``no_baseline`` and
    ``trust_checkpoints``.

    ``done`` maps CSV method → (E, k) cells already in the results (``lawa_utils.done_cells``); they are
    skipped. ``baseline_in_pass=True`` with ``--method uni`` takes the baseline's windows of one in the LAWA
    pass instead (a uniform window of one is the checkpoint itself, bit for bit): every file is read once in
    all, and cells come in order of E. ``load=lambda path: {}`` plans without reading: it validates every
    window (a missing checkpoint is named) and counts the cells.
    """
    label, options = csv_method(args), method_options(args)
    trust, baseline = args.trust_checkpoints, not args.no_baseline
    skip_base = set(done.get("baseline", ()))
    if baseline_in_pass and args.method == "uni" and baseline:
        skip = {cell for cell in done.get(label, ()) if cell[1] > 1} | {cell for cell in skip_base if cell[1] == 1}
        options = {**options, "ks": [1, *options["ks"]]}
        cells = iter_method_averages("lawa", checkpoints, ends=ends, trust=trust, skip=skip, load=load, **options)
        yield from (("baseline" if k == 1 else label, end, k, state) for end, k, state in cells)
        return
    cells = iter_method_averages(CLI_METHODS[args.method], checkpoints, ends=ends, trust=trust,
                                 skip=done.get(label, ()), load=load, **options)
    yield from ((label, end, k, state) for end, k, state in cells)
    if baseline:
        cells = lu.iter_window_averages(checkpoints, [1], ends, trust=trust, skip=skip_base, load=load)
        yield from (("baseline", end, k, state) for end, k, state in cells)


def iter_runs_cells(runs: Iterable[argparse.Namespace], *args: Any, **kwargs: Any):
    """:func:`iter_sweep_cells` for each namespace of :func:`split_methods`, one method after another."""
    for run in runs:
        yield from iter_sweep_cells(run, *args, **kwargs)


def summary_table(results, label: str, *, optimizer: str, seed: int, split: str, metric: str):
    """A sweep's summary, from its tidy results (a DataFrame, ``lawa_utils.read_results``): ``split``'s
    ``metric`` for each end epoch E (rows), for the baseline and each curve of ``label`` (columns: a k; for
    SWA a start s = E − k + 1, whose k grows with E)."""
    rows = results[(results["optimizer"].astype(str) == optimizer) & (results["seed"] == seed).fillna(False)
                   & (results["split"] == split) & (results["metric"] == metric)
                   & results["method"].isin(["baseline", label])]
    swa = rows["method"] == "swa"  # an SWA curve is a start s; its k grows with E
    number = rows["k"].where(~swa, rows["epoch"] - rows["k"] + 1).astype(str)
    rows = rows.assign(curve=("k=" + number).where(~swa, "s=" + number))
    table = rows.pivot_table(index="epoch", columns=["method", "curve"], values="value", aggfunc="last")
    return table[sorted(table.columns, key=lambda c: (c[0] != "baseline", c[0], int(c[1][2:])))]  # k=2 < k=10


# --------------------------------------------------------------------------------------------------
# TWA: the subspace
# --------------------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Look through DDP/DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def param_names(model: torch.nn.Module) -> list[str]:
    """The trainable parameters TWA flattens, in ``named_parameters`` order (tied weights once, no buffers)."""
    return [name for name, p in _unwrap(model).named_parameters() if p.requires_grad]


def flatten_params(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """The parameters ``names`` of a state dict as one float32 vector (a row of W)."""
    return torch.cat([state[n].reshape(-1).float() for n in names])


def twa_epochs(checkpoints: Mapping[int, Any], spec: str | tuple[int, int]) -> list[int]:
    """Epochs a … b (inclusive, like every window here) from ``"a:b"``; all must be in ``checkpoints``."""
    if not checkpoints:
        raise LawaError("no checkpoints given")
    if isinstance(spec, str):
        try:
            first, last = (int(p) for p in spec.split(":"))
        except ValueError:
            raise LawaError(f"TWA range must be 'A:B' (epochs A..B inclusive), got '{spec}'") from None
    else:
        first, last = spec
    have = f"checkpoint{min(checkpoints)}.pt..checkpoint{max(checkpoints)}.pt"
    if first > last:
        raise LawaError(f"TWA range {first}:{last} is empty (A must be ≤ B)")
    if first < min(checkpoints) or last > max(checkpoints):
        raise LawaError(f"TWA range {first}:{last} lies outside the trajectory ({have})")
    _require(checkpoints, range(first, last + 1), f"TWA range {first}:{last}")
    return list(range(first, last + 1))


def row_block(n: int, rank: int, world_size: int) -> range:
    """The rows of W (and P) that process ``rank`` of ``world_size`` holds: a contiguous, near-equal block."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def twa_memory_bytes(n_rows: int, num_params: int) -> int:
    """Bytes TWA's subspace needs in one process: its rows of W, turned into P in place (n × D float32),
    plus two float64 working vectors and the float32 mean (20 × D). The model, its gradient and momentum
    come on top, as for any training."""
    return 4 * n_rows * num_params + 20 * num_params


def default_max_bytes(fraction: float = 0.5) -> int:
    """``fraction`` of this machine's physical memory (os.sysconf), the default limit for TWA's subspace."""
    try:
        return int(fraction * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): do not refuse on a guess
        return 1 << 62


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.3g} MB"


def _world(distributed: bool | None) -> tuple[int, int]:
    """(rank, world size); ``distributed=None`` uses torch.distributed's default group when initialised."""
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise LawaError("distributed=True but torch.distributed is not initialised (init_process_group)")
    return dist.get_rank(), dist.get_world_size()


# Columns per float64 chunk in Gram–Schmidt: temporaries stay at (rows × 2^20 × 8) bytes whatever D is.
_CHUNK = 1 << 20


def _span_component(basis: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
    """out = basisᵀ (basis v) in float64, chunk by chunk over the columns (basis is float32)."""
    out.zero_()
    if len(basis) == 0:
        return
    coeff = torch.zeros(len(basis), dtype=torch.float64, device=v.device)
    for s in range(0, v.numel(), _CHUNK):
        coeff += basis[:, s : s + _CHUNK].double() @ v[s : s + _CHUNK]
    for s in range(0, v.numel(), _CHUNK):
        out[s : s + _CHUNK] = coeff @ basis[:, s : s + _CHUNK].double()


@torch.no_grad()
def orthonormalize_rows_(rows: torch.Tensor, *, rtol: float = 1e-6, distributed: bool | None = None) -> list[bool]:
    """Turn ``rows`` (this process's block of W, float32, n_r × D) into orthonormal rows of P, in place.

    Method: classical Gram–Schmidt applied twice per row ("twice is enough", Giraud, Langou & Rozložník 2005),
    in float64, over the rows in global order (rank 0's block first). Checkpoints of one trajectory are
    nearly parallel, so each new direction is a small difference of large vectors: one pass of Gram–Schmidt
    (the reference code's) loses orthogonality in proportion to that ill-conditioning, the second pass
    restores it to rounding level; float64 keeps the small differences accurate. Householder QR of Wᵀ would
    be as stable but needs Wᵀ and Q in float64 (4× the memory of W) on one process. Rows are stored back in
    float32, so P Pᵀ = I to about 1e-6.

    A row whose part outside the span of the rows before it is below ``rtol`` × its norm is dropped as
    linearly dependent (a repeated checkpoint; float32 weights carry no information below ~1e-7 relative).
    Kept rows are compacted to the front: P's block is ``rows[:sum(kept)]``; returns this process's kept flags.

    Several processes (``distributed``): each row is broadcast by its owner, every process projects it on its
    own kept rows and the corrections are all-reduced, so each process holds only its block of W and P.
    """
    rank, world = _world(distributed)
    counts = torch.zeros(world, dtype=torch.int64)
    counts[rank] = len(rows)
    if world > 1:
        dist.all_reduce(counts)
    dim = rows.shape[1]
    v = torch.empty(dim, dtype=torch.float64, device=rows.device)
    correction = torch.empty_like(v)
    kept: list[bool] = []
    n_kept = 0
    for owner in range(world):
        for j in range(int(counts[owner])):
            if rank == owner:
                v.copy_(rows[j])
            if world > 1:
                dist.broadcast(v, src=owner)
            norm0 = float(v.norm())
            for _ in range(2):
                _span_component(rows[:n_kept], v, correction)
                if world > 1:
                    dist.all_reduce(correction)
                v.sub_(correction)
            norm = float(v.norm())
            keep = norm0 > 0.0 and norm > rtol * norm0
            if rank == owner:
                if keep:  # n_kept ≤ j: row j has been read, rows after it are untouched
                    rows[n_kept].copy_(v.div_(norm))
                    n_kept += 1
                kept.append(keep)
    return kept


@dataclass
class Subspace:
    """What :func:`build_subspace` returns: this process's rows of P and the points TWA starts from."""

    basis: torch.Tensor  # this process's rows of P (m_r × D, float32); all processes' rows are orthonormal
    names: list[str]  # the parameters, in the order of P's columns
    mean: torch.Tensor  # (1/n) Σ θ_i over the n checkpoints: the SWA point, float32 (D)
    newest: dict[str, torch.Tensor]  # the last checkpoint of the range (buffers, and init="last")
    epochs: list[int]  # the checkpoints that span the subspace
    dim: int  # rows of P over all processes (n minus the dropped ones)
    dropped: list[int] = field(default_factory=list)  # epochs dropped as linearly dependent (all processes)
    tied: dict[str, str] = field(default_factory=dict)  # state-dict key → the parameter it shares (tied weights)

    def start_state(self, init: str = "mean") -> dict[str, torch.Tensor]:
        """A full state dict to load: parameters at the mean ("mean", TWA's default) or at the last
        checkpoint ("last"); buffers (BatchNorm statistics) from the last checkpoint — recompute them."""
        if init not in ("mean", "last"):
            raise LawaError(f"TWA init must be 'mean' or 'last', got '{init}'")
        state = {k: v.clone() for k, v in self.newest.items()}
        if init == "mean":
            offset = 0
            for n in self.names:
                size = state[n].numel()
                state[n] = self.mean[offset : offset + size].view(state[n].shape).to(state[n].dtype, copy=True)
                offset += size
            for alias, n in self.tied.items():  # load_state_dict copies every key: aliases must agree
                if alias in state:
                    state[alias] = state[n]
        return state


def _check_params(state: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], name: str) -> None:
    for key, shape in shapes.items():
        if key not in state:
            raise LawaError(f"{name} has no parameter '{key}' that the model has (wrong --arch or checkpoints?)")
        if state[key].shape != shape:
            raise LawaError(f"{name}: '{key}' has shape {tuple(state[key].shape)}, the model {tuple(shape)}")
        if not state[key].is_floating_point():
            raise LawaError(f"{name}: parameter '{key}' is not a floating-point tensor")


@torch.no_grad()
def build_subspace(
    model: torch.nn.Module,
    checkpoints: Mapping[int, Any],
    epochs: Sequence[int],
    *,
    rtol: float = 1e-6,
    max_bytes: int | None = None,
    distributed: bool | None = None,
    trust: bool = False,
    load: Callable | None = None,
) -> Subspace:
    """Flatten the trainable parameters of the checkpoints ``epochs`` into W (n × D) and orthonormalise its
    rows into P (:func:`orthonormalize_rows_`); also return their mean and the last checkpoint's state.

    Memory: W/P is n × D float32 (4nD bytes; ResNet-50, D = 25.6M: 102 MB per checkpoint), orthonormalised in
    place, plus 20D bytes of work and the mean (:func:`twa_memory_bytes`). Over several processes each holds
    only its :func:`row_block` of n. More than ``max_bytes`` (default :func:`default_max_bytes`, half the
    physical memory) is refused before anything is read. Each process reads its rows' checkpoints once, and
    the last one of the range for its buffers. Every process must call this (it communicates).
    """
    epochs = list(epochs)
    if not epochs:
        raise LawaError("TWA needs at least one checkpoint")
    _require(checkpoints, epochs, "the TWA subspace")
    rank, world = _world(distributed)
    names = param_names(model)
    if not names:
        raise LawaError("the model has no trainable parameters")
    module = _unwrap(model)
    shapes = {n: p.shape for n, p in module.named_parameters() if p.requires_grad}
    canonical = {id(p): n for n, p in module.named_parameters()}
    tied = {n: canonical[id(p)] for n, p in module.named_parameters(remove_duplicate=False)
            if canonical[id(p)] != n and canonical[id(p)] in shapes}
    dim = sum(math.prod(s) for s in shapes.values())
    mine = [epochs[i] for i in row_block(len(epochs), rank, world)]
    need = twa_memory_bytes(len(mine), dim)
    limit = default_max_bytes() if max_bytes is None else max_bytes
    if need > limit:
        raise LawaError(
            f"TWA needs {_size(need)} per process for its subspace ({len(mine)} checkpoints × {dim:,} "
            f"parameters × 4 bytes, + 20 bytes × {dim:,}) but the limit is {_size(limit)}: use fewer "
            "checkpoints, more processes, or raise the limit"
        )
    read = _Reader(checkpoints, load, trust)
    rows = torch.empty(len(mine), dim, dtype=torch.float32)
    total = torch.zeros(dim, dtype=torch.float64)  # Σ θ_i for the mean, summed row by row
    state: dict[str, torch.Tensor] = {}
    for i, epoch in enumerate(mine):
        state = read(epoch)
        _check_params(state, shapes, _name(checkpoints, epoch))
        offset = 0
        for n in names:
            size = state[n].numel()
            rows[i, offset : offset + size].copy_(state[n].reshape(-1))
            offset += size
        total.add_(rows[i])
    if mine and mine[-1] == epochs[-1]:
        newest = state
    else:  # another process holds the last row; its buffers are needed here too
        newest = read(epochs[-1])
        _check_params(newest, shapes, _name(checkpoints, epochs[-1]))
    if world > 1:
        dist.all_reduce(total)
    mean = total.div_(len(epochs)).float()
    del total
    kept = orthonormalize_rows_(rows, rtol=rtol, distributed=world > 1)
    dropped = [e for e, k in zip(mine, kept, strict=True) if not k]
    n_kept = sum(kept)
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, dropped)
        dropped = sorted(e for part in gathered for e in part)
    basis = rows[:n_kept] if n_kept < len(rows) else rows
    return Subspace(basis, names, mean, dict(newest), epochs, len(epochs) - len(dropped), dropped, tied)


# --------------------------------------------------------------------------------------------------
# TWA: training in the subspace
# --------------------------------------------------------------------------------------------------


class TWAProjector:
    """Replace a model's gradient by its projection onto the subspace: g ← Pᵀ(P g).

    Call :meth:`project_` after ``loss.backward()`` and before ``optimizer.step()``, in any loop. ``basis``
    is this process's block of rows of P (:attr:`Subspace.basis`); over several processes each projects onto
    its block and the results are summed with an all-reduce, which is exactly Pᵀ(P g) because the blocks are
    orthogonal to each other. Under DDP the gradient is already averaged over processes when backward()
    returns, so the projected gradient is the same everywhere and the replicas stay equal.

    Weight decay belongs here, not in the optimizer: ``weight_decay`` is added to the gradient before the
    projection, g ← Pᵀ P (g + wd·θ). The reference code passed it to torch.optim.SGD, i.e. added it after
    the projection; θ lies in span(P) in exact arithmetic (the mean and every checkpoint do), so the update
    is the same, but rounding and rows dropped as dependent would let θ drift out of the subspace step by
    step. Build the optimizer with ``weight_decay=0``; momentum of in-span updates stays in span.

    >>> projector = TWAProjector(sub.basis, sub.names, weight_decay=1e-5)           # doctest: +SKIP
    >>> loss.backward(); projector.project_(model); optimizer.step()                # doctest: +SKIP
    """

    def __init__(
        self,
        basis: torch.Tensor,
        names: Sequence[str],
        *,
        weight_decay: float = 0.0,
        distributed: bool | None = None,
    ):
        if basis.dim() != 2:
            raise LawaError(f"the TWA basis must be a matrix (rows × parameters), got shape {tuple(basis.shape)}")
        if weight_decay < 0:
            raise LawaError(f"weight decay must be ≥ 0, got {weight_decay}")
        self.basis = basis
        self.names = list(names)
        self.weight_decay = float(weight_decay)
        self.rank, self.world_size = _world(distributed)

    @torch.no_grad()
    def project(self, vector: torch.Tensor) -> torch.Tensor:
        """Pᵀ(P v) for a flat vector of length D (all processes must call this together)."""
        if vector.shape != (self.basis.shape[1],):
            raise LawaError(f"vector of shape {tuple(vector.shape)} for a basis of {self.basis.shape[1]} parameters")
        v = _as(vector, self.basis.dtype)
        out = (self.basis @ v) @ self.basis if len(self.basis) else torch.zeros_like(v)
        if self.world_size > 1:
            dist.all_reduce(out)
        return out

    @torch.no_grad()
    def project_(self, model: torch.nn.Module) -> None:
        """In place on every parameter's ``.grad`` (a missing gradient counts as zero)."""
        named = dict(_unwrap(model).named_parameters())
        try:
            params = [named[n] for n in self.names]
        except KeyError as exc:
            raise LawaError(f"the model has no parameter {exc} that the TWA basis was built for") from None
        device = self.basis.device
        g = torch.cat([
            (p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device)).to(device)
            for p in params
        ]).to(self.basis.dtype)
        if self.weight_decay:
            g.add_(torch.cat([p.detach().reshape(-1).to(device) for p in params]), alpha=self.weight_decay)
        out = self.project(g)
        offset = 0
        for p in params:
            piece = out[offset : offset + p.numel()].view_as(p).to(p.device, p.dtype)
            offset += p.numel()
            if p.grad is None:
                p.grad = piece.clone()
            else:
                p.grad.copy_(piece)


def twa_lr_factor(schedule: str, iteration: int, epochs: int, iters_per_epoch: int) -> float:
    """The learning-rate multiplier of TWA's schedules at ``iteration`` (0-based), as in the reference code:

    ``step``: ×0.1 from epoch ⌊0.5·epochs⌋ and again from ⌊0.75·epochs + 0.9⌋ (its MultiStepLR; with one
    epoch both milestones fall at epoch 0 and 1, so training runs at 0.1·lr); ``constant``: 1; ``linear``:
    1 − iteration / (epochs · iters_per_epoch), per iteration.
    """
    if schedule not in TWA_SCHEDULES:
        raise LawaError(f"unknown TWA schedule '{schedule}' (choose {', '.join(TWA_SCHEDULES)})")
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - iteration / (epochs * iters_per_epoch)
    epoch = iteration // iters_per_epoch
    milestones = (int(epochs * 0.5), int(epochs * 0.75 + 0.9))
    return 0.1 ** sum(epoch >= m for m in milestones)


def twa_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, epochs: int, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR for :func:`twa_lr_factor`; call ``scheduler.step()`` after every ``optimizer.step()``."""
    twa_lr_factor(schedule, 0, max(epochs, 1), max(iters_per_epoch, 1))  # validates the name
    if epochs < 1 or iters_per_epoch < 1:
        raise LawaError(f"TWA needs ≥ 1 epoch of ≥ 1 batch, got {epochs} epochs of {iters_per_epoch} batches")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: twa_lr_factor(schedule, it, epochs, iters_per_epoch)
    )
