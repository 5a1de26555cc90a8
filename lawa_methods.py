"""Averaging methods beyond uniform LAWA: EMA, SWA, EWA (spaced checkpoints) as one-pass sweeps.

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

The sweep engine built on these iterators, with its typed method specs and the flags every sweep shares,
is ``lawa_sweep``. TWA, which trains the averaging coefficients instead, is ``lawa_twa``.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

import lawa_utils as lu
from lawa_utils import LawaError, check_compatible, check_finite

__all__ = [
    "METHODS",
    "ema_label",
    "ewa_window",
    "iter_ema_averages",
    "iter_ewa_averages",
    "iter_method_averages",
    "iter_swa_averages",
    "method_label",
]

# The CSV's method column for every sweep method (lawa and exp come from lawa_utils.iter_window_averages).
METHODS = ("lawa", "exp", "ema", "swa", "ewa")

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
