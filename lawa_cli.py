"""The ``lawa`` command: average checkpoints, sweep a run with your own evaluation, hours saved, figures.

::

    lawa average --dir runs/fmnist --end 30 --k 6 --out lawa30.pt        # = python -m lawa_utils average
    lawa sweep --dir RUN --eval my_eval.py:evaluate --method uni,ema --ks 2,4,6 --decays 0.9 --out results.csv
    lawa hours-saved --log runs/imagenet/log.csv --results runs/imagenet/results.csv
    lawa figures --imagenet runs/imagenet --out runs/figures

**The evaluation contract of** ``lawa sweep --eval MODULE:FUNCTION``. MODULE is a dotted module importable
from the current directory, or ``path/to/file.py``. ``FUNCTION(state)`` receives the averaged weights as a
state dict with plain keys (no ``module.``/``_orig_mod.`` prefix) and returns ``{"<split>_<metric>": value}``,
e.g. ``{"val_loss": 2.31, "val_acc1": 71.2}``; each becomes a row of the tidy results CSV. If FUNCTION has a
parameter named ``cell`` it also gets the :class:`lawa_sweep.Cell` (label, end, k). With ``--bn-loader
MODULE:LOADER``, ``LOADER()`` is called once and returns an iterable of training batches, and FUNCTION is
called as ``FUNCTION(state, recompute_bn=fn)``: after loading the state into its model it calls
``fn(model)``, which recomputes the BatchNorm statistics over ``--bn-batches`` batches of that loader for
an averaged cell and does nothing for a baseline cell (a plain checkpoint keeps its own statistics).
The sweep resumes after a kill, records ``results.args.json``, and under ``torchrun`` shards the cells.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lawa_utils as lu
from lawa_utils import LawaError

__all__ = ["load_callable", "main"]

PROG = "lawa"
USAGE = """usage: lawa {average,sweep,hours-saved,figures} ...

LAWA tools. Commands:
  average      average the k latest checkpoints of a run (or --files) into one in the input's format
  sweep        evaluate every method x end x k cell of a run with your own evaluation function
  hours-saved  GPU hours LAWA saves on a run, from its trainer log and sweep results
  figures      the paper's figures from the experiments' tidy CSVs

Run `lawa COMMAND --help` for a command's flags."""


def load_callable(spec: str, flag: str = "--eval") -> Callable:
    """``MODULE:FUNCTION`` → the function; MODULE is dotted (importable from the current directory) or a .py path.

    >>> load_callable("my_eval.py:evaluate")                    # doctest: +SKIP
    <function evaluate at 0x...>
    """
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise LawaError(f"{flag} {spec}: expected MODULE:FUNCTION, e.g. my_eval.py:evaluate or pkg.mod:evaluate")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise LawaError(f"{flag} {spec}: {path} does not exist")
        name = f"_lawa_user_{path.resolve().stem}_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.path.insert(0, str(path.resolve().parent))  # its own helpers beside it import by name
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise LawaError(f"{flag} {spec}: cannot import {module_name} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise LawaError(f"{flag} {spec}: {module_name} has no function {attr}")
    return fn


def _sweep_parser() -> argparse.ArgumentParser:
    import lawa_sweep as ls

    parser = argparse.ArgumentParser(
        prog=f"{PROG} sweep", description="Evaluate every averaging cell of a saved run with your own function.",
        epilog="FUNCTION(state) -> {'<split>_<metric>': value}; see `python -c 'import lawa_cli; "
        "help(lawa_cli)'` for the whole contract.")
    parser.add_argument("--dir", type=Path, required=True, help="the run's checkpoint directory")
    parser.add_argument("--pattern", default=None,
                        help="file names of checkpoints, e.g. 'ep{E:03d}.pt' (default: recognised layouts)")
    parser.add_argument("--eval", required=True, metavar="MODULE:FUNCTION",
                        help="your evaluation: FUNCTION(state) returns {'val_loss': ...}")
    parser.add_argument("--bn-loader", default=None, metavar="MODULE:FUNCTION",
                        help="FUNCTION() returns training batches; the evaluation then gets recompute_bn=fn")
    parser.add_argument("--bn-batches", type=int, default=None, metavar="N",
                        help="batches of --bn-loader per BatchNorm recompute (default: all)")
    parser.add_argument("--optimizer", default="", help="written to the optimizer column")
    parser.add_argument("--seed", type=int, default=None, help="written to the seed column")
    parser.add_argument("--summary", default=None, metavar="SPLIT_METRIC",
                        help="metric of the summary printed at the end (default: the first returned)")
    ls.add_sweep_args(parser)
    return parser


def _sweep_command(argv: Sequence[str]) -> int:
    import lawa_sweep as ls
    from lawa_trajectory import find_trajectory

    args = _sweep_parser().parse_args(argv)
    trajectory = find_trajectory(args.dir, pattern=args.pattern)
    methods = ls.methods_from_args(args, trajectory)
    ends = ls.parse_ends(args.epochs, trajectory)
    user = load_callable(args.eval, "--eval")
    takes_cell = "cell" in inspect.signature(user).parameters
    bn: dict[str, Any] = {}
    if args.bn_batches is not None and (args.bn_loader is None or args.bn_batches < 1):
        raise LawaError("--bn-batches needs --bn-loader and must be ≥ 1")
    loader_fn = load_callable(args.bn_loader, "--bn-loader") if args.bn_loader else None

    def prepare() -> None:
        if loader_fn is not None:
            bn["loader"] = loader_fn()

    def evaluate(state, cell):
        kwargs: dict[str, Any] = {"cell": cell} if takes_cell else {}
        if loader_fn is not None:
            def recompute(model, averaged=cell.label != ls.BASELINE):
                if averaged:
                    lu.recompute_bn(model, bn["loader"], num_batches=args.bn_batches)
            kwargs["recompute_bn"] = recompute
        return user(state, **kwargs)

    out = args.out or args.dir / "results.csv"
    ls.sweep(trajectory, methods, evaluate, out, baseline=not args.no_baseline, ends=ends, prepare=prepare,
             optimizer=args.optimizer, seed=args.seed, run_args=args, trust=args.trust_checkpoints,
             summary=args.summary)
    return 0


def _plots(name: str) -> Any:
    return importlib.import_module(f"plots.{name}")  # plots/ is a package of the distribution (and of the repo)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lawa`` console command (and ``python -m lawa_cli``); returns the exit status.

    >>> main(["sweep", "--dir", "runs/fmnist", "--eval", "my_eval.py:evaluate", "--ks", "2,4"])   # doctest: +SKIP
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "average":
            return lu.main(["average", *rest], prog="lawa")
        if command == "sweep":
            return _sweep_command(rest)
        if command == "hours-saved":
            return int(_plots("hours_saved").main(rest) or 0)
        if command == "figures":
            return int(_plots("make_figures").main(rest) or 0)
    except LawaError as exc:
        print(f"{PROG} {command}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{USAGE}\n{PROG}: error: unknown command '{command}'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
