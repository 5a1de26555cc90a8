"""bert/ under faults: the fairseq sweep killed with SIGKILL mid-way and rerun, its determinism on CPU, and
untrusted checkpoints refused by the sweep and, through the plugin, by fairseq's own tools.

The trajectory is tests/test_bert.py's tiny 2-epoch run (its `ptb` and `trained` fixtures, imported: with
them in a conftest.py the session would train it once). RELIABILITY.md records the trials and outcomes.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from test_bert import BERT, BIN, REPO, evaluate_lawa, ptb, run, trained  # noqa: F401  (fixtures: tests use F811)
from test_lawa_utils import _RunsCode
from test_reliability import kill_9, one_error_line, wait_until

import lawa_utils as lu

SWEEP = ["--ks", "2", "--train-batches", "2"]
CELLS = {("baseline", 1, 1), ("baseline", 1, 2), ("lawa", 2, 2)}  # (method, k, E), each a val and a train row


def start_sweep(ckpt_dir: Path, out: Path, stdout: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # every sweep process the same threads: the same rounding
    cmd = [sys.executable, str(BERT / "evaluate_lawa.py"), "--ckpt-dir", str(ckpt_dir), *SWEEP, "--out", str(out)]
    with open(stdout, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def whole_rows(out: Path) -> int:
    """Rows in a results CSV, checking that it holds only whole lines and whole cells."""
    if not out.exists():
        return 0
    text = out.read_text()
    assert text.endswith("\n"), text[-300:]
    rows = text.splitlines()[1:]
    assert all(row.count(",") == len(lu.RESULT_COLUMNS) - 1 for row in rows) and len(rows) % 2 == 0, rows
    return len(rows)


def test_sweep_killed_mid_way_reruns_to_every_cell_once_equal_to_an_uninterrupted_sweep(trained, tmp_path):  # noqa: F811
    uninterrupted, out = tmp_path / "uninterrupted.csv", tmp_path / "results.csv"
    reference = start_sweep(trained, uninterrupted, tmp_path / "reference.txt")  # beside the killed sweeps
    rng = random.Random(3)
    # First a random moment of the start-up (fairseq's import, task, model, batches), then, in the rerun, the
    # moment the first cell's rows are written, while the next cell is being computed.
    proc = start_sweep(trained, out, tmp_path / "sweep0.txt")
    time.sleep(rng.uniform(0.0, 2.0))
    assert kill_9(proc), (tmp_path / "sweep0.txt").read_text()[-2000:]
    whole_rows(out)
    proc = start_sweep(trained, out, tmp_path / "sweep1.txt")
    wait_until(proc, lambda: whole_rows(out) >= 2)
    assert kill_9(proc), (tmp_path / "sweep1.txt").read_text()[-2000:]
    print("bert sweep: rows in the CSV after the second kill:", whole_rows(out))
    assert 2 <= whole_rows(out) < 2 * len(CELLS)

    proc = start_sweep(trained, out, tmp_path / "rerun.txt")
    assert proc.wait(timeout=600) == 0, (tmp_path / "rerun.txt").read_text()[-3000:]
    whole_rows(out)
    results = lu.read_results(out)
    assert not results.duplicated(["method", "k", "epoch", "split", "metric"]).any()
    assert set(zip(results["method"], results["k"], results["epoch"], strict=True)) == CELLS
    assert reference.wait(timeout=600) == 0, (tmp_path / "reference.txt").read_text()[-3000:]
    # Determinism: cells computed by different processes equal one uninterrupted sweep's, bit for bit and in order.
    pd.testing.assert_frame_equal(results, lu.read_results(uninterrupted), check_exact=True)


def with_payload(run_dir: Path, epoch: int, path: Path, marker: Path) -> Path:
    ckpt = torch.load(run_dir / f"checkpoint{epoch}.pt", weights_only=False)  # our own file: trusted
    torch.save({**ckpt, "payload": _RunsCode(marker)}, path)
    return path


def test_untrusted_checkpoint_is_refused_by_the_sweep_and_runs_no_code(trained, tmp_path, capsys):  # noqa: F811
    marker = tmp_path / "pwned"
    # The newest checkpoint is the one fairseq's loader builds the task and model from: refused. The others
    # are read by lawa_utils' inert unpickler, which takes their tensors and never runs the payload's code.
    for evil_epoch in (2, 1):
        folder = tmp_path / f"evil{evil_epoch}"
        folder.mkdir()
        for epoch in (1, 2):
            if epoch != evil_epoch:
                (folder / f"checkpoint{epoch}.pt").symlink_to(trained / f"checkpoint{epoch}.pt")
        evil = with_payload(trained, evil_epoch, folder / f"checkpoint{evil_epoch}.pt", marker)
        if evil_epoch == 2:
            one_error_line(capsys, evaluate_lawa.main, ["--ckpt-dir", str(folder), *SWEEP],
                           f"{evil} was refused", "--trust-checkpoints")
            assert not (folder / "results.csv").exists()
        else:
            evaluate_lawa.main(["--ckpt-dir", str(folder), *SWEEP])
            assert len(lu.read_results(folder / "results.csv")) == 2 * len(CELLS)
        assert not marker.exists()


def test_sweep_refuses_an_out_file_that_is_not_a_results_csv_and_leaves_it_as_it_was(trained, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "notes.csv"
    out.write_text("name,score\nmine,1\n")
    one_error_line(capsys, evaluate_lawa.main, ["--ckpt-dir", str(trained), *SWEEP, "--out", str(out)],
                   f"{out}: missing column(s)")
    assert out.read_text() == "name,score\nmine,1\n"


def test_fairseq_validate_with_the_plugin_still_refuses_a_malicious_checkpoint(trained, ptb, tmp_path):  # noqa: F811
    # The plugin allows the one class fairseq checkpoints need (argparse.Namespace) and nothing more: fairseq's
    # own loader keeps torch's safe loading. (With a good checkpoint it loads: tests/test_bert.py.)
    marker = tmp_path / "pwned"
    evil = with_payload(trained, 2, tmp_path / "checkpoint2.pt", marker)
    proc = run([BIN / "fairseq-validate", ptb, "--path", evil, "--task", "masked_lm", "--batch-size", "16",
                "--user-dir", BERT / "lawa_plugin", "--cpu"], check=False)
    assert proc.returncode != 0 and "Weights only load failed" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()
