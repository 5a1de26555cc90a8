"""C. Raw averaging throughput: ``lawa_utils.average_state_dicts`` vs this machine's streaming-add bandwidth.

k=10 in-memory fp32 state dicts with ResNet-50's tensor names and shapes (25.6M floats, 102 MB each). Each
state dict is a set of views into one flat tensor, so the roofline below reads exactly the same bytes:

- ``stream-add``: ``acc.add_(flat_i, alpha=1/k)`` for the k flat tensors into one preallocated accumulator —
  the fastest way to stream the same input through an in-place fp32 add (the machine's bandwidth, measured
  in the same run as what it bounds);
- ``average_state_dicts``: ``lawa_utils.average_state_dicts(states)``, one call (it allocates its outputs);
- ``zeros-alloc`` (diagnostic): only ``torch.zeros`` of every output tensor, the allocation and first-touch
  cost that the roofline does not pay;
- ``patched`` (with ``--patched PATH``): ``average_state_dicts`` from a modified copy of lawa_utils.py.

Throughput is GB of *input* per second: k × 102 MB / time (an add also reads and writes the accumulator, so
memory traffic is up to 3× that). The variants alternate within every repeat; medians are reported.

    python -m benchmarks.throughput          # ≈15 s
    python -m benchmarks.throughput --quick
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path

import torch

import lawa_utils as lu
from benchmarks import common, synthetic

NAME = "throughput"
TITLE = "C. Averaging throughput vs streaming-add bandwidth (in memory, fp32)"


def flat_states(layout, k: int, seed: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """k flat fp32 tensors holding synthetic weights, and the state dicts that view into them."""
    gen = torch.Generator().manual_seed(seed)
    base = synthetic.center(layout, gen)
    flats, states = [], []
    for i in range(k):
        snap = synthetic.snapshot(layout, base, step=i, gen=gen)
        flat = torch.cat([snap[n].flatten() for n in base])
        del snap
        views, offset = {}, 0
        for name, (shape, _) in layout.items():
            if name in base:
                n = math.prod(shape)
                views[name] = flat[offset : offset + n].view(shape)
                offset += n
        flats.append(flat)
        states.append(views)
    return flats, states


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], repeats=7)
    p.add_argument("--k", type=int, default=10, help="state dicts averaged per call")
    p.add_argument("--model", default="resnet50", help="torchvision architecture whose shapes are used")
    p.add_argument("--patched", type=Path, help="also time average_state_dicts from this copy of lawa_utils.py")
    args = common.parse(p, argv)
    if args.quick:
        args.k, args.repeats = 3, 1
    layout, _ = synthetic.tiny_cnn_layout() if args.quick else synthetic.torchvision_layout(args.model)
    # Integer buffers (num_batches_tracked) are copied, not streamed: leave them out of a bandwidth test.
    layout = {n: v for n, v in layout.items() if v[1].is_floating_point}
    flats, states = flat_states(layout, args.k, args.seed)
    input_bytes = sum(f.numel() * f.element_size() for f in flats)
    report = common.Report(NAME, TITLE, args, {
        "model": "tiny" if args.quick else args.model, "k": args.k, "tensors_per_state": len(layout),
        "floats_per_state": flats[0].numel(), "input_mb": round(input_bytes / 1e6, 1),
        "torch_threads": torch.get_num_threads(),
    })
    patched = None
    if args.patched:
        spec = importlib.util.spec_from_file_location("lawa_utils_patched", args.patched)
        patched = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(patched)

    weights = [1.0 / args.k] * args.k
    acc = torch.zeros_like(flats[0])
    reference = torch.zeros_like(flats[0], dtype=torch.float64)
    for f in flats:
        reference.add_(f.double(), alpha=1.0 / args.k)

    def stream_add():
        acc.zero_()  # untimed part below: only the adds are the roofline
        t0 = time.perf_counter()
        for f, w in zip(flats, weights, strict=True):
            acc.add_(f, alpha=w)
        return time.perf_counter() - t0, None

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    variants = {
        "stream-add": stream_add,
        "average_state_dicts": lambda: timed(lambda: lu.average_state_dicts(states)),
        "zeros-alloc": lambda: timed(lambda: {n: torch.zeros(t.shape) for n, t in states[-1].items()}),
    }
    if patched:
        variants["patched"] = lambda: timed(lambda: patched.average_state_dicts(states))
    worst: dict[str, float] = {}
    for r in range(args.repeats):
        for name in common.interleaved(list(variants), r):
            seconds, out = variants[name]()
            report.measure(name, "in-memory", r, "seconds", seconds, "s")
            report.measure(name, "in-memory", r, "input_gb_per_s", input_bytes / seconds / 1e9, "GB/s")
            if name == "stream-add":
                got = acc
            elif name == "zeros-alloc":
                continue
            else:
                got = torch.cat([out[n].flatten() for n in states[-1]])
            worst[name] = max(worst.get(name, 0.0), float((got.double() - reference).abs().max()))
            del out, got
    for name, diff in worst.items():
        report.check(f"{name}: result equals the fp64 average", diff, "max abs diff ≤ 1e-6", diff <= 1e-6)

    roof = common.median(report.values("stream-add", "input_gb_per_s"))
    for name in variants:
        rates = report.values(name, "input_gb_per_s")
        report.summary.append({
            "variant": name, "input GB/s (median)": common.median(rates),
            "min–max": f"{min(rates):.3g}–{max(rates):.3g}",
            "ms per call": 1e3 * common.median(report.values(name, "seconds")), "n": len(rates),
            "% of stream-add": f"{100 * common.median(rates) / roof:.0f}%" if name != "zeros-alloc" else "–",
        })
    share = common.median(report.values("average_state_dicts", "input_gb_per_s")) / roof
    report.goal("average_state_dicts ≥ 50% of streaming-add bandwidth", f"{100 * share:.0f}%", "≥ 50%", share >= 0.5)
    if patched:
        share_p = common.median(report.values("patched", "input_gb_per_s")) / roof
        report.goal("patched ≥ 50% of streaming-add bandwidth", f"{100 * share_p:.0f}%", "≥ 50%", share_p >= 0.5)
    report.note(
        f"Input GB/s = k × state size / time; stream-add's memory traffic is 3× its input rate "
        f"(≈{3 * roof:.1f} GB/s here). torch threads: {torch.get_num_threads()}."
    )
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
