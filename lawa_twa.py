"""TWA (Li et al., ICLR 2023, "Trainable Weight Averaging: Efficient Training by Optimizing Historical
Solutions"): SGD in the linear span of n checkpoints' parameters, which trains their averaging coefficients.

    import lawa_twa as twa, lawa_utils as lu
    ckpts = lu.find_checkpoints("runs/imagenet")
    sub = twa.build_subspace(model, ckpts, twa.twa_epochs(ckpts, "60:70"))
    model.load_state_dict(sub.start_state("mean"))                       # the SWA point
    optimizer = torch.optim.SGD(model.parameters(), lr=2, momentum=0.9)   # no weight_decay here …
    projector = twa.TWAProjector(sub.basis, sub.names, weight_decay=1e-5) # … it goes into the projection
    scheduler = twa.twa_scheduler(optimizer, "step", epochs=2, iters_per_epoch=len(loader))
    for x, y in loader:                                                   # for each of the 2 epochs
        optimizer.zero_grad(); F.cross_entropy(model(x), y).backward()
        projector.project_(model); optimizer.step(); scheduler.step()

:func:`build_subspace` flattens the checkpoints into W (n × D) and orthonormalises its rows into the basis P
(memory n × D floats, one block of rows per process under torch.distributed); :class:`TWAProjector` replaces
the gradient by Pᵀ(P g), all-reduced across processes, which is exact. ``imagenet/train_twa.py`` is the
command line. Errors meant for people are :class:`lawa_utils.LawaError` with a one-line message.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

import lawa_utils as lu
from lawa_utils import LawaError

__all__ = [
    "TWA_SCHEDULES",
    "Subspace",
    "TWAProjector",
    "build_subspace",
    "default_max_bytes",
    "flatten_params",
    "orthonormalize_rows_",
    "param_names",
    "row_block",
    "twa_epochs",
    "twa_lr_factor",
    "twa_memory_bytes",
    "twa_scheduler",
]

TWA_SCHEDULES = ("step", "constant", "linear")


def _name(checkpoints: Mapping[int, Any], epoch: int) -> str:
    value = checkpoints[epoch]
    return str(value) if isinstance(value, (str, os.PathLike)) else f"checkpoint{epoch}"


def _require(checkpoints: Mapping[int, Any], epochs: Iterable[int], why: str) -> None:
    for i in epochs:
        if i not in checkpoints:
            raise LawaError(f"checkpoint{i}.pt is missing ({why} needs it)")


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
            lu.check_compatible(self.reference[1], state, (self.reference[0], name))
        lu.check_finite(state, name)
        return state


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
    """The trainable parameters TWA flattens, in ``named_parameters`` order (tied weights once, no buffers).

        >>> param_names(torch.nn.Linear(3, 2))
        ['weight', 'bias']
    """
    return [name for name, p in _unwrap(model).named_parameters() if p.requires_grad]


def flatten_params(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """The parameters ``names`` of a state dict as one float32 vector (a row of W).

        >>> flatten_params(model.state_dict(), param_names(model)).shape      # doctest: +SKIP
        torch.Size([8])
    """
    return torch.cat([state[n].reshape(-1).float() for n in names])


def twa_epochs(checkpoints: Mapping[int, Any], spec: str | tuple[int, int]) -> list[int]:
    """Epochs a … b (inclusive, like every window here) from ``"a:b"``; all must be in ``checkpoints``.

        >>> twa_epochs({e: f"checkpoint{e}.pt" for e in range(1, 11)}, "8:10")
        [8, 9, 10]
    """
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
    """The rows of W (and P) that process ``rank`` of ``world_size`` holds: a contiguous, near-equal block.

        >>> row_block(5, 1, 2)
        range(2, 5)
    """
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
        v = vector.to(self.basis.dtype)  # no copy when the dtype already matches
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
