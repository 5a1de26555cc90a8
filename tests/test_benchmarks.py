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


def _hf_dir(path, tensors, shards):
    """A sharded HF-style directory: ``shards`` maps file name -> tensor names; index and config.json beside."""
    from safetensors.torch import save_file

    path.mkdir()
    weight_map = {}
    for name, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text("{}")
    return path


def test_merge_oracle_takes_the_nearest_bf16_and_either_neighbour_only_at_a_tie():
    from benchmarks import merge

    one = 1.0
    step = 2.0**-7  # bf16's spacing in [1, 2)
    # 1e-5 of a step below a midpoint is 8e-8 relative (within a 1e-6-relative mean's reach: either way is
    # right); 1e-2 of a step is 8e-5 relative (only the nearest is).
    mean = torch.tensor([one, one + 0.25 * step, one + 0.5 * step, one + 0.75 * step, -one - 0.5 * step,
                         one + (0.5 - 1e-5) * step, one + (0.5 - 1e-2) * step, 0.0], dtype=torch.float64)
    near, alt_idx, alt_val = merge._nearest_bf16(mean)
    assert near.dtype == torch.bfloat16
    assert near.tolist() == [one, one, one, one + step, -one, one, one, 0.0]  # ties to even: 1.0, -1.0
    order = alt_idx.argsort()
    assert alt_idx[order].tolist() == [2, 4, 5]
    assert alt_val[order].tolist() == [one + step, -one - step, one + step]


def test_merge_load_all_baseline_and_check_against_the_oracle(tmp_path):
    from benchmarks import merge

    gen = torch.Generator().manual_seed(0)
    shards = {"model-00001-of-00002.safetensors": ["a", "b"], "model-00002-of-00002.safetensors": ["c"]}
    dirs = []
    for i in range(3):
        tensors = {"a": torch.randn(4, 8, generator=gen), "b": torch.randn(8, generator=gen) + 1,
                   "c": torch.randn(3, 5, generator=gen)}
        dirs.append(_hf_dir(tmp_path / f"checkpoint-{i + 1}", {k: v.bfloat16() for k, v in tensors.items()}, shards))
    oracle = merge.build_oracle(dirs, tmp_path / "oracle")
    merge.load_all_average(dirs, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*shards, "model.safetensors.index.json",
                                                                           "config.json"])
    assert merge.check_output(tmp_path / "out", oracle) == {
        "bad_elements": 0.0, "at_alternative": 0.0, "missing_or_mismatched": 0.0}
    from safetensors.torch import load_file, save_file

    first = tmp_path / "out" / "model-00001-of-00002.safetensors"
    tensors = load_file(first)
    tensors["a"][0, 0] = tensors["a"][0, 0] * 2 + 1  # one element off
    del tensors["b"]  # one tensor missing (from the file and the index)
    save_file(tensors, first, metadata={"format": "pt"})
    index = tmp_path / "out" / "model.safetensors.index.json"
    record = json.loads(index.read_text())
    del record["weight_map"]["b"]
    index.write_text(json.dumps(record))
    result = merge.check_output(tmp_path / "out", oracle)
    assert result["bad_elements"] == 1.0 and result["missing_or_mismatched"] == 1.0


def test_dcp_cost_model_matches_the_closed_forms():
    from benchmarks import dcp_ranks

    rows = {(r["scenario"][:7], r["W"], r["strategy"].split(",")[0].split(" (")[0]): r
            for r in dcp_ranks.cost_model(ranks=64, fs_gbps=32.0, reader_gbps=2.0, k=6, k_max=10)}
    roberta_model = 125e6 * 4 / 1e9
    one = rows[("RoBERTa", 64, "one average")]
    assert one["read per rank GB"] == pytest.approx(6 * roberta_model / 64)
    assert one["GB/s per rank"] == 0.5 and one["read time s"] == pytest.approx(6 * roberta_model / 64 / 0.5)
    blocks = rows[("RoBERTa", 64, "sweep by end blocks")]
    assert blocks["read per rank GB"] == pytest.approx((4 + 9) * roberta_model)  # ceil(200/64) ends + 9 before
    shares = rows[("70B par", 64, "sweep by tensor shares")]
    assert shares["read per rank GB"] == pytest.approx(50 * 280 / 64)
    assert shares["memory per rank GB"] == pytest.approx(11 * 280 / 64)
    assert rows[("70B par", 1, "one average")]["read time s"] == pytest.approx(6 * 280 / 2.0)
