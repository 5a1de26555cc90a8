#!/usr/bin/env python
"""The averaging sweep over a fairseq masked-LM trajectory: LAWA (every end epoch E × every window size k) or
another averaging method, plus the baseline.

For each E and k the k latest checkpoints θ_{E−k+1} … θ_E are averaged (``--method uni``, LAWA; ``exp``, the
paper's Appendix C weights), or another method's averages are built (below), model tensors only, every file
read once per pass (``lawa_methods.iter_sweep_cells``), and the masked-LM loss is computed exactly as
``fairseq-validate`` computes it: fairseq's own task, model and criterion, built once from a checkpoint of the
trajectory; the same batches (``--batch-size``, size-sorted, unshuffled) and the same masks (the masking seed
stored in the checkpoints, epoch 1); ``task.valid_step`` and ``task.reduce_metrics``. Losses are in bits, as
fairseq prints them (the CSV keeps all digits; fairseq's log rounds to 3). Rows go to the tidy results CSV
under the method's label (below), and ``baseline`` rows (k=1) for the plain checkpoints: with ``--method uni``
they ride in the LAWA pass, with another method the baseline cells not yet in the CSV are a second pass.
Cells already in the results file are skipped, so an interrupted sweep resumes.

    python bert/evaluate_lawa.py --ckpt-dir runs/bert/tiny --ks 2,4,6 --out runs/bert/results.csv
    python bert/evaluate_lawa.py --ckpt-dir runs/bert/tiny --method ema --decays 0.5,0.9 --out runs/bert/results.csv
    python bert/evaluate_lawa.py --ckpt-dir runs/bert/tiny --method ema,swa --decays 0.75 --swa-starts 10
    python bert/evaluate_lawa.py data-bin/wikitext-103 --ckpt-dir lawa-roberta --ks 2,4,6,8,10 --epochs 10:200 \
        --train-batches 50            # the paper's published trajectory, read as it is

The methods, their flags, CSV labels and k columns are those of ``imagenet/evaluate_lawa.py`` (the table
in its docstring): ``lawa_methods`` defines them for both sweeps.

A flag that none of the ``--method``s takes is refused, not ignored; with several methods, each reads only
its own flags. SWA at its start
epoch and EMA at f are the checkpoint itself; they are written as ``swa``/``ema`` rows (equal to the
baseline's loss: nothing is recomputed here).

The validation data is the folder recorded in the checkpoints unless DATA is given. Training loss, if asked
for (``--train-batches N``), is measured on N batches spread evenly over fairseq's training batches: a fixed
sample, the same for every cell, with dropout off (unlike the training log's running loss).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pickle
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import lawa_plugin  # registers the safe globals fairseq checkpoints need, before fairseq loads any
import torch
from tqdm import tqdm

import lawa_methods as lm
from lawa_utils import LawaError, append_rows, done_cells, find_checkpoints, parse_epochs, read_results, record_run

PROG = "evaluate_lawa.py"
SPLIT_NAMES = {"val": "validation", "train": "training"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", default=None, metavar="DATA",
                        help="fairseq-preprocess output folder (default: the one recorded in the checkpoints)")
    parser.add_argument("--ckpt-dir", required=True, type=Path, help="directory with checkpoint{E}.pt")
    lm.add_method_args(parser)
    parser.add_argument("--epochs", default=None, metavar="A:B",
                        help="end epochs E to evaluate, inclusive: 'A:B', 'A:B:STEP' or 'E' (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="results CSV (default: CKPT_DIR/results.csv)")
    parser.add_argument("--no-baseline", action="store_true", help="do not evaluate the plain checkpoints")
    parser.add_argument("--valid-subset", default="valid", help="fairseq split for split=val (default: valid)")
    parser.add_argument("--train-batches", type=int, default=0, metavar="N",
                        help="also measure training loss on N fixed batches of the training set (default: 0, "
                        "no train rows)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="sequences per evaluation batch, as fairseq-validate --batch-size (default: 16)")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even if CUDA is available")
    parser.add_argument("--fp16", action="store_true", help="evaluate in half precision (fairseq-validate --fp16)")
    parser.add_argument("--trust-checkpoints", action="store_true",
                        help="allow arbitrary unpickling (can run code): only for files from a source you trust")
    return parser


# --------------------------------------------------------------------------------------------------
# fairseq: task, model, criterion and fixed batches, built once
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _unsafe_loading(allowed: bool):
    """--trust-checkpoints: let fairseq's own ``torch.load`` unpickle anything, for this load only."""
    if not allowed:
        yield
        return
    old = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = old


def load_fairseq(template: Path, data: str | None, trust: bool = False):
    """``(task, model, criterion, cfg)`` as fairseq-validate builds them from ``template`` (DATA overrides
    the data folder recorded in it). The model's weights are replaced cell by cell afterwards."""
    with warnings.catch_warnings():  # fairseq 0.12 uses APIs torch 2.x deprecates: noise, not news for users
        warnings.simplefilter("ignore", FutureWarning)
        from fairseq import checkpoint_utils

    overrides = {"data": str(data)} if data else None
    lawa_plugin.register()  # again: a safe_globals() block elsewhere in this process may have removed them
    try:
        with _unsafe_loading(trust):
            models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(template)], overrides)
    except pickle.UnpicklingError as exc:
        needs = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise LawaError(f"{template} was refused by safe loading (it needs "
                        f"{needs.group(1) if needs else 'an object outside the allowlist'}); if you trust its "
                        "source, rerun with --trust-checkpoints") from None
    except FileNotFoundError as exc:
        raise LawaError(f"fairseq data not found ({exc}); pass DATA, the fairseq-preprocess folder with "
                        "dict.txt (bert/prepare_data.sh writes it)") from None
    except Exception as exc:  # a damaged file fails inside torch.load in many ways
        raise LawaError(f"fairseq could not load {template} ({type(exc).__name__}: {exc})"[:300]) from None
    criterion = task.build_criterion(cfg.criterion)
    criterion.eval()
    model = models[0]
    model.eval()
    return task, model, criterion, cfg


def fixed_batches(task, model, cfg, subset: str, batch_size: int, max_batches: int = 0) -> list:
    """The batches fairseq-validate iterates for ``subset`` (all of them, or ``max_batches`` evenly spread).

    fairseq masks each sequence from (the task's seed, epoch 1, the sequence's index), so the masks are the
    same in every call and in fairseq-validate; the batches are collated once and reused for every cell.
    """
    from fairseq import utils

    data_dir = Path(utils.split_paths(cfg.task.data)[0])
    for suffix in (".bin", ".idx"):
        if not (data_dir / f"{subset}{suffix}").is_file():
            raise LawaError(f"{data_dir / (subset + suffix)} is missing: the {SPLIT_NAMES.get(subset, subset)} "
                            "split of the fairseq data (bert/prepare_data.sh writes it); pass DATA if it moved")
    task.load_dataset(subset, combine=False, epoch=1, task_cfg=cfg.task)
    dataset = task.dataset(subset)
    epoch_itr = task.get_batch_iterator(
        dataset=dataset,
        max_tokens=None,
        max_sentences=batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True,  # fairseq-validate --skip-invalid-size-inputs-valid-test
        required_batch_size_multiple=8,
        seed=cfg.common.seed,
        num_workers=0,
    )
    if not max_batches:
        with warnings.catch_warnings():  # fairseq asks for pinned memory even on machines without a GPU
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            return list(epoch_itr.next_epoch_itr(shuffle=False))
    # Batches are sorted by length, so the first N would be the shortest sequences: take them evenly spread.
    batches = epoch_itr.frozen_batches
    chosen = sorted({round(i * (len(batches) - 1) / max(1, max_batches - 1)) for i in range(max_batches)})
    dataset.set_epoch(1)
    return [dataset.collater([dataset[j] for j in batches[i]]) for i in chosen]


@torch.no_grad()
def masked_lm_loss(task, model, criterion, batches: list, device: torch.device) -> float:
    """Masked-LM loss in bits over ``batches``: fairseq-validate's ``valid_step`` + ``reduce_metrics``."""
    from fairseq import utils
    from fairseq.logging import metrics

    log_outputs = []
    for sample in batches:
        sample = utils.move_to_cuda(sample, device=device) if device.type == "cuda" else sample
        log_outputs.append(task.valid_step(sample, model, criterion)[2])
    with metrics.aggregate(new_root=True) as agg:
        task.reduce_metrics(log_outputs, criterion)
        return float(agg["loss"].avg)  # unrounded; fairseq prints round(avg, 3)


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    try:
        sweep(get_args_parser().parse_args(argv))
    except LawaError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def iter_cells(runs: list[argparse.Namespace], checkpoints: dict, ends: list[int], done: dict[str, set],
               load=None) -> Iterator[tuple[str, int, int, dict]]:
    """``(CSV method, E, k, state)`` for every cell still to do, method after method (``lm.split_methods``);
    with ``--method uni`` the baseline rides in the LAWA pass (checkpoints are large here: each is read once
    in all), else it is a second pass."""
    return lm.iter_runs_cells(runs, checkpoints, ends, done, baseline_in_pass=True, load=load)


def count_cells(runs: list[argparse.Namespace], checkpoints: dict, ends: list[int], done: dict[str, set]) -> int:
    """The cells still to do, planned with a loader that reads nothing: the sweeps decide their own cells
    (and name a checkpoint missing inside a window) without a second copy of their rules here."""
    return sum(1 for _ in iter_cells(runs, checkpoints, ends, done, load=lambda path: {}))


def sweep(args: argparse.Namespace) -> None:
    runs = lm.split_methods(args)  # flag errors first, before anything is read; one namespace per --method
    checkpoints = find_checkpoints(args.ckpt_dir)
    ends = parse_epochs(args.epochs, checkpoints)
    out = args.out or args.ckpt_dir / "results.csv"
    if not out.parent.is_dir():
        raise LawaError(f"--out {out}: directory {out.parent} does not exist")
    if args.train_batches < 0 or args.batch_size < 1:
        raise LawaError("--train-batches must be ≥ 0 and --batch-size ≥ 1")
    if args.data is not None and not Path(args.data.split(":")[0]).is_dir():
        raise LawaError(f"DATA {args.data} is not a folder (the fairseq-preprocess output: bert/prepare_data.sh)")
    labels = [lm.csv_method(run) for run in runs]
    count_cells(runs, checkpoints, ends, {})  # window and method errors before fairseq is even imported

    template = checkpoints[ends[-1]]
    task, model, criterion, cfg = load_fairseq(template, args.data, args.trust_checkpoints)
    optimizer, seed = str(cfg.optimizer._name), int(cfg.common.seed)  # the trajectory's, for the CSV
    splits = ["val"] + (["train"] if args.train_batches else [])
    done = done_cells(out, [*labels, "baseline"], splits, ["loss"], optimizer, seed)
    todo = count_cells(runs, checkpoints, ends, done)
    if not todo:
        print(f"{PROG}: all {', '.join(labels)} cells of {args.ckpt_dir} are already in {out}")
        return

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model.to(device)
    if args.fp16:
        model.half()
    batches = {"val": fixed_batches(task, model, cfg, args.valid_subset, args.batch_size)}
    if args.train_batches:
        batches["train"] = fixed_batches(task, model, cfg, cfg.dataset.train_subset, args.batch_size,
                                         args.train_batches)

    record_run(out, args)
    started = time.perf_counter()
    with tqdm(total=todo, desc="cells", unit="cell", file=sys.stderr, dynamic_ncols=True) as bar:
        for name, end, k, state in iter_cells(runs, checkpoints, ends, done):
            try:
                model.load_state_dict(state, strict=True, model_cfg=cfg.model)
            except RuntimeError as exc:
                what = f"checkpoint{end}.pt" if name == "baseline" else f"the {name} average at E={end}, k={k}"
                raise LawaError(f"{what} does not fit the model built from {template.name} "
                                f"({str(exc).splitlines()[0]})") from None
            losses = {s: masked_lm_loss(task, model, criterion, b, device) for s, b in batches.items()}
            if not all(math.isfinite(v) for v in losses.values()):
                print(f"{PROG}: warning: non-finite loss at {name} E={end} k={k}: {losses}", file=sys.stderr)
            append_rows(out, [{"method": name, "k": k, "epoch": end, "split": s, "metric": "loss", "value": v,
                               "wall_seconds": "", "optimizer": optimizer, "seed": seed} for s, v in losses.items()])
            bar.set_postfix_str(f"{name} E={end} k={k} val loss {losses['val']:.3f}")
            bar.update()
    print(f"{PROG}: {bar.n} cells in {time.perf_counter() - started:.0f} s -> {out}")
    for label in labels:
        print_summary(out, label, optimizer, seed)


def print_summary(out: Path, label: str, optimizer: str, seed: int) -> None:
    """Validation loss (bits) by end epoch: the baseline and each curve of this method (a k; for SWA a start s),
    as in the paper's figures."""
    table = lm.summary_table(read_results(out), label, optimizer=optimizer, seed=seed, split="val", metric="loss")
    print(f"validation masked-LM loss (bits) by end epoch E, {label} and the baseline:")
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
