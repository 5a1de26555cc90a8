#!/usr/bin/env python
"""The LAWA sweep over a fairseq masked-LM trajectory: every end epoch E × every window size k, plus the baseline.

For each E and k the k latest checkpoints θ_{E−k+1} … θ_E are averaged (``lawa_utils.iter_window_averages``:
model tensors only, every file read once) and the masked-LM loss is computed exactly as
``fairseq-validate`` computes it: fairseq's own task, model and criterion, built once from a checkpoint of the
trajectory; the same batches (``--batch-size``, size-sorted, unshuffled) and the same masks (the masking seed
stored in the checkpoints, epoch 1); ``task.valid_step`` and ``task.reduce_metrics``. Losses are in bits, as
fairseq prints them (the CSV keeps all digits; fairseq's log rounds to 3). Rows go to the tidy results CSV:
``lawa`` (or ``exp``, the paper's Appendix C weighting), and ``baseline`` rows (k=1) for the plain checkpoints.
Cells already in the results file are skipped, so an interrupted sweep resumes.

    python bert/evaluate_lawa.py --ckpt-dir runs/bert/tiny --ks 2,4,6 --out runs/bert/results.csv
    python bert/evaluate_lawa.py data-bin/wikitext-103 --ckpt-dir lawa-roberta --ks 2,4,6,8,10 --epochs 10:200 \
        --train-batches 50            # the paper's published trajectory, read as it is

The validation data is the folder recorded in the checkpoints unless DATA is given. Training loss, if asked
for (``--train-batches N``), is measured on N batches spread evenly over fairseq's training batches: a fixed
sample, the same for every cell, with dropout off (unlike the training log's running loss).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import pickle
import re
import sys
import time
import warnings
from pathlib import Path

import lawa_plugin  # registers the safe globals fairseq checkpoints need, before fairseq loads any
import torch
from tqdm import tqdm

from lawa_utils import (
    LawaError,
    append_rows,
    atomic_write,
    find_checkpoints,
    iter_window_averages,
    read_results,
    run_info,
)

PROG = "evaluate_lawa.py"
SPLIT_NAMES = {"val": "validation", "train": "training"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="?", default=None, metavar="DATA",
                        help="fairseq-preprocess output folder (default: the one recorded in the checkpoints)")
    parser.add_argument("--ckpt-dir", required=True, type=Path, help="directory with checkpoint{E}.pt")
    parser.add_argument("--ks", default="2,4,6,8,10", help="window sizes k, comma-separated (default: 2,4,6,8,10)")
    parser.add_argument("--method", choices=["uni", "exp"], default="uni",
                        help="uni: LAWA's uniform average; exp: the paper's Appendix C exponential weights")
    parser.add_argument("--alpha", type=float, default=0.9, help="exp: weight of the newest checkpoint")
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


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",")})
    except ValueError:
        raise LawaError(f"--ks must be comma-separated integers such as 2,4,6, got '{text}'") from None
    if ks[0] < 2:
        raise LawaError(f"--ks must be ≥ 2 (k=1 is the plain checkpoint: the baseline rows), got '{text}'")
    return ks


def parse_epochs(text: str | None, checkpoints: dict) -> list[int]:
    if text is None:
        return sorted(checkpoints)
    try:
        parts = [int(p) for p in text.split(":")]
        ends = list(range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1)) if len(parts) > 1 else parts
    except (ValueError, IndexError):
        raise LawaError(f"--epochs must be 'A:B', 'A:B:STEP' or 'E', got '{text}'") from None
    missing = [e for e in ends if e not in checkpoints]
    if not ends or len(parts) > 3 or missing:
        have = f"checkpoint{min(checkpoints)}.pt..checkpoint{max(checkpoints)}.pt"
        raise LawaError(f"--epochs {text}: no checkpoint{missing[0] if missing else ''}.pt (have {have})")
    return ends


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


def done_cells(out: Path, method: str, splits: list[str], optimizer: str, seed: int) -> tuple[set, set]:
    """(E, k) cells of this trajectory already in ``out`` with every split asked for: sweep and baseline."""
    if not out.exists():
        return set(), set()
    rows = read_results(out)
    rows = rows[(rows["optimizer"].astype(str) == optimizer) & (rows["seed"] == seed) & (rows["metric"] == "loss")]

    def cells(m: str) -> set:
        have = rows[rows["method"] == m].groupby(["epoch", "k"])["split"].agg(set)
        return {(int(e), int(k)) for (e, k), got in have.items() if set(splits) <= got}

    return cells(method), cells("baseline")


def main(argv: list[str] | None = None) -> None:
    try:
        sweep(get_args_parser().parse_args(argv))
    except LawaError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def sweep(args: argparse.Namespace) -> None:
    ks = parse_ks(args.ks)
    checkpoints = find_checkpoints(args.ckpt_dir)
    ends = parse_epochs(args.epochs, checkpoints)
    out = args.out or args.ckpt_dir / "results.csv"
    if not out.parent.is_dir():
        raise LawaError(f"--out {out}: directory {out.parent} does not exist")
    if args.train_batches < 0 or args.batch_size < 1:
        raise LawaError("--train-batches must be ≥ 0 and --batch-size ≥ 1")
    if args.data is not None and not Path(args.data.split(":")[0]).is_dir():
        raise LawaError(f"DATA {args.data} is not a folder (the fairseq-preprocess output: bert/prepare_data.sh)")

    task, model, criterion, cfg = load_fairseq(checkpoints[ends[-1]], args.data, args.trust_checkpoints)
    optimizer, seed = str(cfg.optimizer._name), int(cfg.common.seed)
    splits = ["val"] + (["train"] if args.train_batches else [])
    method = "lawa" if args.method == "uni" else "exp"
    done_sweep, done_base = done_cells(out, method, splits, optimizer, seed)
    first = min(checkpoints)
    todo = sum((e, k) not in done_sweep for e in ends for k in ks if e - k + 1 >= first)
    todo += 0 if args.no_baseline else sum((e, 1) not in done_base for e in ends)
    # Validates every window (a checkpoint missing inside one is named) before any work is done. A uniform
    # window of one is the checkpoint itself, bit for bit: with k=1 in the same pass every file is read once.
    if args.method == "uni":
        skip_base = {(e, 1) for e in ends if args.no_baseline or (e, 1) in done_base}
        cells = iter_window_averages(checkpoints, [1, *ks], ends, trust=args.trust_checkpoints,
                                     skip=done_sweep | skip_base)
    else:
        cells = iter_window_averages(checkpoints, ks, ends, method="exp", alpha=args.alpha,
                                     trust=args.trust_checkpoints, skip=done_sweep)
        if not args.no_baseline:  # usually done already by the uniform sweep
            cells = itertools.chain(cells, iter_window_averages(checkpoints, [1], ends,
                                                                trust=args.trust_checkpoints, skip=done_base))
    cells = iter(cells)
    pending = next(cells, None)
    if pending is None:
        print(f"{PROG}: all cells of {args.ckpt_dir} are already in {out}")
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
        for end, k, state in itertools.chain([pending], cells):
            try:
                model.load_state_dict(state, strict=True, model_cfg=cfg.model)
            except RuntimeError as exc:
                raise LawaError(f"the average of checkpoints {end - k + 1}..{end} does not fit the model built "
                                f"from checkpoint{ends[-1]}.pt ({str(exc).splitlines()[0]})") from None
            losses = {s: masked_lm_loss(task, model, criterion, b, device) for s, b in batches.items()}
            if not all(math.isfinite(v) for v in losses.values()):
                print(f"{PROG}: warning: non-finite loss at E={end} k={k}: {losses}", file=sys.stderr)
            append_rows(out, [{"method": method if k > 1 else "baseline", "k": k, "epoch": end, "split": s,
                               "metric": "loss", "value": v, "wall_seconds": "", "optimizer": optimizer,
                               "seed": seed} for s, v in losses.items()])
            bar.set_postfix_str(f"E={end} k={k} val loss {losses['val']:.3f}")
            bar.update()
    print(f"{PROG}: {bar.n} cells in {time.perf_counter() - started:.0f} s -> {out}")
    print_summary(out, method, optimizer, seed)


def record_run(out: Path, args: argparse.Namespace) -> None:
    """Append this sweep's command, versions and settings (batch size, data, ...) to OUT.args.json."""
    path = out.with_name(out.stem + ".args.json")
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append({**run_info(), "args": vars(args)})
    text = json.dumps(runs, indent=2, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()), force=True)


def print_summary(out: Path, method: str, optimizer: str, seed: int) -> None:
    """Validation loss (bits) by end epoch: the baseline and each k, as in the paper's figures."""
    rows = read_results(out)
    rows = rows[(rows["optimizer"].astype(str) == optimizer) & (rows["seed"] == seed) & (rows["split"] == "val")
                & (rows["metric"] == "loss") & rows["method"].isin(["baseline", method])]
    table = rows.pivot_table(index="epoch", columns=["method", "k"], values="value", aggfunc="last")
    print(f"validation masked-LM loss (bits) by end epoch E, {method} k columns:")
    print(table.round(3).to_string())


if __name__ == "__main__":
    main()
