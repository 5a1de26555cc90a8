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
``*.distcp``; the model is the ``model.`` subtree when the tree has one).

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

import argparse
import contextlib
import io
import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lawa_tidy import LawaError

__all__ = [
    "MAIN",
    "SAFE_GLOBALS",
    "CheckpointReader",
    "InertUnpickler",
    "Placeholder",
    "TensorRef",
    "inert_loads",
    "open_checkpoint",
]

MAIN = "model"  # the entry name when the whole container is one model (plain state dict, safetensors, HF, DCP)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP/DataParallel and torch.compile wrappers

# HF Trainer / Accelerate files that resume training rather than describe the model: not copied by default.
TRAINING_STATE_FILES = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "training_args.bin",
                        "trainer_state.json")
TRAINING_STATE_PREFIXES = ("rng_state", "optimizer_", "random_states")
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


_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


def _allowed_globals() -> dict[str, Any]:
    """``module.name`` → object for torch's weights_only allowlist, globals registered with torch, SAFE_GLOBALS."""
    allowed: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # a private torch helper; without it only the explicit lists apply
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
        for e in self._entry_keys:
            self._prefix[e] = _wrapper_prefix(list(self._dict(e)))

    def _dict(self, entry_key: str) -> Mapping[str, Any]:
        return self.tree if entry_key == "" else self.tree[entry_key]

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
        return [str(k) for k, v in self.tree.items() if _is_weights(v) and k not in self._entry_keys]


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

    def tensor(self, key: str, entry: str | None = None) -> torch.Tensor:
        self._entry(entry)
        raw = self._prefix + key
        if raw not in self._meta:
            raise self._missing(key, entry)
        return self._file.get_tensor(raw)

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

    Directories: Hugging Face (weights files named in :data:`HF_WEIGHT_FILES`) or DCP (``.metadata``). An
    HF index file given as the path opens its directory. ``trust=True`` unpickles with ``torch.load
    (weights_only=False)``, which can run code from the file: only for files from a source you trust.
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
        raise LawaError(f"{path} is a directory with no weights (no {', '.join(HF_WEIGHT_FILES)} and no DCP .metadata)")
    return _open_file(path, trust=trust)


class DCPReader(CheckpointReader):
    """A torch.distributed.checkpoint directory (``.metadata`` plus ``*.distcp``)."""

    layout = "dcp"
    container = "dcp"

    def __init__(self, path: Path) -> None:
        raise LawaError(f"{path}: DCP directories are not readable yet")
