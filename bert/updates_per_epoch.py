#!/usr/bin/env python
"""How many optimizer updates one epoch of fairseq masked-LM training makes, counted with fairseq itself.

    python bert/updates_per_epoch.py runs/bert/data-bin/ptb --tokens-per-sample 128 --batch-size 16
    python bert/updates_per_epoch.py data-bin/wikitext-103 --tokens-per-sample 512 --batch-size 16 \
        --update-freq 32 --world-size 4          # the paper: 2048 sequences per update on 4 GPUs

train.sh needs it for the polynomial-decay horizon: fairseq's ``--total-num-update`` is counted in
updates, the recipe in epochs. The count builds the training set exactly as fairseq-train does
(``--sample-break-mode complete`` blocks of at most tokens-per-sample tokens, ``--batch-size`` sequences
per GPU, batch sizes rounded to multiples of 8), shards the batches over the workers, and groups
``--update-freq`` of them into one update.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

PROG = "updates_per_epoch.py"


def updates_per_epoch(data: str, tokens_per_sample: int, batch_size: int, update_freq: int = 1,
                      world_size: int = 1) -> int:
    """The number of updates in one epoch of ``fairseq-train DATA --task masked_lm`` with these flags."""
    from fairseq.tasks.masked_lm import MaskedLMConfig, MaskedLMTask

    cfg = MaskedLMConfig(data=data, tokens_per_sample=tokens_per_sample, sample_break_mode="complete", seed=1)
    task = MaskedLMTask.setup_task(cfg)
    task.load_dataset("train", epoch=1)
    itr = task.get_batch_iterator(dataset=task.dataset("train"), max_sentences=batch_size,
                                  max_positions=tokens_per_sample, ignore_invalid_inputs=True,
                                  required_batch_size_multiple=8, num_shards=world_size, shard_id=0)
    return math.ceil(len(itr) / update_freq)  # len(itr): batches per worker (shards are padded equal)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="fairseq-preprocess output folder (dict.txt, train.bin/.idx)")
    parser.add_argument("--tokens-per-sample", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="sequences per GPU per forward pass")
    parser.add_argument("--update-freq", type=int, default=1)
    parser.add_argument("--world-size", type=int, default=1, help="data-parallel workers (GPUs)")
    args = parser.parse_args(argv)
    for name in ("dict.txt", "train.bin", "train.idx"):
        if not (Path(args.data) / name).is_file():
            print(f"{PROG}: error: {Path(args.data) / name} is missing: DATA must be the output of "
                  "bert/prepare_data.sh", file=sys.stderr)
            sys.exit(2)
    print(updates_per_epoch(args.data, args.tokens_per_sample, args.batch_size, args.update_freq,
                            args.world_size))


if __name__ == "__main__":
    main()
