"""lawa_io.average_checkpoints on 2 ranks (gloo on 127.0.0.1, a free port): each rank averages its share of a DCP
trajectory's tensors straight from the files, rank 0 publishes one DCP output, equal to the 1-rank one; a layout
mismatch between ranks or a bad tensor on one rank fails on every rank and publishes nothing.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lawa_io

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds; a hung rendezvous must fail the test, not the CI run

WORKER = """
import datetime, json, os, sys
import torch, torch.distributed as dist
import lawa_io
from lawa_tidy import LawaError
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
root = sys.argv[1]
run = [os.path.join(root, f"step-{s}") for s in range(3)]
results = {}
def attempt(name, paths, out):
    try:
        report = lawa_io.average_checkpoints([lawa_io.open_checkpoint(p) for p in paths], None, out)
        results[name] = {"ok": True, "bytes_written": report["bytes_written"], "world": report["world"]}
    except LawaError as exc:
        results[name] = {"ok": False, "error": str(exc)}
attempt("good", run, os.path.join(root, "avg-2ranks"))
# rank 1 is given another trajectory (one checkpoint fewer): the ranks must notice before writing anything
attempt("mismatch", run if rank == 0 else run[1:], os.path.join(root, "avg-mismatch"))
attempt("nan", [*run, os.path.join(root, "nan")], os.path.join(root, "avg-nan"))
dist.destroy_process_group()
# The group must really be gone: gloo threads that outlive it can abort the interpreter's exit (exit -6)
results["threads"] = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(json.dumps(results), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state(seed):
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(64, 32 + 8 * i, generator=g) for i in range(6)} | {
        "layer0.bias": torch.randn(64, generator=g).bfloat16(), "step": torch.tensor(seed)}


def test_dcp_average_on_two_ranks_equals_one_rank_and_fails_closed(tmp_path):
    import torch.distributed.checkpoint as dcp

    for s in range(3):
        dcp.save({"model": state(s), "optimizer": {"lr": torch.tensor(0.1)}}, checkpoint_id=str(tmp_path / f"step-{s}"))
    bad = state(3)
    bad["layer5.weight"][0, 0] = float("inf")
    dcp.save({"model": bad}, checkpoint_id=str(tmp_path / "nan"))
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], cwd=REPO, env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for r in range(2)]
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail("the 2-rank average timed out")
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    # one rank: the same call without a process group
    readers = [lawa_io.open_checkpoint(tmp_path / f"step-{s}") for s in range(3)]
    one = lawa_io.average_checkpoints(readers, None, tmp_path / "avg-1rank")
    expected = lawa_io.open_checkpoint(tmp_path / "avg-1rank").state()
    got = lawa_io.open_checkpoint(tmp_path / "avg-2ranks").state()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype for k in expected)
    # each rank wrote its share: about half of the model each, all of it together
    shares = [o["good"]["bytes_written"] for o in outputs]
    assert all(o["good"]["ok"] and o["good"]["world"] == 2 for o in outputs)
    assert sum(shares) == one["bytes_written"] and max(shares) <= 0.6 * one["bytes_written"]
    assert sorted(p.name for p in (tmp_path / "avg-2ranks").iterdir() if p.suffix == ".distcp") == [
        "__0_0.distcp", "__1_0.distcp"]
    for case, message in (("mismatch", "ranks disagree"), ("nan", "has NaN/Inf values")):
        assert all(not o[case]["ok"] and message in o[case]["error"] for o in outputs), (case, outputs)
        assert not (tmp_path / f"avg-{case}").exists()
    assert not [p.name for p in tmp_path.iterdir() if ".part" in p.name]
    # DCP, imported after init_process_group, must not pin the group (lawa_io imports torch.distributed.nn first)
    assert all(not [t for t in o["threads"] if "gloo" in t] for o in outputs), [o["threads"] for o in outputs]


def test_the_average_command_under_torchrun_averages_a_dcp_run_on_two_ranks_like_one_process(tmp_path):
    import torch.distributed.checkpoint as dcp

    run = tmp_path / "run"
    for s in (10, 20, 30):
        dcp.save({"model": state(s), "optimizer": {"lr": torch.tensor(0.1)}}, checkpoint_id=str(run / f"step-{s}"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(free_port())]
    command = ["-m", "lawa_utils", "average", "--dir", str(run), "--k", "3"]
    two = subprocess.run([*torchrun, *command, "--out", str(tmp_path / "avg2")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("averaged 3 checkpoints") == 1  # rank 0 speaks for the job
    one = subprocess.run([sys.executable, *command, "--out", str(tmp_path / "avg1")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    expected = lawa_io.open_checkpoint(tmp_path / "avg1").state()
    got = lawa_io.open_checkpoint(tmp_path / "avg2").state()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert sorted(p.name for p in (tmp_path / "avg2").iterdir() if p.suffix == ".distcp") == [
        "__0_0.distcp", "__1_0.distcp"]


def _rank_pids(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started (read from their environments)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != torchrun_pid:
                continue
            env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
        except (OSError, IndexError, ValueError):
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(entry.name)
    return ranks


def test_a_rank_killed_mid_write_publishes_nothing_and_a_rerun_succeeds(tmp_path):
    """kill -9 of rank 1 once the DCP output's temporary directory exists: torchrun fails, no output is published,
    and the same command run again cleans the dead job's temporary and equals the 1-process average."""
    import time

    import torch.distributed.checkpoint as dcp

    run = tmp_path / "run"
    for s in (10, 20, 30):
        g = torch.Generator().manual_seed(s)
        model = {f"block{i}.weight": torch.randn(1024, 2048, generator=g) for i in range(8)}
        dcp.save({"model": model}, checkpoint_id=str(run / f"step-{s}"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    command = ["-m", "lawa_utils", "average", "--dir", str(run), "--k", "3", "--out"]
    out = tmp_path / "avg2"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(free_port())]
    proc = subprocess.Popen([*torchrun, *command, str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    killed, deadline = False, time.monotonic() + TIMEOUT
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith(".avg2.part") for p in tmp_path.iterdir()):
                ranks = _rank_pids(proc.pid)
                if 1 in ranks:
                    os.kill(ranks[1], signal.SIGKILL)
                    killed = True
                    break
            time.sleep(0.002)
        proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert killed, "the job ended before its output's temporary appeared"
    assert proc.returncode != 0 and not out.exists()
    again = subprocess.run([*torchrun[:-1], str(free_port()), *command, str(out)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr[-3000:]
    one = subprocess.run([sys.executable, *command, str(tmp_path / "avg1")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    expected = lawa_io.open_checkpoint(tmp_path / "avg1").state()
    got = lawa_io.open_checkpoint(out).state()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert not [p.name for p in tmp_path.iterdir() if ".part" in p.name]
