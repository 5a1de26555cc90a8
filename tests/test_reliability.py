"""Fault injection: `kill -9` of `lawa_utils average` at random moments, including mid-write.

Whatever the moment, the output name holds either nothing or a complete, loadable average, and a rerun
succeeds. (Trainer and sweep kill tests live beside their scripts' tests.)
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import lawa_utils as lu

REPO = Path(__file__).resolve().parents[1]


def _big_trajectory(tmp_path, n=3, numel=6_000_000):
    torch.manual_seed(0)
    for epoch in range(1, n + 1):
        state = {"w": torch.randn(numel), "b": torch.randn(1000), "steps": torch.tensor(epoch)}
        torch.save({"epoch": epoch, "state_dict": state}, tmp_path / f"checkpoint{epoch}.pt")


def _start(tmp_path, out):
    cmd = [sys.executable, "-m", "lawa_utils", "average", "--dir", str(tmp_path), "--end", "3", "--k", "3"]
    return subprocess.Popen([*cmd, "--out", str(out), "--force"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _assert_absent_or_complete(out, expected):
    if out.exists():
        state = lu.load_model_state(out)
        assert torch.allclose(state["w"], expected["w"]) and state["steps"].item() == 3


def test_kill_9_during_average_never_leaves_a_partial_output(tmp_path):
    _big_trajectory(tmp_path)
    expected = lu.average_state_dicts([lu.load_model_state(tmp_path / f"checkpoint{e}.pt") for e in (1, 2, 3)])
    out = tmp_path / "avg.pt"
    rng = random.Random(7)
    outcomes = {"killed mid-write": 0, "killed elsewhere": 0, "finished": 0}
    for trial in range(10):
        out.unlink(missing_ok=True)
        proc = _start(tmp_path, out)
        if trial % 2 == 0:  # wait for the temporary file to appear, then kill during the write
            deadline = time.monotonic() + 60
            while not list(tmp_path.glob(".avg.pt.tmp*")) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)
            was_writing = bool(list(tmp_path.glob(".avg.pt.tmp*")))
        else:  # a random moment in the run
            time.sleep(rng.uniform(0.0, 3.0))
            was_writing = False
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            outcomes["killed mid-write" if was_writing else "killed elsewhere"] += 1
        else:
            outcomes["finished"] += 1
        proc.wait(timeout=60)
        _assert_absent_or_complete(out, expected)
    assert outcomes["killed mid-write"] >= 3, outcomes
    proc = _start(tmp_path, out)  # the rerun after all that finishes
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    _assert_absent_or_complete(out, expected)
    assert out.exists()
    assert not list(tmp_path.glob(".avg.pt.tmp*"))  # the killed writers' temporaries were cleaned up
