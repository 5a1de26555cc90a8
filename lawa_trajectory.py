"""A run's checkpoints as users have them: find them in a directory, recognise the layout, order them.

    import lawa_trajectory as lt
    run = lt.find_trajectory("out/")                 # HF Trainer: out/checkpoint-{step}/
    run.layout, run.unit, run.positions              # ('hf', 'step', (500, 1000, 1500, 2000))
    files = [run.path(p) for p in run.window(2000, k=3)]    # checkpoint-1000/ .. checkpoint-2000/

Layouts (``Trajectory.layout``; the number in the name is the checkpoint's *position*):

=================== ========================================= ====== ==========
layout              names                                     unit   zero-based
=================== ========================================= ====== ==========
``lawa``            ``checkpoint{E}.pt`` (this repository,     epoch  no
                    pytorch/examples, fairseq's epoch files)
``fairseq-updates`` ``checkpoint_{E}_{U}.pt`` (position U)     step   no
``hf``              ``checkpoint-{step}/`` (Trainer)           step   no
``pythia``          ``step{N}/`` (revision directories; in a   step   no
                    hub cache folder ``models--ORG--NAME/``,
                    the ``refs/step{N}`` revisions)
``accelerate``      ``checkpoint_{i}/`` (``save_state`` with    epoch  yes
                    automatic naming: i counts the saves from
                    0, one per epoch), ``epoch_{E}/`` (0-based),
                    ``step_{N}/`` (unit step); each holding
                    ``model.safetensors`` or ``pytorch_model.bin``
``lightning``       ``epoch={E}-step={S}.ckpt``, also           epoch  yes
                    ``{E}-{S}.ckpt`` (position S, unit step,
                    when several files share an epoch); a
                    sharded (FSDP) one is a DCP directory
``timm``            ``checkpoint-{E}.pth.tar``                 epoch  yes
``torchvision``     ``model_{E}.pth``                          epoch  yes
``dcp``             any numbered directory holding a           step   no
                    ``.metadata`` (``step-{N}/``; unit epoch
                    when the name starts with ``epoch``)
``pattern``         ``pattern="ep{E:03d}.pt"`` (``{E}``         as named
                    epochs, ``{E0}`` 0-based epochs, ``{S}``
                    steps, ``*`` any text)
``files``           an explicit list of files                 as named
=================== ========================================= ====== ==========

Files a framework writes beside its checkpoints (``last``, ``model_best``, timm's ``recovery-*`` and
``milestone-*``, fairseq's ``checkpoint_best.pt``, ``checkpoint.pth``, ``args.json``, ``trainer_state.json``,
logs) are not checkpoints of the trajectory and are ignored.

**Positions and completed epochs: the one rule.** ``--end N``, ``--epochs A:B`` and ``--swa-starts s`` name a
checkpoint by the number in its name, whatever the framework counts from. Result rows record
``completed(position)`` in the ``epoch`` column, with ``unit`` epoch or step: the number of epochs (or steps)
of training the checkpoint holds. Zero-based names (torchvision's ``model_{E}.pth``, Lightning's
``epoch={E}``, timm's ``checkpoint-{E}``: each writes the 0-based index of the epoch just finished) map to
E + 1 completed epochs; so ``model_9.pth`` is the 10th epoch's checkpoint and is recorded as epoch 10, the
same number this repository's ``checkpoint10.pt`` carries. Steps are counted as frameworks count them
(optimizer steps done), so a step position is its own completed count.

**Windows and gaps.** k counts checkpoints: the window of size k ending at position N is the k latest
checkpoints up to and including N. A run's *interval* is its most common spacing between neighbouring
positions; a *gap* is a spacing larger than that (a deleted or never-written checkpoint), and a window that
spans a gap is refused rather than silently averaging checkpoints further apart than the rest.

Ambiguous inputs are refused with one line that lists what was found (:class:`LawaError`): two layouts in one
directory, the same position twice (``checkpoint-10`` and ``checkpoint-010``), a gap inside a window, a k
larger than the trajectory.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

try:  # the torch-free home of LawaError; lawa_utils re-exports the same class
    from lawa_tidy import LawaError
except ImportError:  # pragma: no cover - before lawa_tidy exists
    from lawa_utils import LawaError

__all__ = ["LAYOUTS", "Trajectory", "find_trajectory", "trajectory_from_files"]

LAYOUTS = ("lawa", "fairseq-updates", "hf", "pythia", "accelerate", "lightning", "timm", "torchvision", "dcp",
           "pattern", "files")

# File layouts: name regex → (layout, unit, zero_based). The group named `pos` is the position.
_FILE_LAYOUTS = [
    (re.compile(r"^checkpoint(?P<pos>\d+)\.pt$"), "lawa", "epoch", False),
    (re.compile(r"^checkpoint_(?P<epoch>\d+)_(?P<pos>\d+)\.pt$"), "fairseq-updates", "step", False),
    (re.compile(r"^checkpoint-(?P<pos>\d+)\.pth\.tar$"), "timm", "epoch", True),
    (re.compile(r"^model_(?P<pos>\d+)\.pth$"), "torchvision", "epoch", True),
]
_HF_DIR = re.compile(r"^checkpoint-(?P<pos>\d+)$")
_PYTHIA_DIR = re.compile(r"^step(?P<pos>\d+)$")
# Accelerate's save_state() directories: checkpoint_{i} (automatic naming), epoch_{E} / step_{N} (its examples'
# names). Recognised only when they hold model weights, so other folders of those names are left alone.
_ACCELERATE_DIR = re.compile(r"^(?P<kind>checkpoint|epoch|step)_(?P<pos>\d+)$")
_ACCELERATE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json")
_NUMBERED_DIR = re.compile(r"^(?P<prefix>[A-Za-z_\-=.]*?)(?P<pos>\d+)$")
# Lightning's ModelCheckpoint: `{epoch}`/`{step}` fields become `epoch=3`/`step=40` (auto_insert_metric_name),
# or bare numbers `3-40` when that is off; a `-v1` suffix marks a second file of the same name.
_LIGHTNING_NAMED = re.compile(r"(?:^|[-_])epoch=(?P<epoch>\d+)(?:.*?[-_]step=(?P<step>\d+))?")
_LIGHTNING_STEP_ONLY = re.compile(r"(?:^|[-_])step=(?P<step>\d+)")
_LIGHTNING_BARE = re.compile(r"^(?P<epoch>\d+)-(?P<step>\d+)(?:-v\d+)?\.ckpt$")

_NAME_FORMS = {
    "lawa": "checkpoint{E}.pt",
    "fairseq-updates": "checkpoint_{E}_{U}.pt",
    "hf": "checkpoint-{step}/",
    "pythia": "step{N}/",
    "accelerate": "checkpoint_{i}/",
    "lightning": "epoch={E}-step={S}.ckpt",
    "timm": "checkpoint-{E}.pth.tar",
    "torchvision": "model_{E}.pth",
    "dcp": "{name}{N}/ with .metadata",
}


@dataclass(frozen=True)
class Trajectory:
    """The checkpoints of one run, ordered by the number in their names (see the module docstring).

    >>> run = find_trajectory("runs/vision")                  # doctest: +SKIP
    >>> run.layout, run.positions[:3], run.completed(0)       # doctest: +SKIP
    ('torchvision', (0, 1, 2), 1)
    >>> run.checkpoints()                                     # doctest: +SKIP
    {1: PosixPath('runs/vision/model_0.pth'), 2: ..., ...}

    ``root`` is the run directory (None for explicit files), ``layout`` one of :data:`LAYOUTS`, ``unit``
    ``'epoch'`` or ``'step'``; ``positions`` ascend and ``paths`` (files or directories) follow them.
    ``zero_based``: names count epochs from 0. ``sorted_by_name``: explicit files were put in the order of
    the numbers in their names rather than the order given.
    """

    root: Path | None
    layout: str
    unit: str
    positions: tuple[int, ...]
    paths: tuple[Path, ...]
    zero_based: bool = False
    sorted_by_name: bool = False

    def __post_init__(self) -> None:
        if len(self.positions) != len(self.paths):
            raise ValueError("positions and paths must have the same length")
        if list(self.positions) != sorted(set(self.positions)):
            raise ValueError(f"positions must ascend without repeats, got {self.positions}")
        if self.unit not in ("epoch", "step"):
            raise ValueError(f"unit must be 'epoch' or 'step', got {self.unit!r}")

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def interval(self) -> int | None:
        """The run's regular spacing: the most common difference between neighbours (the smallest on a tie);
        None for fewer than two checkpoints."""
        diffs = collections.Counter(b - a for a, b in itertools.pairwise(self.positions))
        if not diffs:
            return None
        top = max(diffs.values())
        return min(d for d, n in diffs.items() if n == top)

    def _where(self) -> str:
        return str(self.root) if self.root is not None else "the files given"

    def describe(self) -> str:
        """One line for messages: ``'10 checkpoints, epochs 0..9 (model_0.pth .. model_9.pth)'``."""
        if not self.positions:
            return "no checkpoints"
        first, last = self.positions[0], self.positions[-1]
        span = f"{self.unit}s {first}..{last}" if len(self) > 1 else f"{self.unit} {first}"
        every = f", every {self.interval}" if self.interval not in (None, 1) else ""
        names = self.name(first) + (f" .. {self.name(last)}" if len(self) > 1 else "")
        return f"{len(self)} checkpoint{'s' * (len(self) != 1)}, {span}{every} ({names})"

    def index(self, position: int) -> int:
        """1-based index of the checkpoint at ``position`` (``LawaError`` naming what exists if none)."""
        i = _bisect(self.positions, position)
        if i is None:
            raise LawaError(f"{self._missing(position)} does not exist in {self._where()} (have {self.describe()})")
        return i + 1

    def _missing(self, position: int) -> str:
        """How a checkpoint at ``position`` would be named, from the newest one's name, for messages."""
        if self.positions and self.layout != "lightning":
            name = self.paths[-1].name
            digits = str(self.positions[-1])
            runs = [m for m in re.finditer(r"\d+", name) if int(m.group()) == self.positions[-1]]
            if len(runs) == 1:
                m = runs[0]
                number = str(position).zfill(len(m.group())) if m.group().startswith("0") else str(position)
                if len(m.group()) == len(digits) or m.group().startswith("0"):
                    return name[: m.start()] + number + name[m.end() :]
        return f"the checkpoint at {self.unit} {position}"

    def position(self, index: int) -> int:
        """The position of the ``index``-th checkpoint (1-based)."""
        if not 1 <= index <= len(self):
            raise LawaError(f"checkpoint index {index} is outside 1..{len(self)} ({self.describe()})")
        return self.positions[index - 1]

    def path(self, position: int) -> Path:
        """The file or directory of the checkpoint at ``position``."""
        return self.paths[self.index(position) - 1]

    def name(self, position: int) -> str:
        """The checkpoint's file or directory name, for messages (``'checkpoint-500/'`` for directories)."""
        p = self.paths[self.index(position) - 1]
        return p.name + ("/" if p.is_dir() else "")

    def completed(self, position: int) -> int:
        """What result rows record in their ``epoch`` column: epochs completed (position + 1 when the names
        are zero-based), or the step itself."""
        self.index(position)
        return position + 1 if self.zero_based else position

    def checkpoints(self) -> dict[int, Path]:
        """``{index: path}`` for index 1..N in order: the index space the averaging functions work in."""
        return {i: p for i, p in enumerate(self.paths, start=1)}

    def window(self, end: int, k: int) -> list[int]:
        """Positions of the ``k`` latest checkpoints ending at position ``end``, oldest first.

        Refused (``LawaError``) when fewer than k checkpoints reach ``end`` or when the window spans a gap.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise LawaError(f"k must be a positive integer, got {k!r}")
        last = self.index(end)
        if k > len(self):
            raise LawaError(f"k={k} is larger than the trajectory ({self.describe()})")
        if k > last:
            raise LawaError(
                f"k={k} reaches before the first checkpoint: only {last} checkpoint{'s' * (last != 1)} up to "
                f"{self.name(end)} in {self._where()}"
            )
        positions = list(self.positions[last - k : last])
        step = self.interval
        for a, b in itertools.pairwise(positions):
            if step is not None and b - a > step:
                span = (f"the window of k={k} ending at {self.name(end)} would span the gap between "
                        f"{self.name(a)} and {self.name(b)} (the run saves every {_count(step, self.unit)})")
                if (b - a) % step == 0:
                    raise LawaError(f"{self._missing(a + step)} is missing: {span}")
                raise LawaError(f"{span[0].upper()}{span[1:]}")
        return positions


def _count(n: int, unit: str) -> str:
    return f"{unit}" if n == 1 else f"{n} {unit}s"


def _bisect(values: Sequence[int], x: int) -> int | None:
    i = bisect.bisect_left(values, x)
    return i if i < len(values) and values[i] == x else None


def _check_directory(directory: str | os.PathLike) -> Path:
    root = Path(directory)
    if not root.exists():
        raise LawaError(f"checkpoint directory {root} does not exist")
    if not root.is_dir():
        raise LawaError(f"{root} is not a directory (give a run directory with --dir, or files with --files)")
    return root


class _Hit(NamedTuple):
    """One directory entry recognised as a checkpoint."""

    layout: str
    unit: str
    zero_based: bool
    position: int | None  # for Lightning the epoch (None if the name has none); see _lightning
    step: int | None = None  # Lightning only
    path: Path = Path()


def _classify(entry: Path) -> _Hit | None:
    """What layout one directory entry belongs to and the number it carries; None if it is no checkpoint."""
    name = entry.name
    if entry.is_dir():
        if (entry / ".metadata").is_file():
            if name.endswith(".ckpt"):  # Lightning's FSDP/ModelParallel sharded checkpoints: DCP directories
                return _lightning_hit(name, entry)
            m = _NUMBERED_DIR.match(name)
            if m:
                unit = "epoch" if m["prefix"].lower().startswith("epoch") else "step"
                return _Hit("dcp", unit, False, int(m["pos"]), path=entry)
            return None
        for regex, layout in ((_HF_DIR, "hf"), (_PYTHIA_DIR, "pythia")):
            m = regex.match(name)
            if m:
                return _Hit(layout, "step", False, int(m["pos"]), path=entry)
        m = _ACCELERATE_DIR.match(name)
        if m and any((entry / w).is_file() for w in _ACCELERATE_WEIGHTS):
            step = m["kind"] == "step"
            return _Hit("accelerate", "step" if step else "epoch", not step, int(m["pos"]), path=entry)
        return None
    for regex, layout, unit, zero_based in _FILE_LAYOUTS:
        m = regex.match(name)
        if m:
            return _Hit(layout, unit, zero_based, int(m["pos"]), path=entry)
    if name.endswith(".ckpt"):
        return _lightning_hit(name, entry)
    return None


def _lightning_hit(name: str, entry: Path) -> _Hit | None:
    m = _LIGHTNING_NAMED.search(name) or _LIGHTNING_BARE.match(name)
    if m:
        return _Hit("lightning", "epoch", True, int(m["epoch"]), int(m["step"]) if m["step"] else None, entry)
    m = _LIGHTNING_STEP_ONLY.search(name)
    if m:
        return _Hit("lightning", "step", False, None, int(m["step"]), entry)
    return None


def _pattern_regex(pattern: str) -> tuple[re.Pattern, str, bool, dict[str, str]]:
    """Compile ``--pattern``: ``{E}``/``{E:03d}`` epochs, ``{E0}`` 0-based epochs, ``{S}`` steps, ``*`` text."""
    if "/" in pattern or os.sep in pattern:
        raise LawaError(f"--pattern {pattern!r} names entries of the run directory: no '/' in it")
    parts = re.split(r"(\{[A-Za-z0-9]*(?::[^}]*)?\})", pattern)
    regex, specs, fields = "", {}, []
    for part in parts:
        field = re.fullmatch(r"\{([A-Za-z0-9]*)(?::([^}]*))?\}", part)
        if field is None:
            regex += ".*?".join(re.escape(piece) for piece in part.split("*"))
            continue
        key, spec = field.group(1), field.group(2)
        if key not in ("E", "E0", "S") or key in fields:
            raise LawaError(
                f"--pattern {pattern!r}: use each of {{E}} (epochs), {{E0}} (0-based epochs) or {{S}} (steps) "
                f"at most once, e.g. 'ep{{E:03d}}.pt'; got {part}"
            )
        if spec is not None:
            try:
                format(0, spec)
            except ValueError:
                raise LawaError(f"--pattern {pattern!r}: {part} is not an integer format") from None
            specs[key] = spec
        fields.append(key)
        regex += f"(?P<{key}>\\d+)"
    if "S" in fields:
        unit, zero_based = "step", False
    elif fields:
        unit, zero_based = "epoch", "E0" in fields
        if "E" in fields and "E0" in fields:
            raise LawaError(f"--pattern {pattern!r}: give {{E}} or {{E0}}, not both")
    else:
        raise LawaError(f"--pattern {pattern!r} has no number field: write e.g. 'ep{{E:03d}}.pt' or 'step{{S}}'")
    return re.compile(f"^{regex}$"), unit, zero_based, specs


def _find_by_pattern(root: Path, pattern: str) -> Trajectory:
    regex, unit, zero_based, specs = _pattern_regex(pattern)
    key = "S" if unit == "step" else ("E0" if zero_based else "E")
    found: dict[int, list[Path]] = collections.defaultdict(list)
    for entry in root.iterdir():
        m = regex.match(entry.name)
        if not m:
            continue
        # A width such as {E:03d} must be honoured exactly: 'ep7.pt' is not 'ep{E:03d}.pt'.
        if any(format(int(m[f]), spec) != m[f] for f, spec in specs.items()):
            continue
        found[int(m[key])].append(entry)
    if not found:
        raise LawaError(f"no entry of {root} matches --pattern {pattern!r}")
    return _build(root, "pattern", unit, zero_based, found)


def _build(root: Path | None, layout: str, unit: str, zero_based: bool, found: dict[int, list[Path]]) -> Trajectory:
    twice = [sorted(p.name for p in paths) for _, paths in sorted(found.items()) if len(paths) > 1]
    if twice:
        where = root if root is not None else "the files given"
        raise LawaError(f"{where}: the same {unit} appears twice: {' and '.join(twice[0])}; keep one of them")
    positions = tuple(sorted(found))
    return Trajectory(root, layout, unit, positions, tuple(found[p][0] for p in positions), zero_based)


def _from_hub_cache(root: Path) -> Trajectory:
    """A Hugging Face hub cache folder (``models--ORG--NAME/``, as ``from_pretrained(revision="step1000")`` fills
    it): each revision in ``refs/`` named like a checkpoint (Pythia's ``step{N}``, ``checkpoint-{N}``) is the
    snapshot whose commit it names."""
    found = []
    for ref in sorted((root / "refs").iterdir()):
        m = _PYTHIA_DIR.match(ref.name) or _HF_DIR.match(ref.name)
        if not m or not ref.is_file():
            continue
        commit = ref.read_text().strip()
        snapshot = root / "snapshots" / commit
        if not snapshot.is_dir():
            raise LawaError(f"{ref} names commit {commit}, which {root / 'snapshots'} does not hold (an "
                            "interrupted download?)")
        found.append((int(m["pos"]), snapshot))
    if not found:
        raise LawaError(f"{root} is a Hugging Face cache folder with no revision named step{{N}} or checkpoint-{{N}} "
                        "in refs/ (download them with revision='step1000', ...)")
    return _build(root, "pythia", "step", False, _group(found))


def _lightning(root: Path | None, hits: list[_Hit]) -> Trajectory:
    """Lightning: position by epoch (0-based) when each file has its own epoch, else by step."""
    epochs = [h.position for h in hits]
    if None not in epochs and len(set(epochs)) == len(epochs):
        return _build(root, "lightning", "epoch", True, _group((h.position, h.path) for h in hits))
    if any(h.step is None for h in hits):
        names = sorted(h.path.name for h in hits)
        raise LawaError(
            f"{root or 'the files given'}: Lightning checkpoints share an epoch and not every name has a step "
            f"({', '.join(names[:4])}{' …' if len(names) > 4 else ''}); use --pattern"
        )
    return _build(root, "lightning", "step", False, _group((h.step, h.path) for h in hits))


def _group(pairs) -> dict[int, list[Path]]:
    found: dict[int, list[Path]] = collections.defaultdict(list)
    for position, path in pairs:
        found[position].append(path)
    return found


def find_trajectory(directory: str | os.PathLike, *, pattern: str | None = None) -> Trajectory:
    """Find the checkpoints of the run in ``directory``, recognise their layout and order them by number.

    >>> run = find_trajectory("lightning_logs/version_0/checkpoints")      # doctest: +SKIP
    >>> run.layout, run.unit, run.positions, run.completed(run.positions[-1])    # doctest: +SKIP
    ('lightning', 'epoch', (0, 1, 2, 3), 4)
    >>> find_trajectory("runs/x", pattern="ep{E:03d}.pt")                 # doctest: +SKIP

    Only entries directly in ``directory`` are considered, except that a directory with no checkpoints of
    its own but a ``checkpoints/`` subdirectory (Lightning's ``version_N/``) is looked into. ``pattern``
    (see the module docstring) replaces layout recognition. Raises :class:`LawaError` when nothing is
    found, when two layouts are mixed, or when a position appears twice.
    """
    root = _check_directory(directory)
    if pattern is not None:
        return _find_by_pattern(root, pattern)
    if (root / "refs").is_dir() and (root / "snapshots").is_dir():
        return _from_hub_cache(root)
    by_layout: dict[str, list[_Hit]] = collections.defaultdict(list)
    for entry in root.iterdir():
        hit = _classify(entry)
        if hit is not None:
            by_layout[hit.layout].append(hit)
    if not by_layout:
        sub = root / "checkpoints"
        if sub.is_dir():
            return find_trajectory(sub)
        forms = ", ".join(_NAME_FORMS.values())
        raise LawaError(
            f"{root} has no checkpoints in a layout LAWA knows ({forms}); name yours with --pattern, "
            "e.g. --pattern 'ep{E:03d}.pt'"
        )
    if len(by_layout) > 1:
        seen = "; ".join(
            f"{len(hits)} {layout} ({min(h.path.name for h in hits)}, …)" for layout, hits in sorted(by_layout.items())
        )
        raise LawaError(f"{root} mixes checkpoint layouts: {seen}; choose one with --pattern")
    ((layout, hits),) = by_layout.items()
    return _from_hits(root, layout, hits)


def _from_hits(root: Path | None, layout: str, hits: list[_Hit]) -> Trajectory:
    if layout == "lightning":
        return _lightning(root, hits)
    units = {h.unit for h in hits}
    if len(units) > 1:  # dcp directories named both epoch-N and step-N
        names = sorted(h.path.name for h in hits)[:4]
        raise LawaError(
            f"{root or 'the files given'} mixes epoch and step checkpoints ({', '.join(names)}); "
            "choose one with --pattern"
        )
    return _build(root, layout, units.pop(), hits[0].zero_based, _group((h.position, h.path) for h in hits))


def trajectory_from_files(files: Sequence[str | os.PathLike]) -> Trajectory:
    """A trajectory of explicit files (or checkpoint directories): ordered by the numbers in their names when
    every name carries a distinct one, else kept in the order given (positions 1..N).

    >>> run = trajectory_from_files(["kept/model_10.pth", "kept/model_11.pth", "kept/model_8.pth"])  # doctest: +SKIP
    >>> [p.name for p in run.paths], run.sorted_by_name                   # doctest: +SKIP
    (['model_8.pth', 'model_10.pth', 'model_11.pth'], True)

    Names of one known layout give its position, unit and zero-basing (``model_9.pth`` → epoch 9, 0-based);
    otherwise the last number in each name is its position (``ep7.pt`` → 7, unit epoch). ``sorted_by_name``
    says whether that order differs from the one given, so a caller can say so.
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise LawaError("no checkpoint files given")
    for p in paths:
        if not p.exists():
            raise LawaError(f"{p} does not exist")
    hits = [_classify(p) for p in paths]
    layouts = {h.layout for h in hits if h is not None}
    if None not in hits and len(layouts) == 1:
        with contextlib.suppress(LawaError):  # the same number twice: fall back to the order given
            return _with_order_flag(_from_hits(None, layouts.pop(), hits), paths)
    numbers = [re.findall(r"\d+", p.name) for p in paths]
    if all(numbers) and len({int(n[-1]) for n in numbers}) == len(paths):
        found = {int(n[-1]): [p] for n, p in zip(numbers, paths, strict=True)}
        return _with_order_flag(_build(None, "files", "epoch", False, found), paths)
    return Trajectory(None, "files", "epoch", tuple(range(1, len(paths) + 1)), tuple(paths))


def _with_order_flag(run: Trajectory, given: list[Path]) -> Trajectory:
    return Trajectory(run.root, run.layout, run.unit, run.positions, run.paths, run.zero_based,
                      sorted_by_name=list(run.paths) != given)
