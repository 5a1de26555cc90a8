"""The obvious alternatives that lawa_utils is measured against, written plainly (nothing copied).

- ``seed_window_average``: how the seed produced one (E, k) cell of a trajectory sweep — ``torch.load`` every
  checkpoint of the window whole (optimizer state included, no mmap) and add the model tensors up.
- ``average_load_all`` / ``average_streaming``: averaging fairseq-format checkpoints the way
  ``scripts/average_checkpoints.py`` loads them (whole files, no mmap). *load-all* reads every file first and
  then averages; *streaming* keeps the first file's state as the output template and a running sum, reading
  one file at a time (fairseq's own order of work). Both write the output like ``lawa_utils`` does
  (temporary file, fsync, rename), so a comparison differs only in how inputs are read and averaged.

Run as a program (benchmark B times it in a subprocess)::

    python -m benchmarks.baselines load-all --files a.pt b.pt --out avg.pt
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

WRAPPER = "module."


def mean_of(states: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform mean of state dicts (oldest first): floats summed in order then divided, integers from the
    newest; a ``module.`` prefix is dropped. Consumes ``states`` lazily, one state dict at a time."""
    acc: dict[str, torch.Tensor] = {}
    newest: Mapping[str, torch.Tensor] = {}
    n = 0
    for state in states:
        for key, t in state.items():
            if t.is_floating_point():
                if key in acc:
                    acc[key].add_(t)
                else:
                    acc[key] = t.clone()
        newest, n = state, n + 1
    return {key.removeprefix(WRAPPER): acc[key].div_(n) if key in acc else t.clone() for key, t in newest.items()}


def load_whole(path: str | os.PathLike) -> dict:
    """``torch.load`` of a whole file into memory: no mmap, every tensor read (and unpickled without the
    weights-only checks, as the seed and fairseq did)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def seed_window_average(paths: Iterable[str | os.PathLike], model_key: str = "state_dict") -> dict[str, torch.Tensor]:
    """One sweep cell the seed's way: reload each checkpoint of the window whole, average its model."""
    return mean_of(load_whole(p)[model_key] for p in paths)


def average_load_all(paths: list[Path]) -> dict:
    """Load every checkpoint whole, then average their ``model``; the output is the newest file's contents
    with the averaged model."""
    loaded = [load_whole(p) for p in paths]
    out = dict(loaded[-1])
    out["model"] = mean_of(c["model"] for c in loaded)
    return out


def average_streaming(paths: list[Path]) -> dict:
    """One whole checkpoint at a time into a running sum; the first file's contents are the template."""
    template: dict = {}

    def models():
        for i, p in enumerate(paths):
            ckpt = load_whole(p)
            if i == 0:
                template.update(ckpt)
            yield ckpt["model"]
            del ckpt  # only the template and the running sum outlive one iteration

    averaged = mean_of(models())
    template["model"] = averaged
    return template


def save_durably(obj: object, path: Path) -> None:
    """Temporary file + fsync + rename: the same durability (and cost) as lawa_utils.save_checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("how", choices=["load-all", "streaming"])
    p.add_argument("--files", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    average = average_load_all if args.how == "load-all" else average_streaming
    save_durably(average(args.files), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
