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
``lawa.step()`` after every ``optimizer.step()``.

LAWA (LAtest Weight Averaging) is from J. Kaddour, "Stop Wasting My Time! Saving Days of ImageNet and BERT
Training with Latest Weight Averaging", 2022 (arXiv:2209.14981): θ^LAWA_E = (1/k) Σ θ_i over the k latest
checkpoints i = E−k+1 … E, inclusive (the repository's one definition of k, as in ``lawa_utils.window``).
Until k snapshots exist the average is over those taken so far (``num_averaged`` says how many).

How it works. The scheduler keeps the k latest snapshots in a ring on ``device`` (CPU by default) and the sum
of their floating-point tensors, so a snapshot costs O(parameters) whatever k is: the new snapshot is copied
into the oldest slot and ``sum += new − evicted``. Add-and-subtract lets rounding error build up, so each
snapshot also recounts 1/k of the sum exactly from the ring (snapshot n recounts chunk n mod k of every
tensor's elements; the ring holds each tensor's k slots in one (k, …) tensor, so that is one reduction per
tensor reading k × 1/k = one model's worth). Every element is thus recounted every k snapshots: its error is
never more than k add/subtract pairs old. Memory: (k + 1) × the model's size, allocated at the first
snapshot (fp16/bf16 tensors are summed in fp32). Integer buffers such as BatchNorm's ``num_batches_tracked``
are taken from the newest snapshot, never averaged.

Wrapped models. DistributedDataParallel / DataParallel (``module.``) and ``torch.compile`` (``_orig_mod.``)
wrappers are looked through, so names are the plain model's. Under DDP every rank runs its own scheduler and
nothing is communicated: DDP keeps parameters identical on all ranks. Buffers are another matter: DDP
broadcasts rank 0's buffers at the start of each forward, so after a training step that saw different data on
each rank, BatchNorm running statistics differ between ranks until the next forward, and so do the buffers in
a snapshot. Recompute BN statistics on the average (``lawa_utils.recompute_bn``) when that matters.

Why there is no EMA or SWA mode (issue 8). Both are running averages without a window: SWA is the mean of all
snapshots since a start (k = ∞) and EMA is θ ← α·θ + (1−α)·θ_t. Neither needs the ring of k snapshots that is
this class's whole state, so as modes they would add a second update path (no eviction) and a second resume
format (no ring) behind the same methods. ``torch.optim.swa_utils.AveragedModel`` already does both in one
model's memory (SWA by default, EMA with ``multi_avg_fn=get_ema_multi_avg_fn(decay)``, ``use_buffers=True``
for buffers) and resumes through its own ``state_dict``; use it for those.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LawaScheduler"]

# Version 2 dropped version 1's second running sum "fresh" (memory (k+2)× → (k+1)×); version-1 states still
# load: their "sum" is the window's sum either way, and "fresh" is ignored.
_STATE_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_STATE_KEYS = ("version", "k", "every_n_steps", "start", "count", "num_snapshots", "ring", "sum")


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP/DataParallel (``module.``) and torch.compile (``_orig_mod.``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Name → tensor for every parameter and buffer: detached views, so in-place writes reach the model."""
    # Non-tensor entries (a module's get_extra_state) are not weights: neither snapshotted nor touched.
    return {name: t for name, t in _unwrap(model).state_dict().items() if isinstance(t, Tensor)}


def _is_averaged(t: Tensor) -> bool:
    # As in lawa_utils.average_state_dicts: floating-point tensors are averaged, all others are counters.
    return t.is_floating_point()


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    # A sum of k fp16/bf16 values loses digits quickly; accumulate those (and fp8) in fp32.
    if dtype.is_floating_point and torch.finfo(dtype).bits < 32:
        return torch.float32
    return dtype


def _check_layout(expected: Mapping[str, Tensor], got: Mapping[str, Tensor], where: str) -> None:
    """Raise ValueError unless ``got`` has exactly the names, shapes and dtypes of ``expected``."""
    missing, unexpected = expected.keys() - got.keys(), got.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(
            f"{where}: tensor names differ from the model's "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    for name, want in expected.items():
        have = got[name]
        if have.shape != want.shape or have.dtype != want.dtype:
            raise ValueError(
                f"{where}: {name} is {tuple(have.shape)} {have.dtype}, the model's is {tuple(want.shape)} {want.dtype}"
            )


@torch.no_grad()
def _copy_into(model: nn.Module, tensors: Mapping[str, Tensor], where: str) -> None:
    """Copy ``tensors`` into the model's parameters and buffers in place, matched by name."""
    live = _model_tensors(model)
    _check_layout(live, tensors, where)
    for name, t in live.items():
        t.copy_(tensors[name])


def _count_arg(name: str, value: Any, minimum: int) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < minimum:
        raise ValueError(f"LawaScheduler: {name} must be an integer >= {minimum}, got {value!r}")
    return number


class LawaScheduler:
    """Keep θ^LAWA, the uniform average of the k latest snapshots of a model, up to date while training.

    Args:
        model: the model being trained; may be wrapped in DDP, DataParallel or torch.compile.
        k: how many of the latest snapshots to average (the paper uses k=6 of 90 ImageNet epochs).
        every_n_steps: snapshot every N optimizer steps, counted by ``step()``. None (default): snapshot at
            every ``update()`` call, i.e. once per epoch.
        start: take no snapshot before this many steps (or epochs) have completed; 0 (default) starts at
            once. With ``every_n_steps`` the snapshots are the steps that are multiples of N and >= start.
        device: where snapshots and sums live (default CPU, so the accelerator holds only the live model).

    The settings are kept as the attributes ``k``, ``every_n_steps``, ``start`` and ``device``; treat them
    as read-only (``load_state_dict`` checks them against the saved ones).
    """

    def __init__(
        self,
        model: nn.Module,
        k: int,
        *,
        every_n_steps: int | None = None,
        start: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.k = _count_arg("k", k, 1)
        self.every_n_steps = None if every_n_steps is None else _count_arg("every_n_steps", every_n_steps, 1)
        self.start = _count_arg("start", start, 0)
        self.device = torch.device(device)
        self._model = _unwrap(model)
        self._count = 0  # optimizer steps (step mode) or epochs (update mode) seen so far
        self._num_snapshots = 0  # snapshots taken so far; the newest sits in slot (n − 1) % k
        # name → (k, *shape): the ring of the k latest snapshots; slot i holds snapshot i, i+k, …
        self._ring: dict[str, Tensor] = {}
        self._sum: dict[str, Tensor] = {}  # Σ over the filled slots of the floating-point tensors
        self._swapped = False

    @property
    def num_snapshots(self) -> int:
        """Snapshots taken since the start of training."""
        return self._num_snapshots

    @property
    def num_averaged(self) -> int:
        """How many snapshots the current average covers: min(num_snapshots, k)."""
        return min(self._num_snapshots, self.k)

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

    @property
    def _filled(self) -> int:
        """Ring slots holding a snapshot."""
        return min(self._num_snapshots, self.k)

    def _slot(self, index: int) -> dict[str, Tensor]:
        """Slot ``index`` of the ring as name → tensor (views into the ring)."""
        return {name: ring[index] for name, ring in self._ring.items()}

    def _allocate(self, live: Mapping[str, Tensor]) -> None:
        """Zeroed ring and sums for tensors laid out as ``live``: (k + 1) × the model, on ``device``."""
        self._ring, self._sum = {}, {}
        for name, t in live.items():
            self._ring[name] = torch.zeros((self.k, *t.shape), dtype=t.dtype, device=self.device)
            if _is_averaged(t):  # contiguous whatever the model's layout (channels_last): chunks are flat
                self._sum[name] = torch.zeros(t.shape, dtype=_sum_dtype(t.dtype), device=self.device)

    @torch.no_grad()
    def _snapshot(self) -> None:
        live = _model_tensors(self._model)
        if self._ring:
            _check_layout(live, self._slot(0), "LawaScheduler: the model changed since the first snapshot")
        else:
            self._allocate(live)
        n = self._num_snapshots
        # Snapshot n goes into slot n mod k and recounts chunk n mod k (that 1/k of every tensor's elements).
        slot_index, filling, filled = n % self.k, n < self.k, min(n + 1, self.k)
        for name, t in live.items():
            ring = self._ring[name]
            kept = ring[slot_index]
            total = self._sum.get(name)
            if total is None:
                kept.copy_(t)
                continue
            if not filling:
                total.sub_(kept)  # evict the oldest snapshot
            kept.copy_(t)
            total.add_(kept)
            size = total.numel()
            lo, hi = slot_index * size // self.k, (slot_index + 1) * size // self.k
            flat = total.view(-1)[lo:hi]
            torch.sum(ring[:filled].view(filled, size)[:, lo:hi], dim=0, dtype=total.dtype, out=flat)
        self._num_snapshots = n + 1

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """θ^LAWA as a new state dict on ``device``: plain-model names, float tensors averaged in their own
        dtype, integer tensors from the newest snapshot. Loads into the unwrapped model."""
        if not self._ring:
            raise ValueError(self._nothing_yet())
        newest = self._slot((self._num_snapshots - 1) % self.k)
        n = self.num_averaged
        return {
            name: (self._sum[name] / n).to(t.dtype) if name in self._sum else t.clone() for name, t in newest.items()
        }

    def averaged_model(self) -> nn.Module:
        """A deep copy of the (unwrapped) model holding θ^LAWA, on the live model's device.

        Its BatchNorm statistics are the averaged running statistics; refresh them with
        ``lawa_utils.recompute_bn(averaged, loader)`` as the paper does.
        """
        averaged = self.averaged_state_dict()
        model = copy.deepcopy(self._model)
        _copy_into(model, averaged, "LawaScheduler.averaged_model")
        return model

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module | None = None) -> Iterator[None]:
        """Load θ^LAWA into the live model for the ``with`` block, then restore its weights bit-exactly.

        The live parameters and buffers are copied aside to the scheduler's ``device`` (so the training device
        holds nothing extra) and copied back on exit, also when the block raises, so anything done inside
        (evaluation, ``recompute_bn``) leaves no trace.
        ``model`` defaults to the scheduler's own; pass another with the same names to evaluate there.
        """
        if self._swapped:
            raise RuntimeError("LawaScheduler.swapped_in(): the average is already swapped in")
        target = self._model if model is None else _unwrap(model)
        averaged = self.averaged_state_dict()
        with torch.no_grad():
            saved = {name: t.to(self.device, copy=True) for name, t in _model_tensors(target).items()}
        _copy_into(target, averaged, "LawaScheduler.swapped_in")
        del averaged  # held in the model now; the block runs with only `saved` beside the ring
        self._swapped = True
        try:
            yield
        finally:
            _copy_into(target, saved, "LawaScheduler.swapped_in")
            self._swapped = False

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically: settings, counters, the filled ring slots, the sum.

        Holds only ints, None, lists, dicts and tensors, so ``torch.load(..., weights_only=True)`` reads it.
        As with ``nn.Module.state_dict()``, the tensors are the scheduler's own: save or clone them. The slots
        are views into one (k, …) tensor per name, so ``torch.save`` writes each of those once, unfilled
        slots (zeros) included.
        """
        return {
            "version": _STATE_VERSION,
            "k": self.k,
            "every_n_steps": self.every_n_steps,
            "start": self.start,
            "count": self._count,
            "num_snapshots": self._num_snapshots,
            "ring": [self._slot(i) for i in range(self._filled)],
            "sum": dict(self._sum),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``. The scheduler must have the same k, every_n_steps and start, and the
        model the same tensor names, shapes and dtypes; otherwise ValueError says what differs."""
        where = "LawaScheduler.load_state_dict"
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"{where}: not a LawaScheduler state (missing {missing})")
        if state["version"] not in _READABLE_VERSIONS:
            raise ValueError(
                f"{where}: state version {state['version']!r}, this code reads versions {_READABLE_VERSIONS}"
            )
        for key in ("k", "every_n_steps", "start"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"{where}: the state was saved with {key}={state[key]!r} but this scheduler has "
                    f"{key}={getattr(self, key)!r}; build it with the saved settings"
                )
        ring, num_snapshots = list(state["ring"]), int(state["num_snapshots"])
        if len(ring) != min(num_snapshots, self.k):
            raise ValueError(f"{where}: {len(ring)} ring slots for {num_snapshots} snapshots with k={self.k}")
        live = _model_tensors(self._model)
        for slot in ring:
            _check_layout(live, slot, where)
        sum_layout = {
            name: torch.empty(t.shape, dtype=_sum_dtype(t.dtype), device="meta")
            for name, t in live.items()
            if _is_averaged(t)
        }
        _check_layout(sum_layout if ring else {}, state["sum"], f"{where} (sum)")

        self._ring, self._sum = {}, {}
        if ring:
            self._allocate(live)
            with torch.no_grad():
                for name, tensors in self._ring.items():
                    for index, slot in enumerate(ring):
                        tensors[index].copy_(slot[name])
                for name, total in self._sum.items():
                    total.copy_(state["sum"][name])
        self._count, self._num_snapshots = int(state["count"]), num_snapshots

    def _nothing_yet(self) -> str:
        if self.every_n_steps is None:
            when = f"the end of epoch {max(self.start, 1)} (start={self.start})"
        else:
            first = max(self.start, 1)
            first += -first % self.every_n_steps
            when = f"step {first} (every_n_steps={self.every_n_steps}, start={self.start})"
        return f"LawaScheduler: no snapshot yet, so there is no average; the first is taken at {when}"
