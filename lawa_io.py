"""Every checkpoint container LAWA reads and writes, one tensor at a time, safely.

    >>> import lawa_io
    >>> with lawa_io.open_checkpoint("runs/hf/checkpoint-500") as ckpt:    # a file or a directory
    ...     ckpt.layout, ckpt.entries()                                    # ('hf', ['model'])
    ...     w = ckpt.tensor("lm_head.weight")                              # read on demand (mmap / safe_open)
    >>> readers = [lawa_io.open_checkpoint(p) for p in paths]             # oldest first
    >>> report = lawa_io.average_checkpoints(readers, None, Path("lawa-500"))   # uniform LAWA, newest's layout

**Containers.** torch zip files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, ``.pth.tar``; memory-mapped),
legacy (pre-1.6, non-zip) torch files, ``.safetensors`` files, Hugging Face directories (one
``model.safetensors``, shards with ``model.safetensors.index.json``, ``pytorch_model.bin``, or ``.bin``
shards with their index) and ``torch.distributed.checkpoint`` (DCP) directories (``.metadata`` plus
``*.distcp``; the model is the ``model.`` subtree when the tree has one, else the top-level tensors outside
the optimizer, scheduler, data-loader and train-state groups, as torchtitan writes them).

**Layouts inside a file** (``CheckpointReader.layout``): ``lightning`` (``state_dict`` plus
``pytorch-lightning_version``; with Lightning's weight averaging the live weights are ``current_model_state``
and ``state_dict`` holds the running average), ``timm`` (``state_dict``, ``state_dict_ema``), ``torchvision``
(references' ``model``, ``model_ema``), ``fairseq`` (``model``), ``examples`` (pytorch/examples'
``state_dict``), ``nanogpt`` (``model`` or ``net``) and ``plain`` (a bare state dict). Every dict of model
weights is an *entry*; ``entries()`` lists them, the one a trajectory is made of first. Keys are given without
the DDP / torch.compile wrapper prefixes (``module.``, ``_orig_mod.``); writers put them back.

**Safety.** Pickles are read by :class:`InertUnpickler`: the globals in torch's ``weights_only`` allowlist and
:data:`SAFE_GLOBALS` are real; every other global the file names (a ``pathlib.Path`` or an OmegaConf config
in Lightning hyper-parameters, a dataclass, or a malicious ``__reduce__``) becomes an inert placeholder that
only records its arguments, so no code from the file runs. Tensors are not built while unpickling; they are
references to storage records, read later one at a time. A torch zip output keeps the newest input's pickle
and every record byte for byte and rewrites only the averaged tensors' storage records, so nothing of the
placeholders ever needs to be pickled again. ``trust=True`` uses ``torch.load(weights_only=False)`` instead
(only for files from a source you trust: unpickling can then run code).

**Averaging** (:func:`average_checkpoints`) streams tensor by tensor across the k inputs: floating tensors
accumulate in float32 (float64 stays float64; bf16, fp16 and fp8 are accumulated in float32 and written back
in their own dtype); integer tensors come from the newest input. Peak memory is the process floor plus about
two of the largest tensor, whatever the model size and k (DCP outputs hold the averaged model until
``dcp.save``: on W ranks each rank holds its 1/W share).
"""

from __future__ import annotations

import _compat_pickle
import argparse
import contextlib
import glob
import io
import json
import math
import os
import pickle
import shutil
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lawa_tidy import LawaError

if torch.distributed.is_available():
    # torch.distributed.nn.functional binds group.WORLD as default arguments when it is imported; imported after
    # init_process_group (DCP imports it), that keeps the default group alive past destroy_process_group, and its
    # gloo threads can then abort the interpreter's exit (std::terminate freeing a collective's tensors without
    # the GIL, exit -6). Imported here, before any group exists, it binds None.
    import torch.distributed.nn  # noqa: F401

__all__ = [
    "MAIN",
    "SAFE_GLOBALS",
    "CheckpointReader",
    "InertUnpickler",
    "Placeholder",
    "TensorRef",
    "average_checkpoints",
    "inert_loads",
    "open_checkpoint",
]

LIGHTNING_META = "meta.pt"  # the non-tensor part of a Lightning sharded checkpoint directory
CHUNK_ELEMENTS = 1 << 22  # a tensor larger than this many elements is averaged in pieces of it (16 MB of float32)
MAIN = "model"  # the entry name when the whole container is one model (plain state dict, safetensors, HF, DCP)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP/DataParallel and torch.compile wrappers

# HF Trainer / Accelerate files that resume training rather than describe the model: not copied by default.
TRAINING_STATE_FILES = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scheduler.bin", "scaler.pt", "sampler.bin",
                        "training_args.bin", "trainer_state.json")
TRAINING_STATE_PREFIXES = ("rng_state", "optimizer_", "random_states", "custom_checkpoint_", "scheduler_", "sampler_")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


# --------------------------------------------------------------------------------------------------
# Safe unpickling
# --------------------------------------------------------------------------------------------------


def _numpy_globals() -> list:
    """numpy objects that pytorch/examples-style checkpoints carry (RNG states, scalars); all harmless."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a torch dependency here
        return []
    found = [np.ndarray, np.dtype]
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    if core is not None:
        multiarray = core.multiarray
        found += [getattr(multiarray, name) for name in ("_reconstruct", "scalar") if hasattr(multiarray, name)]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return found


# Types that the checkpoint formats we read legitimately contain and that cannot run code when unpickled:
# fairseq stores its command line as argparse.Namespace; RNG states and metrics can be numpy objects.
SAFE_GLOBALS: list = [argparse.Namespace, *_numpy_globals()]


class Placeholder:
    """Stands in for an object of a class the file names but that is not allowlisted; runs no code.

    It records what the pickle would have passed (constructor arguments, ``__setstate__`` state, list and
    dict items) and nothing else, so a checkpoint's hyper-parameters (paths, OmegaConf configs, dataclasses)
    can be skipped while its tensors are read.

    >>> obj = inert_loads(pickle.dumps(Path("a")))          # doctest: +SKIP
    >>> type(obj).__name__, obj.args                       # ('pathlib.PosixPath', ('a',))
    """

    lawa_global = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items=[], setitems={})
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls cls(*args): nothing to do
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        # what a placeholder returns (getattr(cls, name), a factory) may itself be called by the pickle
        return type(self)(*args, **kwargs)

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.setitems[key] = value

    def __repr__(self) -> str:
        return f"<inert {self.lawa_global}>"


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """A tensor in a torch file, not yet read: its storage record, dtype, offset (elements), shape and strides."""

    key: str
    dtype: torch.dtype
    offset: int
    shape: torch.Size
    stride: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


def _rebuild_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return TensorRef(storage.key, storage.dtype, int(offset), torch.Size(size), tuple(stride))


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return TensorRef(storage.key, dtype, int(offset), torch.Size(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data  # a Parameter's weights are its data


def _rebuild_from_type(func, new_type, args, state=None):
    return func(*args)  # a tensor saved with attributes or as a subclass: its data is what func rebuilds


_REBUILDERS = {
    ("torch._tensor", "_rebuild_from_type"): _rebuild_from_type,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch._utils", "_rebuild_tensor"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


def _allowed_globals() -> dict[str, Any]:
    """``module.name`` → object for torch's weights_only allowlist, globals registered with torch, SAFE_GLOBALS."""
    allowed: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # a private torch function; without it only the explicit lists apply
        from torch import _weights_only_unpickler

        allowed.update(_weights_only_unpickler._get_allowed_globals())
    for item in [*torch.serialization.get_safe_globals(), *SAFE_GLOBALS]:
        obj, name = item if isinstance(item, tuple) else (item, f"{item.__module__}.{item.__qualname__}")
        allowed[name] = obj
    return allowed


def _storage_dtype(name: str) -> torch.dtype | None:
    from torch.storage import _get_dtype_from_pickle_storage_type

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _get_dtype_from_pickle_storage_type(name)
        except KeyError:
            return None


class InertUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint without running code from it: see :class:`Placeholder`.

    Tensors come back as :class:`TensorRef` (the storage record they live in), never built from the file.

    >>> tree = InertUnpickler(io.BytesIO(data)).load()       # doctest: +SKIP
    """

    def __init__(self, file, *, allowed: Mapping[str, Any] | None = None) -> None:
        super().__init__(file)
        self._allowed = _allowed_globals() if allowed is None else allowed
        self._placeholders: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # protocol-2 pickles (torch.save's) name builtins as Python 2 did (__builtin__.set): map as pickle does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[module, name]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in _REBUILDERS:
            return _REBUILDERS[module, name]
        if module == "torch" and name.endswith("Storage"):
            dtype = _storage_dtype(name)
            if dtype is not None:
                return _StorageType(dtype)
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _StorageType(torch.uint8)
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        if full not in self._placeholders:
            self._placeholders[full] = type(name, (Placeholder,), {"lawa_global": full})
        return self._placeholders[full]

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType):
            return _StorageRef(str(pid[2]), pid[1].dtype, int(pid[4]))
        raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:60]}")

    @property
    def placeholders(self) -> list[str]:
        """The globals that were replaced by placeholders, e.g. ``['pathlib.PosixPath']``."""
        return sorted(self._placeholders)


def inert_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`InertUnpickler` (no code from the data runs).

    >>> inert_loads(pickle.dumps({"a": 1}))
    {'a': 1}
    """
    return InertUnpickler(io.BytesIO(data)).load()


# --------------------------------------------------------------------------------------------------
# Layouts inside a file
# --------------------------------------------------------------------------------------------------


def _is_tensorlike(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, TensorRef))


def _is_weights(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(_is_tensorlike(v) for v in obj.values())


def _wrapper_prefix(keys: Sequence[str]) -> str:
    """The DDP (``module.``) / torch.compile (``_orig_mod.``) prefix shared by every key, '' if none."""
    prefix, changed = "", True
    while changed and keys:
        changed = False
        for p in WRAPPER_PREFIXES:
            if all(k.startswith(prefix + p) for k in keys):
                prefix, changed = prefix + p, True
    return prefix


def _layout_entries(obj: Any, name: str) -> tuple[str, list[str]]:
    """``(layout, entry keys)`` of a loaded pickle tree; the entry '' is the tree itself (a bare state dict)."""
    if _is_weights(obj):
        return "plain", [""]
    if not isinstance(obj, Mapping):
        raise LawaError(f"{name} is not a checkpoint (it holds a {type(obj).__name__}, not a dict of tensors)")

    def present(*keys: str) -> list[str]:
        return [k for k in keys if _is_weights(obj.get(k))]

    if "pytorch-lightning_version" in obj and present("state_dict"):
        return "lightning", present("current_model_state", "state_dict")
    if present("state_dict") and ("state_dict_ema" in obj or ("arch" in obj and "version" in obj)):
        return "timm", present("state_dict", "state_dict_ema", "state_dict_ema2")
    model = present("model")
    if model and any(k in obj for k in ("cfg", "optimizer_history", "extra_state")):
        return "fairseq", model
    if model and "lr_scheduler" in obj and "epoch" in obj:
        return "torchvision", present("model", "model_ema")
    if present("state_dict"):
        return "examples", present("state_dict", "ema_state_dict", "state_dict_ema")
    for key in ("model", "net"):
        if present(key):
            return "nanogpt", present(key, "ema", "model_ema")
    hidden = [str(k) for k, v in obj.items() if isinstance(v, Placeholder)]
    if any(isinstance(v, Mapping) and any(isinstance(t, Placeholder) for t in v.values()) for v in obj.values()):
        hidden.append("a dict of objects")
    keys = ", ".join(map(str, list(obj)[:8]))
    hint = f"; {', '.join(hidden[:3])} could only be read with --trust-checkpoints" if hidden else ""
    raise LawaError(f"{name} holds no model weights that LAWA recognises (top-level keys: {keys}){hint}")


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_SAFETENSORS_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


class CheckpointReader:
    """One checkpoint (a file or a directory) opened for reading tensors one at a time.

    >>> with open_checkpoint("epoch=3-step=40.ckpt") as ckpt:     # doctest: +SKIP
    ...     ckpt.layout, ckpt.entries()          # ('lightning', ['state_dict'])
    ...     ckpt.meta()["net.0.weight"]          # (torch.Size([8, 4]), torch.float32)
    ...     state = ckpt.state()                 # {key: tensor}, memory-mapped where the container allows

    ``container`` says how the bytes are stored (``torch-zip``, ``torch-object``, ``safetensors``, ``hf``,
    ``dcp``); ``layout`` what the file is. ``entry=None`` means ``entries()[0]``.
    """

    path: Path
    layout: str
    container: str
    placeholders: Sequence[str] = ()  # globals a pickle named that were kept inert (TorchZipReader fills it)

    def entries(self) -> list[str]:
        return [MAIN]

    def _entry(self, entry: str | None) -> str:
        names = self.entries()
        if entry is None:
            return names[0]
        if entry not in names:
            raise LawaError(f"{self.path} has no weights entry '{entry}' (it has {', '.join(names)})")
        return entry

    def meta(self, entry: str | None = None) -> dict[str, tuple[torch.Size, torch.dtype]]:
        raise NotImplementedError

    def tensor(self, key: str, entry: str | None = None) -> torch.Tensor:
        raise NotImplementedError

    def state(self, entry: str | None = None) -> dict[str, torch.Tensor]:
        return {key: self.tensor(key, entry) for key in self.meta(entry)}

    def ranged(self, key: str, entry: str | None = None) -> bool:
        """Whether :meth:`tensor_range` reads only the bytes it returns, so that a large tensor can be averaged
        piece by piece (safetensors: yes; the generic fallback below materialises the whole tensor)."""
        return False

    def tensor_range(self, key: str, start: int, stop: int, entry: str | None = None) -> torch.Tensor:
        """Elements ``start:stop`` of tensor ``key`` flattened (row-major)."""
        return self.tensor(key, entry).reshape(-1)[start:stop]

    def raw_key(self, key: str, entry: str | None = None) -> str:
        """The key as the container stores it (with its wrapper prefix)."""
        return key

    def close(self) -> None:
        pass

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.layout} {self.path}>"

    def _missing(self, key: str, entry: str | None) -> LawaError:
        where = f" (entry '{entry}')" if entry else ""
        return LawaError(f"{self.path} has no tensor '{key}'{where}")


class _TreeReader(CheckpointReader):
    """A torch file whose pickle tree is in memory: tensors are TensorRefs (zip, inert) or real tensors."""

    def __init__(self, path: Path, tree: Any, container: str) -> None:
        self.path, self.tree, self.container = path, tree, container
        self.layout, self._entry_keys = _layout_entries(tree, str(path))
        self._prefix = {}
        for e in [*self._entry_keys, *self.other_weights()]:
            self._prefix[e] = _wrapper_prefix(list(self._dict(e)))

    def _dict(self, entry_key: str) -> Mapping[str, Any]:
        return self.tree if entry_key == "" else self.tree[entry_key]

    def _entry(self, entry: str | None) -> str:
        # any other top-level dict of tensors (an EMA under a name no layout uses) may be named explicitly
        if entry is not None and entry in self.other_weights():
            return entry
        return super()._entry(entry)

    def entries(self) -> list[str]:
        return [MAIN if e == "" else e for e in self._entry_keys]

    def _key_of(self, entry: str | None) -> str:
        entry = self._entry(entry)
        return "" if self.layout == "plain" else entry

    def raw_key(self, key: str, entry: str | None = None) -> str:
        return self._prefix[self._key_of(entry)] + key

    def refs(self, entry: str | None = None) -> dict[str, Any]:
        """``{plain key: TensorRef or tensor}`` of an entry, in the file's order."""
        e = self._key_of(entry)
        cut = len(self._prefix[e])
        return {k[cut:]: v for k, v in self._dict(e).items()}

    def meta(self, entry: str | None = None) -> dict[str, tuple[torch.Size, torch.dtype]]:
        return {k: (torch.Size(v.shape), v.dtype) for k, v in self.refs(entry).items()}

    def tensor(self, key: str, entry: str | None = None) -> torch.Tensor:
        e = self._key_of(entry)
        ref = self._dict(e).get(self._prefix[e] + key)
        if ref is None:
            raise self._missing(key, entry)
        return ref if isinstance(ref, torch.Tensor) else self._materialize(ref)

    def _materialize(self, ref: TensorRef) -> torch.Tensor:
        raise NotImplementedError

    def other_weights(self) -> list[str]:
        """Top-level dicts of tensors that are not entries (optimizer state and the like), for reports."""
        if self.layout == "plain" or not isinstance(self.tree, Mapping):
            return []
        return [k for k, v in self.tree.items() if isinstance(k, str) and _is_weights(v) and k not in self._entry_keys]


class TorchZipReader(_TreeReader):
    """A torch zip file read through the inert unpickler; tensors are memory-mapped from their records."""

    def __init__(self, path: Path) -> None:
        try:
            self.zip = torch._C.PyTorchFileReader(str(path))
            data = self.zip.get_record("data.pkl")
            order = self.zip.get_record("byteorder").decode() if self.zip.has_record("byteorder") else "little"
        except Exception as exc:
            raise LawaError(f"{path} is not a readable PyTorch checkpoint, or is truncated ({_short(exc)})") from None
        if order != "little":
            raise LawaError(f"{path} was saved on a {order}-endian machine; only little-endian files are read")
        unpickler = InertUnpickler(io.BytesIO(data))
        try:
            tree = unpickler.load()
        except Exception as exc:
            raise LawaError(f"{path} could not be read safely ({_short(exc)}); if you trust its source, "
                            "rerun with --trust-checkpoints (trust=True)") from None
        self.placeholders = unpickler.placeholders
        self._mapped: torch.UntypedStorage | None = None
        super().__init__(path, tree, "torch-zip")

    def record_offset(self, key: str) -> int:
        return self.zip.get_record_offset(f"data/{key}")

    def _materialize(self, ref: TensorRef) -> torch.Tensor:
        if self._mapped is None:
            self._mapped = torch.UntypedStorage.from_file(str(self.path), False, self.path.stat().st_size)
        start = self.record_offset(ref.key)
        size = ref.dtype.itemsize
        if start % size:  # never for torch's 64-byte aligned records; copy rather than misread
            raw = self.zip.get_record(f"data/{ref.key}")
            base = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(ref.dtype)
            return base.as_strided(ref.shape, ref.stride, ref.offset)
        return torch.empty(0, dtype=ref.dtype).set_(self._mapped, start // size + ref.offset, ref.shape, ref.stride)

    def close(self) -> None:
        self._mapped = None


class TorchObjectReader(_TreeReader):
    """A torch file loaded whole with ``torch.load``: legacy (non-zip) files, or any file with ``trust=True``."""

    def __init__(self, path: Path, *, trust: bool) -> None:
        use_mmap = zipfile.is_zipfile(path)
        try:
            if trust:
                tree = torch.load(path, map_location="cpu", weights_only=False, mmap=use_mmap)
            else:
                already = set(torch.serialization.get_safe_globals())
                with torch.serialization.safe_globals([g for g in SAFE_GLOBALS if g not in already]):
                    tree = torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
        except pickle.UnpicklingError as exc:
            if "Weights only load failed" in str(exc):
                raise LawaError(f"{path} was refused: it is a legacy (non-zip) torch file holding objects outside "
                                "the safe allowlist; if you trust its source, rerun with --trust-checkpoints") from None
            raise LawaError(f"{path} is not a readable PyTorch checkpoint ({_short(exc)})") from None
        except Exception as exc:
            raise LawaError(f"{path} is not a readable PyTorch checkpoint, or is truncated ({_short(exc)})") from None
        super().__init__(path, tree, "torch-object")


def _safetensors_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte range of every tensor in a safetensors file, from its header (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    base = 8 + size
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


class SafetensorsReader(CheckpointReader):
    """A ``.safetensors`` file (or one shard of an HF directory) through ``safe_open``."""

    layout = "plain"
    container = "safetensors"

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        try:
            self._file = safe_open(str(path), framework="pt")
            self._meta = {}
            for key in self._file.keys():
                sl = self._file.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise LawaError(f"{path}: tensor '{key}' has dtype {sl.get_dtype()}, which LAWA does not average")
                self._meta[key] = (torch.Size(sl.get_shape()), dtype)
            self.metadata = self._file.metadata() or {}
            self._offsets = _safetensors_offsets(path)
        except LawaError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise LawaError(f"{path} is not a readable safetensors file ({_short(exc)})") from None
        self._prefix = _wrapper_prefix(list(self._meta))

    def raw_keys(self) -> list[str]:
        return list(self._meta)

    def raw_key(self, key: str, entry: str | None = None) -> str:
        return self._prefix + key

    def meta(self, entry: str | None = None) -> dict[str, tuple[torch.Size, torch.dtype]]:
        self._entry(entry)
        cut = len(self._prefix)
        return {k[cut:]: v for k, v in self._meta.items()}

    def _raw(self, key: str, entry: str | None) -> str:
        self._entry(entry)
        raw = self._prefix + key
        if raw not in self._meta:
            raise self._missing(key, entry)
        return raw

    def tensor(self, key: str, entry: str | None = None) -> torch.Tensor:
        raw = self._raw(key, entry)
        shape = self._meta[raw][0]
        return self._pread(raw, 0, shape.numel()).reshape(shape)

    def ranged(self, key: str, entry: str | None = None) -> bool:
        return True

    def tensor_range(self, key: str, start: int, stop: int, entry: str | None = None) -> torch.Tensor:
        raw = self._raw(key, entry)
        return self._pread(raw, start, min(stop, self._meta[raw][0].numel()))

    def _pread(self, raw: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of a stored tensor, flat. pread into memory this process owns, not safe_open's
        mapping: mapped pages stay resident until the file is closed, so a k-file average held every byte it had
        read (10.2 GB peak RSS against 1.3 GB this way, on a 1.6 GB model with k = 6; BENCHMARKS.md, F)."""
        begin, end = self._offsets[raw]
        dtype = self._meta[raw][1]
        first, last = begin + start * dtype.itemsize, begin + max(stop, start) * dtype.itemsize
        if last > end:
            raise LawaError(f"{self.path}: tensor '{raw}' is truncated (its header says {end - begin} bytes)")
        buf = bytearray(last - first)
        if not buf:
            return torch.empty(0, dtype=dtype)
        with open(self.path, "rb") as f:
            got = os.preadv(f.fileno(), [buf], first)
        if got != len(buf):
            raise LawaError(f"{self.path}: tensor '{raw}' is truncated ({got} of {len(buf)} bytes)")
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype)

    def close(self) -> None:
        self._file = None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


class HFReader(CheckpointReader):
    """A Hugging Face checkpoint directory: safetensors or ``.bin``, one file or shards with their index."""

    layout = "hf"
    container = "hf"

    def __init__(self, path: Path, *, trust: bool = False) -> None:
        self.path = path
        indexes = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
        index_files = [n for n in indexes if (path / n).is_file()]
        single = [n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if index_files:
            self.index_name = index_files[0]
            self.index = self._read_index(path / self.index_name)
            names = list(dict.fromkeys(self.index["weight_map"].values()))
        elif single:
            self.index_name, self.index, names = None, None, [single[0]]
        else:
            raise LawaError(f"{path} holds no model weights (no {', '.join(HF_WEIGHT_FILES)})")
        self.shards: dict[str, CheckpointReader] = {}
        for name in names:
            file = path / name
            if not file.is_file():
                raise LawaError(f"{file} is missing (named in {path / self.index_name})")
            self.shards[name] = _open_file(file, trust=trust)
        self._where: dict[str, str] = {}  # raw key -> shard name
        self._meta: dict[str, tuple[torch.Size, torch.dtype]] = {}
        for name, shard in self.shards.items():
            for key, m in _raw_meta(shard).items():
                if key in self._where:
                    raise LawaError(f"{path}: tensor '{key}' is in two shards ({self._where[key]} and {name})")
                self._where[key], self._meta[key] = name, m
        if self.index is not None:
            for key, name in self.index["weight_map"].items():
                if self._where.get(key) != name:
                    found = f"it is in {self._where[key]}" if key in self._where else "no shard holds it"
                    raise LawaError(f"{path / self.index_name}: maps '{key}' to {name}, but {found}")
            unmapped = [k for k in self._where if k not in self.index["weight_map"]]
            if unmapped:
                raise LawaError(f"{path / self._where[unmapped[0]]} holds '{unmapped[0]}', which "
                                f"{self.index_name} does not map")
        self._prefix = _wrapper_prefix(list(self._meta))

    @staticmethod
    def _read_index(index: Path) -> dict:
        try:
            data = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LawaError(f"{index} is not a readable index ({_short(exc)})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise LawaError(f"{index} has no weight_map")
        for key, name in weight_map.items():
            if not isinstance(name, str) or os.path.isabs(name) or Path(name).name != name or name in ("", ".", ".."):
                raise LawaError(f"{index}: '{key}' points outside its directory ({name!r})")
        return data

    @property
    def files(self) -> list[str]:
        return list(self.shards)

    def shard_keys(self, name: str) -> list[str]:
        """Raw keys in one shard, in the shard's order."""
        return list(_raw_meta(self.shards[name]))

    def raw_key(self, key: str, entry: str | None = None) -> str:
        return self._prefix + key

    def meta(self, entry: str | None = None) -> dict[str, tuple[torch.Size, torch.dtype]]:
        self._entry(entry)
        cut = len(self._prefix)
        return {k[cut:]: v for k, v in self._meta.items()}

    def raw_tensor(self, raw: str) -> torch.Tensor:
        shard = self.shards[self._where[raw]]
        if isinstance(shard, SafetensorsReader):
            return shard.tensor(raw[len(shard._prefix):])
        return shard.tensor(raw[len(shard._prefix[""]):])

    def tensor(self, key: str, entry: str | None = None) -> torch.Tensor:
        self._entry(entry)
        raw = self._prefix + key
        if raw not in self._where:
            raise self._missing(key, entry)
        return self.raw_tensor(raw)

    def ranged(self, key: str, entry: str | None = None) -> bool:
        shard = self.shards.get(self._where.get(self._prefix + key, ""))
        return isinstance(shard, SafetensorsReader)

    def tensor_range(self, key: str, start: int, stop: int, entry: str | None = None) -> torch.Tensor:
        if not self.ranged(key, entry):  # a .bin shard, or no such tensor: tensor() reads or raises
            return super().tensor_range(key, start, stop, entry)
        self._entry(entry)
        raw = self._prefix + key
        shard = self.shards[self._where[raw]]
        return shard.tensor_range(raw[len(shard._prefix):], start, stop)

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()


def _raw_meta(shard: CheckpointReader) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Keys as stored (prefix kept) of a plain shard."""
    if isinstance(shard, SafetensorsReader):
        return dict(shard._meta)
    if not isinstance(shard, _TreeReader) or shard.layout != "plain":
        raise LawaError(f"{shard.path} is not a shard of tensors (it is a {shard.layout} checkpoint)")
    return {k: (torch.Size(v.shape), v.dtype) for k, v in shard.tree.items()}


def _open_file(path: Path, *, trust: bool) -> CheckpointReader:
    if path.stat().st_size == 0:
        raise LawaError(f"{path} is empty (a truncated or interrupted write?)")
    if path.name.endswith(".safetensors"):
        return SafetensorsReader(path)
    if zipfile.is_zipfile(path) and not trust:
        return TorchZipReader(path)
    return TorchObjectReader(path, trust=trust)


def open_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> CheckpointReader:
    """Open a checkpoint file or directory for lazy reading; see :class:`CheckpointReader`.

    >>> with open_checkpoint("runs/timm/checkpoint-7.pth.tar") as ckpt:    # doctest: +SKIP
    ...     ckpt.entries()                       # ['state_dict', 'state_dict_ema']
    ...     ema = ckpt.state("state_dict_ema")

    Directories: Hugging Face (weights files named in :data:`HF_WEIGHT_FILES`), DCP (``.metadata``), or an
    HF Trainer checkpoint saved under FSDP whose model is one ``pytorch_model_fsdp_*`` DCP directory (opened
    as that DCP directory). An HF index file given as the path opens its directory. ``trust=True``
    unpickles with ``torch.load(weights_only=False)``, which can run code from the file: only for files from
    a source you trust.
    """
    path = Path(path)
    if not path.exists():
        raise LawaError(f"{path} does not exist")
    if path.is_file() and path.name.endswith(".index.json"):
        path = path.parent
    if path.is_dir():
        if (path / ".metadata").is_file():
            return DCPReader(path)
        if any((path / n).is_file() for n in HF_WEIGHT_FILES):
            return HFReader(path, trust=trust)
        fsdp = sorted(p for p in path.glob("pytorch_model_fsdp_*") if (p / ".metadata").is_file())
        if len(fsdp) == 1:  # HF Trainer / Accelerate under FSDP with sharded state dicts: the model is a DCP tree
            return DCPReader(fsdp[0])
        raise LawaError(f"{path} is a directory with no weights (no {', '.join(HF_WEIGHT_FILES)} and no DCP .metadata)")
    return _open_file(path, trust=trust)


def _dcp_globals() -> dict[str, Any]:
    """The classes a DCP ``.metadata`` pickle legitimately names: DCP's own dataclasses and torch basics."""
    from torch.distributed.checkpoint import filesystem, metadata

    allowed = _allowed_globals()
    for mod, names in ((metadata, ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                   "TensorProperties", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING")),
                       (filesystem, ("_StorageInfo",))):
        for name in names:
            if hasattr(mod, name):
                allowed[f"{mod.__name__}.{name}"] = getattr(mod, name)
    return allowed


def _read_dcp_metadata(path: Path):
    """A DCP directory's ``.metadata`` (a pickle), read with the inert unpickler: no code from it runs."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

    file = path / ".metadata"
    try:
        with open(file, "rb") as f:
            md = InertUnpickler(f, allowed=_dcp_globals()).load()
    except Exception as exc:
        raise LawaError(f"{file} is not a readable DCP metadata file ({_short(exc)})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise LawaError(f"{file} is not DCP metadata (it holds a {type(md).__name__})")
    for fqn, item in md.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata) and not isinstance(item.properties.dtype, torch.dtype):
            raise LawaError(f"{file}: '{fqn}' has no torch dtype")
    if not isinstance(md.storage_meta, StorageMeta):
        md.storage_meta = StorageMeta()  # as DCP's reader does; a placeholder here would never be used anyway
    for index, info in (md.storage_data or {}).items():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or os.path.isabs(name) or Path(name).name != name or name in ("", ".", ".."):
            raise LawaError(f"{file}: '{getattr(index, 'fqn', index)}' points outside its directory ({name!r})")
        if not (path / name).is_file():
            raise LawaError(f"{path / name} is missing (named in {file})")
    return md


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """DCP warns on every single-process call that it assumes a single process, which is what we ask for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# Top-level groups of a DCP tree that hold training state, not the model: torchtitan writes the model's keys at the
# top level beside these (its `_flattened_model_states_sd`).
_DCP_TRAINING_STATE = ("optimizer.", "optimizers.", "optim.", "lr_scheduler.", "lr_schedulers.", "scheduler.",
                       "dataloader.", "data_loader.", "train_state.", "rng_state.", "extra_state.")


class DCPReader(CheckpointReader):
    """A torch.distributed.checkpoint directory (``.metadata`` plus ``*.distcp``); the model is its ``model.``
    subtree when the tree has one (FSDP2 stacks keep the optimizer beside it), else every tensor outside the
    training-state groups (``optimizer.``, ``lr_scheduler.``, ``dataloader.``, ``train_state.``, …), as
    torchtitan writes its model keys at the top level.

    Tensors are read with DCP's own ``FileSystemReader`` (``dcp.load`` of one tensor, no process group); the
    metadata pickle is read safely (:func:`_read_dcp_metadata`).
    """

    layout = "dcp"
    container = "dcp"

    def __init__(self, path: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        self.metadata = _read_dcp_metadata(path)
        tensors = {fqn: m for fqn, m in self.metadata.state_dict_metadata.items()
                   if isinstance(m, TensorStorageMetadata)}
        self.subtree = "model." if any(f.startswith("model.") for f in tensors) else ""
        self._fqns = [f for f in tensors if f.startswith(self.subtree)
                      and (self.subtree or not f.startswith(_DCP_TRAINING_STATE))]
        if not self._fqns:
            raise LawaError(f"{path} is a DCP checkpoint with no tensors")
        self._meta = {f: (torch.Size(tensors[f].size), tensors[f].properties.dtype) for f in self._fqns}
        self._prefix = self.subtree + _wrapper_prefix([f[len(self.subtree):] for f in self._fqns])
        self.others = [f for f in self.metadata.state_dict_metadata if f not in self._meta]
        metadata = self.metadata

        class _SafeReader(FileSystemReader):
            def read_metadata(self, *args: Any, **kwargs: Any):
                return metadata  # never DCP's pickle.load of the file

        self._reader = _SafeReader(str(path))

    def raw_key(self, key: str, entry: str | None = None) -> str:
        return self._prefix + key

    def meta(self, entry: str | None = None) -> dict[str, tuple[torch.Size, torch.dtype]]:
        self._entry(entry)
        cut = len(self._prefix)
        return {f[cut:]: m for f, m in self._meta.items()}

    def tensor(self, key: str, entry: str | None = None) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        self._entry(entry)
        fqn = self._prefix + key
        if fqn not in self._meta:
            raise self._missing(key, entry)
        shape, dtype = self._meta[fqn]
        out = {fqn: torch.empty(shape, dtype=dtype)}
        self._reader.reset()
        try:
            with _quiet_dcp():
                dcp.load(out, storage_reader=self._reader, no_dist=True)
        except Exception as exc:  # DCP wraps a reader's failure in its own exception types
            raise LawaError(f"{self.path}: cannot read '{fqn}' ({_short(exc)})") from None
        return out[fqn]

    def write_average(self, avg: _Averager, tmp: Path, names: Sequence[str], plans, report, copy_training_state):
        """Write the averaged model as a DCP directory ``tmp`` (on W ranks: each rank its share)."""
        import torch.distributed.checkpoint as dcp

        plan = plans[MAIN]
        rank, world = _rank_world()
        mine = _share(plan, rank, world)
        state = {self.raw_key(k): avg(MAIN, k) for k in mine}
        if self.others:
            report["notes"].append(f"not written: {len(self.others)} entries of {self.path.name} that are not the "
                                   f"model (e.g. {self.others[0]})")
        if copy_training_state:
            report["notes"].append("copy_training_state does not apply to DCP outputs: only the model is written")
        with _quiet_dcp():
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=world == 1)
        if rank == 0:
            self.copy_lightning_meta(tmp, report)
        return sum(t.nbytes for t in state.values())

    def copy_lightning_meta(self, tmp: Path, report: dict[str, Any]) -> None:
        """Lightning's sharded checkpoints (``epoch=E-step=S.ckpt/``) keep everything that is not a tensor in
        ``meta.pt``, and Lightning only takes a directory that has one for a checkpoint: copied byte for byte
        (never unpickled here), so ``Trainer.validate/test/predict(ckpt_path=...)`` read the average."""
        meta = self.path / LIGHTNING_META
        if meta.is_file():
            shutil.copy2(meta, tmp / LIGHTNING_META)
            report["notes"].append(f"copied {LIGHTNING_META} (Lightning's non-tensor state) from {self.path.name}; "
                                   "no optimizer state is written, so it cannot resume fitting")


# --------------------------------------------------------------------------------------------------
# Averaging, tensor by tensor
# --------------------------------------------------------------------------------------------------


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


class _Averager:
    """Averages one tensor at a time across the readers (oldest first), checking as it goes."""

    def __init__(self, readers: Sequence[CheckpointReader], weights: Sequence[float] | None,
                 dtype: torch.dtype | None) -> None:
        self.readers, self.weights, self.dtype = list(readers), weights, dtype
        self.bytes_read = 0
        self.tensors = 0
        self._newest_meta: dict[str, dict[str, tuple[torch.Size, torch.dtype]]] = {}

    def plan(self, entry: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
        """The output's ``{key: (shape, dtype)}`` of an entry, after checking that every input agrees."""
        newest = self.readers[-1]
        want = newest.meta(entry)
        for r in self.readers[:-1]:
            have = r.meta(entry)
            if have.keys() != want.keys():
                extra = sorted(set(have) - set(want))
                missing = sorted(set(want) - set(have))
                what = f"'{extra[0]}' is only in {r.path}" if extra else f"'{missing[0]}' is only in {newest.path}"
                raise LawaError(f"mismatched keys in '{entry}' between {r.path} and {newest.path}: {what}")
            for key, (shape, dt) in have.items():
                if shape != want[key][0]:
                    raise LawaError(f"mismatched shapes for '{key}': {tuple(shape)} in {r.path}, "
                                    f"{tuple(want[key][0])} in {newest.path}")
                if dt != want[key][1] and self.dtype is None and (_is_float(dt) or _is_float(want[key][1])):
                    raise LawaError(f"'{key}' is {str(dt)[6:]} in {r.path} but {str(want[key][1])[6:]} in "
                                    f"{newest.path}; pass dtype= (--dtype) to cast the window to one dtype")
        if self.dtype is None:
            return want
        return {k: (s, self.dtype if _is_float(d) else d) for k, (s, d) in want.items()}

    def __call__(self, entry: str, key: str) -> torch.Tensor:
        """The averaged tensor ``key`` of ``entry`` in its output dtype (integers: the newest input's)."""
        newest = self.readers[-1]
        if entry not in self._newest_meta:
            self._newest_meta[entry] = newest.meta(entry)
        shape, dtype = self._newest_meta[entry][key]
        if not _is_float(dtype):
            t = newest.tensor(key, entry)
            self.bytes_read += t.nbytes
            return t
        out_dtype = self.dtype or dtype
        acc_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
        numel = shape.numel()
        self.tensors += 1
        if numel <= CHUNK_ELEMENTS or not all(r.ranged(key, entry) for r in self.readers):
            acc = self._sum(key, acc_dtype, lambda r: r.tensor(key, entry))
            return acc if acc.dtype == out_dtype else acc.to(out_dtype)
        # A large tensor whose inputs can be read piece by piece: the float32 sum of one piece at a time, so the
        # memory is the output plus a piece per input, not a full-size float32 sum beside a full-size input.
        # Pieces are whole multiples of CHUNK_ELEMENTS, so the vectorised kernels see the same elements in the
        # same lanes as on the whole tensor: the same bits.
        out = torch.empty(shape, dtype=out_dtype)
        flat = out.view(-1)
        for start in range(0, numel, CHUNK_ELEMENTS):
            stop = min(start + CHUNK_ELEMENTS, numel)
            flat[start:stop] = self._sum(key, acc_dtype, lambda r, a=start, b=stop: r.tensor_range(key, a, b, entry))
        return out

    def _sum(self, key: str, acc_dtype: torch.dtype, read: Callable[[CheckpointReader], torch.Tensor]) -> torch.Tensor:
        """Σ w_i x_i over the readers (oldest first) of what ``read`` returns, in ``acc_dtype``; NaN/Inf refused."""
        acc = None
        for i, reader in enumerate(self.readers):
            t = read(reader)
            self.bytes_read += t.nbytes
            if acc is None:
                acc = torch.zeros(t.shape, dtype=acc_dtype)
            # bf16/fp16/fp32 add into the float32 sum in place; fp8 has no such kernels and is widened first
            x = t if t.dtype in (acc_dtype, torch.float16, torch.bfloat16) else t.to(acc_dtype)
            # one cheap pass; isfinite(x) allocates a full-size temporary, so it only confirms
            if not torch.isfinite(x.sum()) and not bool(torch.isfinite(x).all()):
                raise LawaError(f"{reader.path}: tensor '{key}' has NaN/Inf values; refusing to average it")
            acc.add_(x, alpha=1.0 if self.weights is None else self.weights[i])
            del t, x
        if self.weights is None:
            acc.div_(len(self.readers))  # sum, then one division: the same bits as lawa_utils' averages
        return acc


def _part_name(path: Path, *, directory: bool = True) -> Path:
    """The temporary beside ``path`` that a writer builds its output under: ``.NAME.partPID`` for a directory,
    ``.NAME.tmpPID`` for a file (the name ``lawa_tidy.atomic_write`` uses, so either cleans up after the other)."""
    return path.with_name(f".{path.name}.{'part' if directory else 'tmp'}{os.getpid()}")


def _remove_stale_parts(path: Path) -> None:
    """Delete temporaries of ``path`` left by writers that were killed (their pid no longer runs)."""
    for kind in ("part", "tmp"):
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.{kind}*"):
            pid = tmp.name.rsplit(f".{kind}", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                _remove(tmp)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, out: Path, *, force: bool) -> None:
    """Rename the finished temporary ``tmp`` to ``out``; an existing ``out`` (force) is swapped out first."""
    _fsync(tmp)
    if out.exists() and out.is_dir() and not out.is_symlink():
        if not force:
            raise LawaError(f"{out} already exists; pass --force (force=True) to overwrite it")
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    _fsync(out.parent)


def _view_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _write_safetensors(path: Path, keys: Sequence[tuple[str, torch.Size, torch.dtype]],
                       produce: Callable[[str], torch.Tensor], metadata: Mapping[str, str]) -> int:
    """Write a safetensors file by streaming: the header (from shapes and dtypes), then each tensor's bytes.

    Only one tensor is in memory at a time. Returns the bytes of tensor data written.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    start = 0
    for key, shape, dtype in keys:
        if dtype not in _SAFETENSORS_NAMES:
            raise LawaError(f"{path}: safetensors cannot store '{key}' of dtype {dtype}")
        n = shape.numel() * dtype.itemsize
        header[key] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [start, start + n]}
        start += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key, shape, dtype in keys:
            t = produce(key)
            if t.shape != shape or t.dtype != dtype:
                raise LawaError(f"{path}: '{key}' came out {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
            f.write(_view_bytes(t))
            del t  # before the next produce(): else two averaged tensors are alive at once
        f.flush()
        os.fsync(f.fileno())
    return start


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= max(size, 1)
    return tuple(reversed(strides))


def _write_zip(reader: TorchZipReader, path: Path, targets: Mapping[str, Callable[[str], torch.Tensor]],
               out_dtypes: Mapping[str, Mapping[str, torch.dtype]], extra: Mapping[str, bytes]) -> int:
    """Write ``reader``'s file again with every record byte for byte, except the storages of the tensors in
    ``targets`` (tree entry key → ``produce(raw key)``), which get the produced values. Returns bytes written.

    The pickle (``data.pkl``) is the input's, so everything it holds, placeholders included, comes back as it
    was; a produced tensor must keep its dtype and shape. ``extra`` records are added (provenance).
    """
    by_storage: dict[str, list[tuple[TensorRef, str, str]]] = {}
    for e, _ in targets.items():
        d = reader._dict(e)
        for raw, ref in d.items():
            if isinstance(ref, TensorRef) and _is_float(ref.dtype):
                want = out_dtypes[e][raw]
                if want != ref.dtype:
                    raise LawaError(f"{reader.path} stores '{raw}' as {ref.dtype}; dtype={want} would need its pickle "
                                    "rewritten: write a .safetensors output, or pass trust=True (--trust-checkpoints)")
                by_storage.setdefault(ref.key, []).append((ref, e, raw))
    written = 0
    # through a file object, as torch.save(obj, f) writes: the archive's name prefix is then "archive"
    with open(path, "wb") as f:
        w = torch._C.PyTorchFileWriter(f)
        try:
            written = _copy_records(w, reader, by_storage, targets, extra)
        finally:
            # the writer must finish while the file is open, also on failure (the temporary is deleted then):
            # its destructor would otherwise write to a closed file and abort the process
            w.write_end_of_file()
            del w
        f.flush()
        os.fsync(f.fileno())
    return written


def _copy_records(w, reader: TorchZipReader, by_storage, targets, extra: Mapping[str, bytes]) -> int:
    written = 0
    version = reader.zip.get_record("version").decode().strip() if reader.zip.has_record("version") else ""
    if version.isdigit():
        w.set_min_version(int(version))
    mapped = torch.UntypedStorage.from_file(str(reader.path), False, reader.path.stat().st_size)
    for name in reader.zip.get_all_records():
        if name in ("version", ".data/version", ".data/serialization_id") or name in extra:
            continue  # the writer writes the first three itself; an earlier average's provenance is replaced
        size = reader.zip.get_record_size(name)
        key = name[5:] if name.startswith("data/") else None
        if key in by_storage:
            written += _write_storage(w, reader, mapped, name, size, by_storage[key], targets)
            continue
        offset = reader.zip.get_record_offset(name)
        w.write_record(name, mapped[offset : offset + size] if size else b"", size)
        written += size
    for name, data in extra.items():
        w.write_record(name, data, len(data))
    return written


def _write_storage(w, reader: TorchZipReader, mapped, name: str, size: int,
                   tensors: list[tuple[TensorRef, str, str]], targets) -> int:
    unique: dict[tuple, tuple[TensorRef, str, str]] = {}
    for ref, e, raw in tensors:  # tied weights share a storage, offset and shape: averaged once
        unique.setdefault((ref.offset, tuple(ref.shape), ref.stride), (ref, e, raw))
    if len(unique) == 1:
        ref, e, raw = next(iter(unique.values()))
        if ref.offset == 0 and ref.stride == _contiguous_strides(ref.shape) and ref.nbytes == size:
            t = targets[e](raw).contiguous()  # the common case: one tensor fills its storage
            w.write_record(name, t.untyped_storage() if size else b"", size)
            return size
    base = torch.empty(0, dtype=torch.uint8).set_(mapped, reader.zip.get_record_offset(name), (size,), (1,)).clone()
    for ref, e, raw in unique.values():
        typed = base.view(ref.dtype) if size else base
        typed.as_strided(ref.shape, ref.stride, ref.offset).copy_(targets[e](raw))
    w.write_record(name, base.untyped_storage() if size else b"", size)
    return size


def _hf_skipped(name: str) -> bool:
    return name in TRAINING_STATE_FILES or name.startswith(TRAINING_STATE_PREFIXES)


def average_checkpoints(
    readers: Sequence[CheckpointReader],
    weights: Sequence[float] | None,
    out: str | os.PathLike,
    *,
    entries: Sequence[str] | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    copy_training_state: bool = False,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Average checkpoints (oldest first) into ``out`` in the newest input's layout; returns a report.

    >>> readers = [open_checkpoint(f"run/checkpoint-{s}") for s in (300, 400, 500)]    # doctest: +SKIP
    >>> report = average_checkpoints(readers, None, "run/lawa-500")      # uniform: θ = (1/k) Σ θ_i
    >>> report["entries"], report["seconds"]                              # (['model'], 0.8)

    ``weights`` (oldest first; ``None`` = uniform, the sum divided once) multiply the inputs. Every entry
    is averaged on its own (``entries=[KEY]`` picks some). Tensors stream one at a time: float32 sums
    (float64 for float64), written back in their own dtype, or in ``dtype`` when given (a window mixing
    dtypes is refused without it); integer tensors come from the newest input; NaN/Inf is refused.

    Outputs: a torch file keeps the newest input's records byte for byte except the averaged storages; an
    HF directory gets the same shards and index, the newest's non-weight files (config, tokenizer, …; not
    its optimizer, scheduler, RNG and trainer state unless ``copy_training_state``); a ``.safetensors`` path
    gets one entry as a safetensors file; a DCP input gives a DCP directory. Outputs are built under a
    temporary name beside ``out`` and renamed into place; an existing ``out`` is refused unless ``force``.
    The report holds ``entries`` (averaged), ``kept`` (weights-like dicts copied from the newest input),
    ``notes``, ``bytes_read``, ``bytes_written``, ``seconds``.
    """
    start = time.perf_counter()
    rank, world = _rank_world()
    if world > 1:
        return _average_on_ranks(readers, weights, Path(out), entries, dtype, force, copy_training_state,
                                 provenance, rank, world, start)
    job = _prepare(readers, weights, Path(out), entries, dtype, force, provenance)
    written = _write_local(job, force, copy_training_state)
    return job.finish(written, start)


@dataclass
class _Job:
    """What an average needs once its inputs are checked: the averager, per-entry plans, the report so far."""

    readers: list[CheckpointReader]
    out: Path
    names: list[str]
    plans: dict[str, dict[str, tuple[torch.Size, torch.dtype]]]
    avg: _Averager
    report: dict[str, Any]
    lawa: dict[str, Any]

    @property
    def newest(self) -> CheckpointReader:
        return self.readers[-1]

    def fingerprint(self) -> str:
        """Inputs and every planned tensor's name, shape and dtype: ranks must agree on it before writing."""
        plans = {e: [(k, list(s), str(d)) for k, (s, d) in p.items()] for e, p in self.plans.items()}
        return json.dumps([self.report["files"], self.report["weights"], str(self.out), plans], sort_keys=True)

    def finish(self, written: int, start: float) -> dict[str, Any]:
        self.report.update(bytes_read=self.avg.bytes_read, bytes_written=written, tensors=self.avg.tensors,
                           seconds=round(time.perf_counter() - start, 3))
        return self.report


def _prepare(readers, weights, out: Path, entries, dtype, force: bool, provenance) -> _Job:
    readers = list(readers)
    if not readers:
        raise LawaError("nothing to average: no checkpoints given")
    newest = readers[-1]
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != len(readers):
            raise LawaError(f"{len(weights)} weights given for {len(readers)} checkpoints")
        if not all(math.isfinite(w) for w in weights):
            raise LawaError(f"weights must be finite, got {weights}")
    if out.exists() and not force:
        raise LawaError(f"{out} already exists; pass --force (force=True) to overwrite it")
    if not out.parent.is_dir():
        raise LawaError(f"cannot write {out}: directory {out.parent} does not exist")
    if any(out.resolve() == r.path.resolve() for r in readers):
        raise LawaError(f"{out} is one of the inputs; write the average somewhere else")
    names = list(entries) if entries else newest.entries()
    for r in readers:
        for e in names:
            r._entry(e)  # names the file that lacks it
    avg = _Averager(readers, weights, dtype)
    plans = {e: avg.plan(e) for e in names}
    report: dict[str, Any] = {"out": str(out), "layout": newest.layout, "container": newest.container,
                              "entries": names, "kept": [], "notes": [], "files": [str(r.path) for r in readers],
                              "weights": weights or [1.0 / len(readers)] * len(readers)}
    skipped = [e for e in newest.entries() if e not in names]
    if skipped:
        report["kept"] += skipped
        report["notes"].append(f"not averaged, copied from {newest.path.name}: {', '.join(skipped)}")
    if isinstance(newest, _TreeReader):
        others = [o for o in newest.other_weights() if o not in names]
        if others:
            report["kept"] += others
            report["notes"].append(f"copied from {newest.path.name}, not averaged: {', '.join(others)} (dicts of "
                                   "tensors outside the weights entries; name one in entries=[...] to average it)")
    inert = newest.placeholders
    if inert:
        report["notes"].append(f"kept as stored, never unpickled: {', '.join(inert[:5])}"
                               + (f" and {len(inert) - 5} more" if len(inert) > 5 else ""))
    lawa = {"files": report["files"], "weights": report["weights"], "entries": names, **(provenance or {})}
    return _Job(readers, out, names, plans, avg, report, lawa)


def _write_local(job: _Job, force: bool, copy_training_state: bool) -> int:
    """Write the average in one process, under a temporary beside ``out``, and rename it into place."""
    newest, out, names, plans, avg, lawa = job.newest, job.out, job.names, job.plans, job.avg, job.lawa
    _remove_stale_parts(out)
    directory = isinstance(newest, (HFReader, DCPReader)) and not out.name.endswith(".safetensors")
    tmp = _part_name(out, directory=directory)
    try:
        if out.name.endswith(".safetensors") or isinstance(newest, SafetensorsReader):
            written = _average_to_safetensors(newest, out, tmp, names, plans, avg, lawa)
        elif isinstance(newest, DCPReader):
            written = newest.write_average(avg, tmp, names, plans, job.report, copy_training_state)
        elif isinstance(newest, HFReader):
            tmp.mkdir()
            written = _average_hf(newest, tmp, plans[MAIN], avg, lawa, job.report, copy_training_state)
        elif isinstance(newest, TorchZipReader):
            targets = {newest._key_of(e): (lambda raw, e=e: avg(e, raw[len(newest._prefix[newest._key_of(e)]):]))
                       for e in names}
            out_dtypes = {newest._key_of(e): {newest.raw_key(k, e): d for k, (_, d) in plans[e].items()} for e in names}
            written = _write_zip(newest, tmp, targets, out_dtypes, {".data/lawa.json": json.dumps(lawa).encode()})
        else:
            written = _average_object(newest, tmp, names, avg, lawa)
        _publish(tmp, out, force=force)
    finally:
        _remove(tmp)
    return written


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _rank_world() -> tuple[int, int]:
    """This process's rank and the world size under an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(plan: Mapping[str, tuple[torch.Size, torch.dtype]], rank: int, world: int) -> list[str]:
    """The keys rank ``rank`` of ``world`` averages: largest first to the least-loaded rank (same on every rank)."""
    load = [0] * world
    owner: dict[str, int] = {}
    for key in sorted(plan, key=lambda k: (-plan[k][0].numel() * plan[k][1].itemsize, k)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[key] = r
        load[r] += plan[key][0].numel() * plan[key][1].itemsize
    return [k for k in plan if owner[k] == rank]


def _agree(error: str | None, what: str, world: int) -> None:
    """Every rank calls this: if any rank failed (``error``) or the ranks' ``what`` differ, all raise."""
    import torch.distributed as dist

    seen: list[Any] = [None] * world
    dist.all_gather_object(seen, (error, what))
    failed = [(r, e) for r, (e, _) in enumerate(seen) if e]
    if failed:
        rank, message = failed[0]
        raise LawaError(message if len(failed) == world else f"rank {rank}: {message}")
    if len({w for _, w in seen}) > 1:
        odd = next(r for r, (_, w) in enumerate(seen) if w != seen[0][1])
        raise LawaError(f"ranks disagree on the inputs' layout (rank {odd} sees other files, tensors, shapes or "
                        "dtypes than rank 0); nothing was written")


def _average_on_ranks(readers, weights, out: Path, entries, dtype, force, copy_training_state, provenance,
                      rank: int, world: int, start: float) -> dict[str, Any]:
    """``average_checkpoints`` under torch.distributed: a DCP input is averaged by every rank, each its share of
    the tensors straight from the files, into one DCP output that rank 0 publishes after a barrier; any other
    container is written by rank 0 alone. Fails closed: if any rank fails or sees a different layout, every
    rank raises and nothing is published."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    job, error = None, None
    try:
        job = _prepare(readers, weights, out, entries, dtype, force, provenance)
    except LawaError as exc:
        error = str(exc)
    _agree(error, job.fingerprint() if job else "", world)
    if not isinstance(job.newest, DCPReader) or out.name.endswith(".safetensors"):
        result: list[Any] = [None, 0]
        if rank == 0:
            try:
                result = [None, _write_local(job, force, copy_training_state)]
            except LawaError as exc:
                result = [str(exc), 0]
        dist.broadcast_object_list(result, src=0)
        if result[0]:
            raise LawaError(result[0])
        job.report["notes"].append(f"written by rank 0 of {world}")
        return job.finish(result[1], start)
    names = [None]
    if rank == 0:
        _remove_stale_parts(out)
        names = [str(_part_name(out))]
    dist.broadcast_object_list(names, src=0)
    tmp = Path(names[0])
    state, error = {}, None
    try:
        newest = job.newest
        state = {newest.raw_key(k): job.avg(MAIN, k) for k in _share(job.plans[MAIN], rank, world)}
    except LawaError as exc:
        error = str(exc)
    _agree(error, "", world)
    error = None
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)))
    except Exception as exc:  # DCP gathers every rank's failure into one exception on each rank
        error = f"{out}: writing the DCP output failed ({_short(exc)})"
    dist.barrier()
    result = [error]
    if rank == 0:
        try:
            if error is None:
                newest.copy_lightning_meta(tmp, job.report)
                _publish(tmp, out, force=force)
        except (LawaError, OSError) as exc:
            result = [f"{out}: publishing failed ({_short(exc)})"]
        finally:
            _remove(tmp)
    dist.broadcast_object_list(result, src=0)
    if result[0]:
        raise LawaError(result[0])
    if newest.others:
        job.report["notes"].append(f"not written: {len(newest.others)} entries of {newest.path.name} that are not "
                                   f"the model (e.g. {newest.others[0]})")
    job.report.update(rank=rank, world=world)
    return job.finish(sum(t.nbytes for t in state.values()), start)


def _average_to_safetensors(newest, out, tmp, names, plans, avg, lawa) -> int:
    if len(names) > 1:
        raise LawaError(f"{out}: a safetensors file holds one weights entry, and {newest.path} has "
                        f"{', '.join(names)}; choose one (entries=[KEY], --weights KEY)")
    e = names[0]
    metadata = dict(getattr(newest, "metadata", None) or {})
    metadata.setdefault("format", "pt")  # transformers < 4.48.2 refuses a file without it
    metadata["lawa"] = json.dumps(lawa)
    keys = [(newest.raw_key(k, e), s, d) for k, (s, d) in plans[e].items()]
    cut = len(newest.raw_key("", e))
    return _write_safetensors(tmp, keys, lambda raw: avg(e, raw[cut:]), metadata)


def _average_hf(newest: HFReader, tmp: Path, plan, avg, lawa, report, copy_training_state: bool) -> int:
    written = 0
    cut = len(newest._prefix)
    for name, shard in newest.shards.items():
        if isinstance(shard, SafetensorsReader):
            keys = [(raw, plan[raw[cut:]][0], plan[raw[cut:]][1]) for raw in shard.raw_keys()]
            metadata = {**shard.metadata, "format": shard.metadata.get("format", "pt")}
            written += _write_safetensors(tmp / name, keys, lambda raw: avg(MAIN, raw[cut:]), metadata)
        elif isinstance(shard, TorchZipReader):
            out_dtypes = {"": {raw: plan[raw[cut:]][1] for raw in shard.tree}}
            written += _write_zip(shard, tmp / name, {"": lambda raw: avg(MAIN, raw[cut:])}, out_dtypes, {})
            _fsync(tmp / name)
        else:  # a legacy or trusted .bin shard: saved again with torch.save
            torch.save({raw: avg(MAIN, raw[cut:]) for raw in shard.tree}, tmp / name)
            written += (tmp / name).stat().st_size
    if newest.index is not None:
        index = dict(newest.index)
        meta = dict(index.get("metadata") or {})
        if "total_size" in meta:
            meta["total_size"] = sum(s.numel() * d.itemsize for s, d in plan.values())
        index["metadata"] = meta
        (tmp / newest.index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    copied, left = [], []
    for p in sorted(newest.path.iterdir()):
        if p.name in newest.shards or p.name == newest.index_name or p.name in HF_WEIGHT_FILES:
            continue
        if p.is_dir() or _hf_skipped(p.name):
            if not copy_training_state:
                left.append(p.name)
                continue
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        copied.append(p.name)
    (tmp / "lawa.json").write_text(json.dumps(lawa, indent=2) + "\n")
    report["copied"] = copied
    if left:
        report["notes"].append(f"not copied (training state; copy_training_state=True keeps it): {', '.join(left)}")
    if "config.json" not in copied:
        report["notes"].append(f"{newest.path} has no config.json: from_pretrained on the output will need a config")
    return written


def _average_object(newest: TorchObjectReader, tmp: Path, names, avg, lawa) -> int:
    """Legacy or trusted files: the newest input's object with its entries replaced, saved with torch.save."""
    tree = newest.tree
    replaced = {}
    for e in names:
        key = newest._key_of(e)
        replaced[key] = {newest.raw_key(k, e): avg(e, k) for k in newest.meta(e)}
    if newest.layout == "plain":
        obj = replaced[""]
    else:
        obj = dict(tree)
        obj.update(replaced)
        obj["lawa"] = lawa
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return tmp.stat().st_size
