#!/usr/bin/env python
"""Turn nanoGPT's tokenised OpenWebText (train.bin, val.bin) into a fairseq language-modelling data folder.

    python gpt/nanogpt_to_fairseq.py /data/nanoGPT/data/openwebtext --out runs/gpt/data-bin/openwebtext

The paper prepared OpenWebText with nanoGPT's ``data/openwebtext/prepare.py``: every document GPT-2-BPE-encoded
with tiktoken, an end-of-text token (50256) appended, all concatenated into one stream of uint16 token ids
(train.bin ~9B tokens, val.bin ~4M). fairseq reads the same stream when each GPT-2 id i becomes the dictionary
symbol "i": ``dict.txt`` lists 0 … 50256 in order, so fairseq's index is i + 4 (after <s>, <pad>, </s>,
<unk>), and ``train.{bin,idx}``/``valid.{bin,idx}`` hold the shifted ids in fairseq's mmap format, cut into
items of ``--chunk`` tokens (``--sample-break-mode none`` joins them into one stream again and cuts it into
--tokens-per-sample blocks, as nanoGPT's batches are cut from the stream). Nothing is tokenised again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lawa_utils import LawaError  # noqa: E402

PROG = "nanogpt_to_fairseq.py"
GPT2_VOCAB = 50257          # GPT-2's BPE: ids 0 … 50256 (50256 = <|endoftext|>)
FAIRSEQ_SPECIALS = 4        # <s>, <pad>, </s>, <unk> come first in every fairseq dictionary
SPLITS = {"train": "train", "val": "valid"}   # nanoGPT file stem -> fairseq split name


def write_dictionary(out: Path, vocab_size: int) -> None:
    """``dict.txt`` whose line i is GPT-2 id i, so that fairseq's index of id i is i + 4."""
    (out / "dict.txt").write_text("".join(f"{i} 1\n" for i in range(vocab_size)))


def convert_split(source: Path, prefix: Path, vocab_size: int, chunk: int) -> int:
    """Write ``prefix.bin``/``prefix.idx`` from nanoGPT's uint16 stream ``source``; returns the token count."""
    import torch
    from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder, best_fitting_int_dtype

    if source.stat().st_size % 2:
        raise LawaError(f"{source} has an odd number of bytes: not a stream of uint16 token ids")
    ids = np.memmap(source, dtype=np.uint16, mode="r")
    if len(ids) == 0:
        raise LawaError(f"{source} is empty")
    builder = MMapIndexedDatasetBuilder(str(prefix) + ".bin",
                                        dtype=best_fitting_int_dtype(vocab_size + FAIRSEQ_SPECIALS))
    for start in range(0, len(ids), chunk):
        piece = np.asarray(ids[start:start + chunk], dtype=np.int64)
        if piece.max() >= vocab_size:
            raise LawaError(f"{source} holds token id {int(piece.max())} at or after position {start}, outside "
                            f"the vocabulary of {vocab_size} (--vocab-size)")
        builder.add_item(torch.from_numpy(piece + FAIRSEQ_SPECIALS))
    builder.finalize(str(prefix) + ".idx")
    return len(ids)


def convert(source: Path, out: Path, vocab_size: int = GPT2_VOCAB, chunk: int = 1 << 20) -> dict[str, int]:
    """Convert nanoGPT's ``train.bin``/``val.bin`` in ``source`` into fairseq data in ``out``."""
    for stem in SPLITS:
        if not (source / f"{stem}.bin").is_file():
            raise LawaError(f"{source / (stem + '.bin')} is missing: OPENWEBTEXT must hold nanoGPT's train.bin and "
                            "val.bin (data/openwebtext/prepare.py)")
    if chunk < 1 or vocab_size < 1:
        raise LawaError("--chunk and --vocab-size must be positive")
    out.mkdir(parents=True, exist_ok=True)
    write_dictionary(out, vocab_size)
    return {split: convert_split(source / f"{stem}.bin", out / split, vocab_size, chunk)
            for stem, split in SPLITS.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder with nanoGPT's train.bin and val.bin")
    parser.add_argument("--out", type=Path, required=True, help="fairseq data folder to write")
    parser.add_argument("--vocab-size", type=int, default=GPT2_VOCAB, help=f"token ids 0..N-1 (default: {GPT2_VOCAB})")
    parser.add_argument("--chunk", type=int, default=1 << 20, help="tokens per fairseq item (default: 2^20)")
    args = parser.parse_args(argv)
    try:
        counts = convert(args.source, args.out, args.vocab_size, args.chunk)
    except LawaError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"{PROG}: " + ", ".join(f"{split} {n:,} tokens" for split, n in counts.items()) + f" -> {args.out}")


if __name__ == "__main__":
    main()
