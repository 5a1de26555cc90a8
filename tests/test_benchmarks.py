"""benchmarks/: every script runs in --quick mode, exits 0, writes its files, and its correctness checks pass.

Timings are not tested (the numbers live in BENCHMARKS.md). The four quick runs start together, as separate
processes, so the module takes about as long as the slowest of them.
"""

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is a package at the repository root, not an installed one

from benchmarks import baselines, common  # noqa: E402

SCRIPTS = ["sweep", "fairseq_average", "throughput", "scheduler", "profile_imagenet"]


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmarks")
    procs = {}
    for name in SCRIPTS:
        log = open(out / f"{name}.log", "w")  # a file, not a pipe: four chatty children cannot block on it
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out)]
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log)
    codes = {}
    for name, (proc, log) in procs.items():
        codes[name] = proc.wait(timeout=600)
        log.close()
    return out, codes


@pytest.mark.parametrize("name", SCRIPTS)
def test_quick_run_exits_0_with_its_correctness_checks_passed(quick_runs, name):
    out, codes = quick_runs
    assert codes[name] == 0, (out / f"{name}.log").read_text()[-4000:]
    record = json.loads((out / f"{name}.json").read_text())
    assert record["checks"], "every benchmark checks the results it times"
    assert [c for c in record["checks"] if not c["passed"]] == []
    assert record["summary"] and record["goals"]
    assert "load average" in record["load_before"] and "load average" in record["load_after"]
    with open(out / f"{name}.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == common.CSV_COLUMNS
    assert (out / f"{name}.md").read_text().startswith("### ")


def test_a_failed_check_makes_the_exit_status_1_and_a_missed_goal_does_not(tmp_path):
    args = argparse.Namespace(quick=True, repeats=1, seed=0, out=tmp_path)
    report = common.Report("unit", "unit", args, {})
    report.goal("fast", "1×", "≥ 10×", False)
    report.check("equal", 0.0, "≤ 1e-6", True)
    assert report.finish() == 0
    report.check("equal again", 1.0, "≤ 1e-6", False)
    assert report.finish() == 1


def test_baseline_mean_is_the_plain_average_with_integers_from_the_newest():
    states = [
        {"module.w": torch.tensor([1.0, 2.0]), "module.n": torch.tensor(3)},
        {"module.w": torch.tensor([3.0, 6.0]), "module.n": torch.tensor(7)},
    ]
    mean = baselines.mean_of(iter(states))
    assert mean.keys() == {"w", "n"}
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and mean["n"].item() == 7
    assert torch.equal(states[0]["module.w"], torch.tensor([1.0, 2.0])), "inputs must not be modified"


def test_fairseq_baselines_average_the_model_and_keep_the_rest(tmp_path):
    files = []
    for i, value in enumerate([1.0, 2.0, 6.0]):
        ckpt = {"model": {"w": torch.full((3,), value)}, "extra_state": {"epoch": i}, "cfg": {"lr": 0.1}}
        files.append(tmp_path / f"checkpoint{i}.pt")
        torch.save(ckpt, files[-1])
    load_all, streaming = baselines.average_load_all(files), baselines.average_streaming(files)
    assert torch.equal(load_all["model"]["w"], torch.full((3,), 3.0))
    assert torch.equal(streaming["model"]["w"], torch.full((3,), 3.0))
    assert load_all["extra_state"]["epoch"] == 2, "load-all keeps the newest file's entries"
    assert streaming["extra_state"]["epoch"] == 0, "streaming keeps the first file's, as fairseq's script does"
    baselines.save_durably(load_all, tmp_path / "avg.pt")
    assert torch.equal(torch.load(tmp_path / "avg.pt")["model"]["w"], torch.full((3,), 3.0))


def test_max_abs_diff_is_infinite_when_keys_or_integers_differ():
    a = {"w": torch.zeros(2), "n": torch.tensor(1)}
    assert common.max_abs_diff(a, {"w": torch.full((2,), 1e-7), "n": torch.tensor(1)}) == pytest.approx(1e-7)
    assert common.max_abs_diff(a, {"w": torch.zeros(2), "n": torch.tensor(2)}) == float("inf")
    assert common.max_abs_diff(a, {"w": torch.zeros(2)}) == float("inf")
