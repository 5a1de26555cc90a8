"""Fault injection for the top-level tools: `kill -9` of `lawa_utils average` at random moments (including
mid-write), and of a training loop that uses the online `LawaScheduler`, resumed from its checkpoint.

The kill helpers here are shared with tests/test_reliability_imagenet.py and tests/test_reliability_bert.py,
which kill the trainer and the sweeps. RELIABILITY.md lists every fault tried and the test that keeps it true.
"""

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import lawa_utils as lu

REPO = Path(__file__).resolve().parents[1]


def wait_until(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 300.0) -> bool:
    """Poll ``condition`` every 2 ms while ``proc`` runs: True once it holds, False if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if condition():
            return True
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {condition}")
        time.sleep(0.002)
    return False


def kill_9(proc: subprocess.Popen) -> bool:
    """SIGKILL ``proc``; True if the signal ended it, False if it had already exited by itself."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=60) == -signal.SIGKILL


def one_error_line(capsys, entry: Callable, argv: list[str], *fragments: str) -> str:
    """Call a script's ``main(argv)``: it must exit with status 2 and print one line besides tqdm's progress bar
    (a checkpoint that fails mid-sweep fails after the bar has started), containing every fragment."""
    with pytest.raises(SystemExit) as exit_info:
        entry(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and not line.startswith("cells:")]
    assert len(lines) == 1 and ": error: " in lines[0], err
    for fragment in fragments:
        assert fragment in lines[0], err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# lawa_utils average
# --------------------------------------------------------------------------------------------------


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
        assert torch.equal(state["w"], expected["w"]) and state["steps"].item() == 3


def test_kill_9_during_average_never_leaves_a_partial_output(tmp_path):
    _big_trajectory(tmp_path)
    states = [lu.load_model_state(tmp_path / f"checkpoint{e}.pt") for e in (1, 2, 3)]
    expected = lu.average_state_dicts(states)  # the CLI computes the uniform average exactly this way
    out = tmp_path / "avg.pt"
    rng = random.Random(7)
    outcomes = {"killed mid-write": 0, "killed elsewhere": 0, "finished": 0}
    for trial in range(10):
        out.unlink(missing_ok=True)
        proc = _start(tmp_path, out)
        if trial % 2 == 0:  # wait for the temporary file to appear, then kill during the write
            was_writing = wait_until(proc, lambda: bool(list(tmp_path.glob(".avg.pt.tmp*"))), timeout=60)
        else:  # a random moment in the run
            time.sleep(rng.uniform(0.0, 3.0))
            was_writing = False
        if kill_9(proc):
            outcomes["killed mid-write" if was_writing else "killed elsewhere"] += 1
        else:
            outcomes["finished"] += 1
        _assert_absent_or_complete(out, expected)
    print("lawa_utils average:", outcomes)
    assert outcomes["killed mid-write"] >= 3, outcomes
    proc = _start(tmp_path, out)  # the rerun after all that finishes
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    _assert_absent_or_complete(out, expected)
    assert out.exists()
    assert not list(tmp_path.glob(".avg.pt.tmp*"))  # the killed writers' temporaries were cleaned up


# --------------------------------------------------------------------------------------------------
# The online scheduler in a training loop
# --------------------------------------------------------------------------------------------------

# A training loop as a user would write it with online LAWA: an atomic checkpoint of model, optimizer,
# scheduler and step every 10 steps; started again, it resumes from that checkpoint. Batches depend only on
# the step, so an uninterrupted run and a killed-and-resumed one must end bit for bit the same.
LAWA_LOOP = """
import os, sys
import torch
import torch.nn.functional as F
import lawa_utils as lu
from lawa_scheduler import LawaScheduler

checkpoint, final, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
lawa = LawaScheduler(model, k=5, every_n_steps=7, start=20)  # saves every 10: resumes land mid-interval
first = 0
if os.path.exists(checkpoint):
    saved = lu.load_checkpoint(checkpoint)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    lawa.load_state_dict(saved["lawa"])
    first = saved["step"]
for step in range(first, steps):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    lawa.step()
    if (step + 1) % 10 == 0:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lawa": lawa.state_dict(),
                 "step": step + 1}
        lu.save_checkpoint(state, checkpoint, force=True)
        print("step", step + 1, flush=True)
lu.save_checkpoint({"average": lawa.averaged_state_dict(), "model": model.state_dict(), "lawa": lawa.state_dict()},
                   final, force=True)
"""
LOOP_STEPS = 400  # 40 saves: fsync makes a save cost ~50 ms on a busy disk


def _start_loop(folder: Path, stdout: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run: same rounding
    cmd = [sys.executable, "-c", LAWA_LOOP, str(folder / "checkpoint.pt"), str(folder / "final.pt"), str(LOOP_STEPS)]
    with open(stdout, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def test_training_loop_with_the_scheduler_killed_and_resumed_gives_bit_identical_averages(tmp_path):
    # tests/test_scheduler.py::test_killed_and_resumed_run_gives_bit_identical_averages checks the same in one
    # process; here the loop really dies (SIGKILL at random steps, mid-save included) and a new process resumes.
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    uninterrupted.mkdir()
    killed.mkdir()
    reference = _start_loop(uninterrupted, tmp_path / "uninterrupted.txt")  # runs beside the killed loops
    rng = random.Random(11)
    kills, resumed_from = [], 0
    for i in range(2):
        # a target past the step the previous kill left on disk: the resumed loop never prints earlier steps
        target = rng.randrange(resumed_from + 30, resumed_from + 130, 10)
        out = tmp_path / f"killed{i}.txt"
        proc = _start_loop(killed, out)
        wait_until(proc, lambda out=out, target=target: f"step {target}\n" in out.read_text())
        time.sleep(rng.uniform(0.0, 0.05))  # 0-50 ms: a few steps, sometimes inside a save
        kills.append(kill_9(proc))
        saved = lu.load_checkpoint(killed / "checkpoint.pt")  # whatever the moment, the checkpoint loads
        assert saved["step"] % 10 == 0 and saved["step"] >= target
        resumed_from = saved["step"]
        print(f"scheduler loop: killed after step {target}, resumed from step {saved['step']}")
    assert kills == [True] * 2, "the loop finished before it could be killed"
    proc = _start_loop(killed, tmp_path / "resumed.txt")
    assert proc.wait(timeout=300) == 0, (tmp_path / "resumed.txt").read_text()
    assert reference.wait(timeout=300) == 0, (tmp_path / "uninterrupted.txt").read_text()

    a, b = lu.load_checkpoint(killed / "final.pt"), lu.load_checkpoint(uninterrupted / "final.pt")
    for part in ("average", "model"):
        assert list(a[part]) == list(b[part])
        for name, t in b[part].items():
            assert a[part][name].dtype == t.dtype and torch.equal(a[part][name], t), (part, name)
    assert (a["lawa"]["count"], a["lawa"]["num_snapshots"]) == (LOOP_STEPS, (LOOP_STEPS - 14) // 7)
    assert not list(killed.glob(".checkpoint.pt.tmp*"))  # the killed savers' temporaries were cleaned up
