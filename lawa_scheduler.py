"""Online LAWA: average the k latest snapshots of the weights while training, in any PyTorch loop.

Example (per-epoch snapshots; the README shows the same)::

    import torch, torchvision
    from lawa_scheduler import LawaScheduler
    from lawa_utils import recompute_bn

    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lawa = LawaScheduler(model, k=6)             # the 6 latest end-of-epoch weights, kept on CPU
    for epoch in range(90):
        train_one_epoch(model, optimizer, train_loader)
        lawa.update()                            # snapshot θ_E: parameters and buffers, by name
        with lawa.swapped_in():                  # θ^LAWA_E in the live model, restored bit-exactly on exit
            recompute_bn(model, train_loader, num_batches=100)
            validate(model, val_loader)
        torch.save({"model": model.state_dict(), "lawa": lawa.state_dict()}, "checkpoint.pt")

For snapshots every N optimizer steps instead, build ``LawaScheduler(model, k, every_n_steps=N)`` and call
``lawa.step()`` after every ``optimizer.step()``. HF Trainer and Lightning users: ``lawa_callbacks`` drives
this class from their trainers' own hooks.

LAWA (LAtest Weight Averaging) is from J. Kaddour, "Stop Wasting My Time! Saving Days of ImageNet and BERT
Training with Latest Weight Averaging", 2022 (arXiv:2209.14981): θ^LAWA_E = (1/k) Σ θ_i over the k latest
checkpoints i = E−k+1 … E, inclusive (the repository's one definition of k, as in ``lawa_utils.window``).
Until k snapshots exist the average is over those taken so far (``num_averaged`` says how many). Before the
first snapshot there is none: ``averaged_state_dict()``, ``averaged_model()`` and ``swapped_in()`` raise
``LawaError`` saying when it comes (a silent no-op would let the live weights be reported as LAWA's).

How it works. The scheduler keeps the k latest snapshots in a ring on ``device`` (CPU by default) and the sum
of their floating-point tensors, so a snapshot costs O(parameters) whatever k is: the new snapshot is copied
into the oldest slot and ``sum += new − evicted``. Add-and-subtract lets rounding error build up, so each
snapshot also recounts 1/k of the sum exactly from the ring (snapshot n recounts chunk n mod k of every
tensor's elements; the ring holds each tensor's k slots in one (k, …) tensor, so that is one reduction per
tensor reading k × 1/k = one model's worth). Every element is thus recounted every k snapshots: its error is
never more than k add/subtract pairs old. Memory: (k + 1) × the kept tensors' size, allocated at the first
snapshot (fp16/bf16 tensors are summed in fp32). Integer buffers such as BatchNorm's ``num_batches_tracked``
are taken from the newest snapshot, never averaged.

Which tensors. ``params="all"`` (default) keeps every parameter and buffer; ``params="trainable"`` only the
parameters that require grad, plus the buffers, so a frozen backbone or a LoRA base is not copied k times (it
does not move, so its average is itself); a predicate ``(name, tensor) -> bool`` chooses freely. Names that
share one tensor (tied input and output embeddings) are stored once and written to every name.

Wrapped models. DistributedDataParallel / DataParallel (``module.``) and ``torch.compile`` (``_orig_mod.``)
wrappers are looked through, so names are the plain model's. Under DDP every rank runs its own scheduler.
Buffers need care: DDP broadcasts rank 0's buffers at the start of each forward, so after a training step that
saw different data on each rank, BatchNorm running statistics differ between ranks until the next forward, and
so do the buffers in a snapshot. Recompute BN statistics on the average (``lawa_utils.recompute_bn``) when
that matters.

Sharded. With ``shard=True`` under DDP each of the W ranks keeps only its 1/W slice of every flattened tensor
in the ring and the sum, (k + 1)/W × the model per rank; snapshots need no communication, and
``swapped_in()`` / ``averaged_state_dict()`` all-gather the averaged slices (one all_gather per dtype, so
every rank must call them together; ``device`` must suit the process group's backend: CPU for gloo). Under
FSDP2 (``fully_shard``: DTensor parameters) each rank already holds a shard: the scheduler keeps and averages
the local shards, swaps them in with no communication at all, and ``state_dict()`` returns DTensors, so
``torch.distributed.checkpoint`` saves it as global tensors and can load it on another world size: the
values reshard and the average right after loading is bit-identical (tested 3 → 2 ranks); later averages equal
an uninterrupted run's up to rounding, not bit for bit, since the exact-recount chunks follow the local shard
sizes. Resume formats: ``state_dict()`` (torch.save, weights_only
loads it), ``save_file()`` (safetensors, no pickle), DCP for DTensors.

Why there is no EMA or SWA mode. Both are running averages without a window: SWA is the mean of all
snapshots since a start (k = ∞) and EMA is θ ← α·θ + (1−α)·θ_t. Neither needs the ring of k snapshots that is
this class's whole state, so as modes they would add a second update path (no eviction) and a second resume
format (no ring) behind the same methods. ``torch.optim.swa_utils.AveragedModel`` already does both in one
model's memory (SWA by default, EMA with ``multi_avg_fn=get_ema_multi_avg_fn(decay)``, ``use_buffers=True``
for buffers) and resumes through its own ``state_dict``; use it for those.
"""

from __future__ import annotations

import contextlib
import copy
import json
import operator
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lawa_tidy import LawaError, atomic_write

try:  # DTensor (FSDP2's parameters) needs a torch built with distributed support
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - such builds are rare
    DTensor = None

__all__ = ["LawaScheduler", "ParamFilter"]

ParamFilter = str | Callable[[str, Tensor], bool]
"""``"all"``, ``"trainable"``, or a predicate ``(name, tensor) -> bool`` on the model's parameters and buffers."""

# Version 3: the ring is saved whole (k slots, unfilled ones zero) so that a fresh scheduler's state_dict() is a
# template DCP can load into in place, and the sharding is recorded.
_STATE_VERSION = 3
_STATE_KEYS = ("version", "k", "every_n_steps", "start", "count", "num_snapshots", "shard", "ring", "sum")


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP/DataParallel (``module.``) and torch.compile (``_orig_mod.``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    """This rank's part of a DTensor (a view: writes reach the parameter), or the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _model_state(model: nn.Module) -> dict[str, Tensor]:
    """Name → tensor for every parameter and buffer: detached views, so in-place writes reach the model."""
    # Non-tensor entries (a module's get_extra_state) are not weights: neither snapshotted nor touched.
    return {name: t for name, t in _unwrap(model).state_dict().items() if isinstance(t, Tensor)}


def _is_averaged(dtype: torch.dtype) -> bool:
    # As in lawa_utils.average_state_dicts: floating-point tensors are averaged, all others are counters.
    return dtype.is_floating_point


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    # A sum of k fp16/bf16 values loses digits quickly; accumulate those (and fp8) in fp32.
    if dtype.is_floating_point and torch.finfo(dtype).bits < 32:
        return torch.float32
    return dtype


def _count_arg(name: str, value: Any, minimum: int) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < minimum:
        raise LawaError(f"LawaScheduler: {name} must be an integer >= {minimum}, got {value!r}")
    return number


@dataclass(frozen=True)
class _Entry:
    """How one tensor of the model is kept: the ring holds ``shape`` per slot."""

    aliases: tuple[str, ...]  # further names of the same storage (tied weights): written with it, stored once
    local_shape: torch.Size  # the tensor in the model (a DTensor's: this rank's shard)
    dtype: torch.dtype
    lo: int  # this rank's slice [lo, hi) of the flattened tensor when sharded, else the whole tensor
    hi: int
    sliced: bool
    dtensor: tuple | None  # (device_mesh, placements, global shape) for DTensor parameters

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.hi - self.lo,) if self.sliced else tuple(self.local_shape)


def _storage_key(name: str, t: Tensor) -> tuple:
    """Equal for two names of one tensor (tied weights): same storage, offset, shape, strides and dtype."""
    if t.numel() == 0 or t.device.type == "meta":
        return ("distinct", name)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


def _select(model: nn.Module, params: ParamFilter) -> dict[str, tuple[Tensor, tuple[str, ...]]]:
    """Canonical name → (live tensor, its aliases) for the tensors ``params`` keeps, in state_dict order.

    A group of tied names is kept if the filter keeps any of them, under the first kept name."""
    plain = _unwrap(model)
    state = _model_state(plain)
    parameters = dict(plain.named_parameters(remove_duplicate=False))
    buffers = dict(plain.named_buffers(remove_duplicate=False))

    def keep(name: str) -> bool:
        if params == "all":
            return True
        if params == "trainable":  # buffers too: BatchNorm statistics move even when the weights are frozen
            return name not in parameters or parameters[name].requires_grad
        return bool(params(name, parameters.get(name, buffers.get(name, state[name]))))

    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(_storage_key(name, _local(t)), []).append(name)
    selected = {}
    for names in groups.values():
        kept = [name for name in names if keep(name)]
        if kept:
            selected[kept[0]] = (state[kept[0]], tuple(name for name in names if name != kept[0]))
    return selected


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise LawaError(message)


class LawaScheduler:
    """Keep θ^LAWA, the uniform average of the k latest snapshots of a model, up to date while training.

        lawa = LawaScheduler(model, k=6)                  # per-epoch snapshots on CPU
        lawa.update()                                     # at the end of every epoch
        with lawa.swapped_in():                           # θ^LAWA in the live model, restored exactly after
            validate(model)

    Args:
        model: the model being trained; may be wrapped in DDP, DataParallel or torch.compile, or sharded by
            FSDP2 (``fully_shard``: DTensor parameters).
        k: how many of the latest snapshots to average (the paper uses k=6 of 90 ImageNet epochs).
        every_n_steps: snapshot every N optimizer steps, counted by ``step()``. None (default): snapshot at
            every ``update()`` call, i.e. once per epoch.
        start: take no snapshot before this many steps (or epochs) have completed; 0 (default) starts at
            once. With ``every_n_steps`` the snapshots are the steps that are multiples of N and >= start.
        device: where snapshots and sums live (default CPU, so the accelerator holds only the live model).
        params: which tensors to average: ``"all"`` (default: every parameter and buffer), ``"trainable"``
            (parameters with ``requires_grad`` and all buffers: a frozen or LoRA base is not copied k times),
            or a predicate ``(name, tensor) -> bool`` called with each parameter (so ``requires_grad`` is
            visible) and buffer. Chosen at the first snapshot; the others are left alone everywhere.
        shard: under DDP (torch.distributed initialized, replicated parameters), keep only this rank's 1/W
            slice of every tensor: (k+1)/W × the model per rank. Averages are then collectives (see below).
        group: the process group to shard over (default: the whole world).

    The settings are kept as the attributes ``k``, ``every_n_steps``, ``start``, ``device``, ``params`` and
    ``shard``; treat them as read-only (``load_state_dict`` checks them against the saved ones).
    """

    def __init__(
        self,
        model: nn.Module,
        k: int,
        *,
        every_n_steps: int | None = None,
        start: int = 0,
        device: torch.device | str = "cpu",
        params: ParamFilter = "all",
        shard: bool = False,
        group: Any = None,
    ) -> None:
        self.k = _count_arg("k", k, 1)
        self.every_n_steps = None if every_n_steps is None else _count_arg("every_n_steps", every_n_steps, 1)
        self.start = _count_arg("start", start, 0)
        self.device = torch.device(device)
        _check(params in ("all", "trainable") or callable(params),
               f"LawaScheduler: params must be 'all', 'trainable' or a predicate (name, tensor) -> bool, "
               f"got {params!r}")
        self.params = params
        self.shard = bool(shard)
        self._group = group
        self._rank, self._world = 0, 1
        if self.shard:
            _check(dist.is_available() and dist.is_initialized(),
                   "LawaScheduler(shard=True) needs torch.distributed initialized (init_process_group) first")
            self._rank, self._world = dist.get_rank(group), dist.get_world_size(group)
        self._model = _unwrap(model)
        self._count = 0  # optimizer steps (step mode) or epochs (update mode) seen so far
        self._num_snapshots = 0  # snapshots taken so far; the newest sits in slot (n − 1) % k
        self._entries: dict[str, _Entry] = {}  # canonical name → how it is kept, fixed at allocation
        # name → (k, *shape): the ring of the k latest snapshots; slot i holds snapshot i, i+k, …
        self._ring: dict[str, Tensor] = {}
        self._sum: dict[str, Tensor] = {}  # Σ over the filled slots of the floating-point tensors
        self._swapped = False

    # -- counters --------------------------------------------------------------------------------------

    @property
    def num_snapshots(self) -> int:
        """Snapshots taken since the start of training."""
        return self._num_snapshots

    @property
    def num_averaged(self) -> int:
        """How many snapshots the current average covers: min(num_snapshots, k)."""
        return min(self._num_snapshots, self.k)

    @property
    def count(self) -> int:
        """Optimizer steps counted by ``step()`` (or epochs by ``update()``) so far, resumed ones included."""
        return self._count

    def step(self) -> bool:
        """Count one optimizer step; snapshot on multiples of ``every_n_steps`` from ``start`` on.

        Returns True when a snapshot was taken.
        """
        if self.every_n_steps is None:
            raise RuntimeError(
                "LawaScheduler.step(): this scheduler snapshots once per update() call (per epoch); "
                "build it with every_n_steps=N to snapshot every N optimizer steps"
            )
        return self._tick(self.every_n_steps)

    def update(self) -> bool:
        """Count one epoch (call it at the end of each); snapshot from epoch ``start`` on.

        Returns True when a snapshot was taken.
        """
        if self.every_n_steps is not None:
            raise RuntimeError(
                f"LawaScheduler.update(): this scheduler snapshots every {self.every_n_steps} optimizer "
                "steps; call step() after each optimizer.step() instead"
            )
        return self._tick(1)

    def _tick(self, interval: int) -> bool:
        if self._swapped:
            raise RuntimeError(
                "LawaScheduler: the average is swapped into the model; leave `with swapped_in()` before "
                "counting steps or epochs, or the average would be snapshotted"
            )
        count = self._count + 1
        due = count >= self.start and count % interval == 0
        if due:
            self._snapshot()
        self._count = count
        return due

    # -- layout ----------------------------------------------------------------------------------------

    def _plan(self) -> dict[str, _Entry]:
        """How each selected tensor of the model would be kept (this rank's slice when sharded)."""
        entries = {}
        for name, (t, aliases) in _select(self._model, self.params).items():
            local = _local(t)
            numel = local.numel()
            spec = (t.device_mesh, t.placements, t.shape) if _is_dtensor(t) else None
            sliced = self.shard and spec is None  # a DTensor is already this rank's shard
            rank, world = self._rank, self._world
            lo, hi = (rank * numel // world, (rank + 1) * numel // world) if sliced else (0, numel)
            entries[name] = _Entry(aliases, local.shape, local.dtype, lo, hi, sliced, spec)
        return entries

    def _allocate(self, entries: dict[str, _Entry]) -> None:
        """Zeroed ring and sums for ``entries``: (k + 1) × what they hold, on ``device``."""
        self._entries, self._ring, self._sum = entries, {}, {}
        for name, e in entries.items():
            self._ring[name] = torch.zeros((self.k, *e.shape), dtype=e.dtype, device=self.device)
            if _is_averaged(e.dtype):  # contiguous whatever the model's layout (channels_last): chunks are flat
                self._sum[name] = torch.zeros(e.shape, dtype=_sum_dtype(e.dtype), device=self.device)

    def _live(self, model: nn.Module, where: str) -> dict[str, Tensor]:
        """Canonical and alias name → the model's local tensor, checked against the kept layout."""
        state = _model_state(model)
        live = {}
        for name, e in self._entries.items():
            for n in (name, *e.aliases):
                _check(n in state, f"{where}: the model has no tensor {n!r} (it had one at the first snapshot)")
                t = _local(state[n])
                _check(t.shape == e.local_shape and t.dtype == e.dtype,
                       f"{where}: {n} is {tuple(t.shape)} {t.dtype}, it was {tuple(e.local_shape)} {e.dtype}")
                live[n] = t
        return live

    @torch.no_grad()
    def _snapshot(self) -> None:
        if not self._ring:
            self._allocate(self._plan())
        live = self._live(self._model, "LawaScheduler: the model changed since the first snapshot")
        n = self._num_snapshots
        # Snapshot n goes into slot n mod k and recounts chunk n mod k (that 1/k of every tensor's elements).
        slot_index, filling, filled = n % self.k, n < self.k, min(n + 1, self.k)
        for name, e in self._entries.items():
            t = live[name]
            source = t.reshape(-1)[e.lo:e.hi] if e.sliced else t
            ring = self._ring[name]
            kept = ring[slot_index]
            total = self._sum.get(name)
            if total is None:
                kept.copy_(source)
                continue
            if not filling:
                total.sub_(kept)  # evict the oldest snapshot
            kept.copy_(source)
            total.add_(kept)
            size = total.numel()
            lo, hi = slot_index * size // self.k, (slot_index + 1) * size // self.k
            flat = total.view(-1)[lo:hi]
            torch.sum(ring[:filled].view(filled, size)[:, lo:hi], dim=0, dtype=total.dtype, out=flat)
        self._num_snapshots = n + 1

    # -- the average -----------------------------------------------------------------------------------

    def _average_local(self) -> dict[str, Tensor]:
        """Canonical name → this rank's part of θ^LAWA (a slice when sharded, a shard for DTensors)."""
        _check(bool(self._ring), self._nothing_yet())
        newest, n = (self._num_snapshots - 1) % self.k, self.num_averaged
        return {
            name: (self._sum[name] / n).to(e.dtype) if name in self._sum else self._ring[name][newest].clone()
            for name, e in self._entries.items()
        }

    def _gather(self, parts: dict[str, Tensor], sink: Callable[[str, Tensor], None] | None = None) -> dict:
        """Whole tensors from every rank's slices (one all_gather per dtype); unsliced parts pass through.

        With ``sink``, each whole tensor is handed to ``sink(name, tensor)`` as soon as it is assembled and
        nothing is kept (so swapping in holds the gathered slices and one tensor, not a second model)."""
        out: dict[str, Tensor] = {}
        sink = sink or out.__setitem__
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name, e in self._entries.items():
            if e.sliced:
                by_dtype.setdefault(parts[name].dtype, []).append(name)
            else:
                sink(name, parts[name])
        world = self._world
        for dtype, names in by_dtype.items():
            # Slices differ by at most one element between ranks: pad each to ceil(numel / W).
            widths = [-(-self._entries[name].local_shape.numel() // world) for name in names]
            buffer = torch.zeros(sum(widths), dtype=dtype, device=self.device)
            offset = 0
            for name, width in zip(names, widths, strict=True):
                buffer[offset:offset + parts[name].numel()].copy_(parts[name])
                offset += width
            gathered = [torch.empty_like(buffer) for _ in range(world)]
            dist.all_gather(gathered, buffer, group=self._group)
            del buffer
            offset = 0
            for name, width in zip(names, widths, strict=True):
                e = self._entries[name]
                numel = e.local_shape.numel()
                pieces = [
                    gathered[r][offset:offset + (r + 1) * numel // world - r * numel // world] for r in range(world)
                ]
                sink(name, torch.cat(pieces).view(e.local_shape))
                offset += width
        return out

    def _wrap(self, name: str, t: Tensor, leading: int = 0) -> Tensor:
        """``t`` as the DTensor the model's tensor ``name`` is (``leading`` extra dims in front), else ``t``."""
        spec = self._entries[name].dtensor
        if spec is None:
            return t
        mesh, placements, shape = spec
        placements = tuple(
            type(p)(p.dim + leading) if p.is_shard() else p for p in placements  # Shard(d) → Shard(d + leading)
        )
        shape = (*t.shape[:leading], *shape)
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(t, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride)

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """θ^LAWA as a new state dict on ``device``: plain-model names, float tensors averaged in their own
        dtype, integer tensors from the newest snapshot. Loads into the unwrapped model.

        Tied names map to one tensor, as in the model's own ``state_dict()``. With a ``params`` filter only the
        kept names appear (load with ``strict=False``). Under ``shard=True`` this is a collective (call it on
        every rank; each gets whole tensors); DTensor parameters come back as DTensors of this rank's shards.
        """
        parts = self._average_local()
        whole = self._gather(parts) if self.shard else parts
        del parts
        out = {}
        for name, e in self._entries.items():
            t = self._wrap(name, whole[name])
            for n in (name, *e.aliases):
                out[n] = t
        position = {name: i for i, name in enumerate(_model_state(self._model))}
        return dict(sorted(out.items(), key=lambda item: position[item[0]]))

    def averaged_model(self) -> nn.Module:
        """A deep copy of the (unwrapped) model holding θ^LAWA, on the live model's device.

        Its BatchNorm statistics are the averaged running statistics; refresh them with
        ``lawa_utils.recompute_bn(averaged, loader)`` as the paper does. A collective under ``shard=True``.
        """
        parts = self._average_local()
        whole = self._gather(parts) if self.shard else parts
        model = copy.deepcopy(self._model)
        self._write(model, whole, "LawaScheduler.averaged_model")
        return model

    @torch.no_grad()
    def _write(self, model: nn.Module, tensors: Mapping[str, Tensor], where: str) -> None:
        """Copy canonical name → tensor into the model's tensor of that name and of each alias."""
        live = self._live(model, where)
        for name, e in self._entries.items():
            for n in (name, *e.aliases):
                live[n].copy_(tensors[name])

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module | None = None) -> Iterator[None]:
        """Load θ^LAWA into the live model for the ``with`` block, then restore its weights bit-exactly.

            with lawa.swapped_in():
                metrics = evaluate(model)

        The kept tensors are copied aside to the scheduler's ``device`` (so the training device holds nothing
        extra) and copied back on exit, also when the block raises, so anything done inside (evaluation,
        ``recompute_bn``) leaves no trace on them. ``model`` defaults to the scheduler's own; pass another with
        the same names to evaluate there. Under ``shard=True`` entering is a collective (an all_gather of the
        slices); DTensor parameters are written shard by shard, with no communication.

        Before the first snapshot there is no average: this raises LawaError saying when the first snapshot
        comes, rather than silently running the block on the live weights, which would then be reported as
        LAWA's. Guard with ``if lawa.num_snapshots:`` where an evaluation may come first.
        """
        if self._swapped:
            raise RuntimeError("LawaScheduler.swapped_in(): the average is already swapped in")
        target = self._model if model is None else _unwrap(model)
        parts = self._average_local()
        with torch.no_grad():
            live = self._live(target, "LawaScheduler.swapped_in")
            saved = {name: live[name].to(self.device, copy=True) for name in self._entries}

            def write(name: str, t: Tensor) -> None:
                for n in (name, *self._entries[name].aliases):
                    live[n].copy_(t)

            try:
                if self.shard:  # each whole tensor goes into the model as soon as it is gathered
                    self._gather(parts, write)
                else:
                    for name, t in parts.items():
                        write(name, t)
            except BaseException:  # a failed gather must not leave the model half-averaged
                for name, t in saved.items():
                    write(name, t)
                raise
        del parts  # held in the model now; the block runs with only `saved` beside the ring
        self._swapped = True
        try:
            yield
        finally:
            self._write(target, saved, "LawaScheduler.swapped_in")
            self._swapped = False

    # -- resume ----------------------------------------------------------------------------------------

    def _shard_info(self) -> dict[str, int] | None:
        return {"rank": self._rank, "world_size": self._world} if self.shard else None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically: settings, counters, the ring's k slots, the sum.

            torch.save({"model": model.state_dict(), "lawa": lawa.state_dict()}, "checkpoint.pt")

        Holds only ints, None, lists, dicts and tensors, so ``torch.load(..., weights_only=True)`` reads it.
        As with ``nn.Module.state_dict()``, the tensors are the scheduler's own: save or clone them. The slots
        are views into one (k, …) tensor per name, so ``torch.save`` writes each of those once. Under
        ``shard=True`` it holds this rank's slices (resume on the same world size, each rank its own file).
        With DTensor parameters the tensors are DTensors and the ring is allocated even before the first
        snapshot, so the state is a template for ``torch.distributed.checkpoint``::

            dcp.save({"lawa": lawa.state_dict()}, checkpoint_id=path)
            state = {"lawa": fresh.state_dict()}         # later, on a fresh scheduler: load in place
            dcp.load(state, checkpoint_id=path)
            fresh.load_state_dict(state["lawa"])
        """
        if not self._ring:
            entries = self._plan()
            if any(e.dtensor is not None for e in entries.values()):
                self._allocate(entries)
        return {
            "version": _STATE_VERSION,
            "k": self.k,
            "every_n_steps": self.every_n_steps,
            "start": self.start,
            "count": self._count,
            "num_snapshots": self._num_snapshots,
            "shard": self._shard_info(),
            "ring": [
                {name: self._wrap(name, ring[i]) for name, ring in self._ring.items()} for i in range(self.k)
            ] if self._ring else [],
            "sum": {name: self._wrap(name, total) for name, total in self._sum.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``. The scheduler must have the same settings (k, every_n_steps, start,
        sharding) and the model the same kept tensor names, shapes and dtypes; otherwise LawaError says what
        differs."""
        where = "LawaScheduler.load_state_dict"
        missing = [key for key in _STATE_KEYS if key not in state]
        _check(not missing, f"{where}: not a LawaScheduler state (missing {missing})")
        _check(state["version"] == _STATE_VERSION,
               f"{where}: state version {state['version']!r}, this code reads version {_STATE_VERSION}")
        for key, mine in (("k", self.k), ("every_n_steps", self.every_n_steps), ("start", self.start),
                          ("shard", self._shard_info())):
            _check(state[key] == mine, f"{where}: the state was saved with {key}={state[key]!r} but this scheduler "
                                       f"has {key}={mine!r}; build it with the saved settings")
        ring, num_snapshots = list(state["ring"]), int(state["num_snapshots"])
        _check(len(ring) == self.k or (not ring and num_snapshots == 0),
               f"{where}: {len(ring)} ring slots for {num_snapshots} snapshots with k={self.k}")
        entries = self._plan()
        expected = {name: (e.shape, e.dtype) for name, e in entries.items()}
        for part, tensors in [(f"ring slot {i}", slot) for i, slot in enumerate(ring)] + [("sum", state["sum"])]:
            want = expected if part != "sum" else {
                name: (shape, _sum_dtype(dtype)) for name, (shape, dtype) in expected.items() if _is_averaged(dtype)
            }
            if not ring:
                want = {}
            names, have = set(want), set(tensors)
            _check(names == have, f"{where} ({part}): tensor names differ from the model's kept ones (missing "
                                  f"{sorted(names - have)[:5]}, unexpected {sorted(have - names)[:5]})")
            for name, (shape, dtype) in want.items():
                t = _local(tensors[name])
                _check(tuple(t.shape) == tuple(shape) and t.dtype == dtype,
                       f"{where} ({part}): {name} is {tuple(t.shape)} {t.dtype}, the model's is {tuple(shape)} {dtype}")
        if ring:
            with torch.no_grad():
                local_ring = [{name: _local(t) for name, t in slot.items()} for slot in ring]
                local_sum = {name: _local(t) for name, t in state["sum"].items()}
                self._allocate(entries)
                for name, tensors in self._ring.items():
                    for index, slot in enumerate(local_ring):
                        tensors[index].copy_(slot[name])
                for name, total in self._sum.items():
                    total.copy_(local_sum[name])
        else:
            self._entries, self._ring, self._sum = {}, {}, {}
        self._count, self._num_snapshots = int(state["count"]), num_snapshots

    def save_file(self, path: str | os.PathLike) -> None:
        """Write ``state_dict()`` as one safetensors file (settings and counters as JSON in its metadata):
        no pickle, so reading it back runs no code. Atomic: a crash leaves the old file or the new one.

            lawa.save_file("checkpoint-800/lawa_state.safetensors")
        """
        from safetensors.torch import save

        state = self.state_dict()
        tensors = {f"ring.{name}": ring.contiguous() for name, ring in self._ring.items()}
        tensors.update({f"sum.{name}": total.contiguous() for name, total in self._sum.items()})
        settings = {key: state[key] for key in _STATE_KEYS if key not in ("ring", "sum")}
        data = save(tensors, metadata={"lawa_scheduler": json.dumps(settings)})
        atomic_write(path, lambda f: f.write(data), force=True)

    def load_file(self, path: str | os.PathLike) -> None:
        """Restore what ``save_file`` wrote; LawaError naming ``path`` if it is not such a file.

            lawa.load_file("checkpoint-800/lawa_state.safetensors")
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(os.fspath(path), framework="pt", device=str(self.device)) as f:
                settings = json.loads((f.metadata() or {})["lawa_scheduler"])
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise LawaError(f"{path}: not a LawaScheduler state file ({type(exc).__name__}: {exc})") from None
        rings = {key[len("ring."):]: t for key, t in tensors.items() if key.startswith("ring.")}
        slots = next(iter(rings.values())).shape[0] if rings else 0
        ring = [{name: t[i] for name, t in rings.items()} for i in range(slots)]
        sums = {key[len("sum."):]: t for key, t in tensors.items() if key.startswith("sum.")}
        try:
            self.load_state_dict({**settings, "ring": ring, "sum": sums})
        except LawaError as exc:
            raise LawaError(f"{path}: {exc}") from None

    def _nothing_yet(self) -> str:
        if self.every_n_steps is None:
            when = f"the end of epoch {max(self.start, 1)} (start={self.start})"
        else:
            first = max(self.start, 1)
            first += -first % self.every_n_steps
            when = f"step {first} (every_n_steps={self.every_n_steps}, start={self.start})"
        return f"LawaScheduler: no snapshot yet, so there is no average; the first is taken at {when}"
