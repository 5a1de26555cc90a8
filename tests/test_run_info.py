"""lawa_utils.run_info: the machine evidence every run's args.json carries (CPU, threads, torch build, speed)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lawa_utils import micro_benchmark, run_info, torch_build


def test_run_info_names_the_machine_and_its_speed():
    start = time.perf_counter()
    info = run_info(["train.py", "--x"])
    assert time.perf_counter() - start < 5          # the benchmark is ~0.2 s; git may take a moment
    hw = info["hardware"]
    assert hw["cpu_model"] and hw["cpu_count"] >= 1 and hw["torch_threads"] == torch.get_num_threads()
    assert hw["torch_build"]["version"] == torch.__version__
    assert hw["torch_build"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert hw["benchmark"]["matmul_gflops"] > 0 and hw["benchmark"]["copy_gbps"] > 0
    assert info["command"].endswith("train.py --x")
    json.dumps(info)                                  # goes into args.json as it is


def test_micro_benchmark_counts_flops_and_bytes_against_a_timed_loop():
    # An independent measurement of the same matmul: the benchmark's best repetition can only be faster than a
    # plain loop's average (up to what other load on a shared machine does between the two).
    a, b = torch.rand(256, 256), torch.rand(256, 256)
    torch.mm(a, b)
    n, start = 20, time.perf_counter()
    for _ in range(n):
        torch.mm(a, b)
    average = 2 * 256**3 * n / (time.perf_counter() - start) / 1e9
    bench = micro_benchmark(0.05)
    assert bench["matmul_gflops"] >= 0.1 * average   # generous: other load on the machine comes and goes
    assert bench["threads"] == torch.get_num_threads()
    assert torch_build()["parallel"] in torch.__config__.parallel_info()
