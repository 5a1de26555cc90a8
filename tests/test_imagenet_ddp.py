"""imagenet/main.py under DistributedDataParallel on CPU: two gloo processes on 127.0.0.1, a few iterations.

Rank 0 alone writes checkpoints and logs, every rank ends with identical weights, torchrun and
--multiprocessing-distributed train the same model, and the checkpoint resumes in a single process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lawa_utils

REPO = Path(__file__).resolve().parents[1]
IMAGENET = REPO / "imagenet"
# 128 images, 32 per step over two processes: 4 iterations an epoch.
TRAIN = ["fashion-mnist", "-a", "mobilenet_v3_small", "--image-size", "16", "--train-subset", "128",
         "--val-subset", "64", "-b", "32", "--lr", "0.05", "-j", "0", "-p", "100", "--epochs", "1"]
TIMEOUT = 240  # seconds; a hung rendezvous must fail the test, not the CI run

# torchrun runs this in each process: train through main.main, then save what this rank holds.
WRAPPER = """
import os, sys
import torch
sys.path.insert(0, {imagenet!r})
import main
model = main.main(sys.argv[1:])
torch.save(model.state_dict(), os.path.join({out!r}, "rank" + os.environ["RANK"] + ".pt"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bounded(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group and kill the whole group if it outlives TIMEOUT."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}  # loopback only
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {TIMEOUT} s: {' '.join(cmd)}\n{out[-2000:]}\n{err[-2000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("ddp")
    wrapper = tmp / "train_and_dump.py"
    wrapper.write_text(WRAPPER.format(imagenet=str(IMAGENET), out=str(tmp)))
    save_dir = tmp / "run"
    proc = run_bounded([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(wrapper),
                        *TRAIN, "--save-dir", str(save_dir)])
    return tmp, save_dir, proc


def test_rank_0_alone_writes_checkpoints_and_logs(torchrun_run):
    _, save_dir, proc = torchrun_run
    assert sorted(p.name for p in save_dir.iterdir()) == ["args.json", "checkpoint1.pt", "log.csv"]
    log = lawa_utils.read_results(save_dir / "log.csv")
    assert len(log) == 6 and not log.duplicated(["epoch", "split", "metric"]).any()
    assert json.loads((save_dir / "args.json").read_text())["world_size"] == 2
    assert proc.stdout.count(" * Epoch 1/1") == 1  # only rank 0 prints


def test_all_ranks_hold_identical_weights(torchrun_run):
    tmp, save_dir, _ = torchrun_run
    rank0, rank1 = (torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    saved = torch.load(save_dir / "checkpoint1.pt", weights_only=True)["state_dict"]
    assert rank0.keys() == rank1.keys() == saved.keys()
    for key in rank0:  # parameters and BatchNorm buffers alike
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.equal(rank0[key], saved[key]), key


def test_multiprocessing_distributed_trains_the_same_model_as_torchrun(torchrun_run, tmp_path):
    _, torchrun_dir, _ = torchrun_run
    run_bounded([sys.executable, str(IMAGENET / "main.py"), *TRAIN, "--save-dir", str(tmp_path),
                 "--multiprocessing-distributed", "--nproc-per-node", "2", "--world-size", "1", "--rank", "0",
                 "--dist-url", f"tcp://127.0.0.1:{free_port()}"])
    spawned = torch.load(tmp_path / "checkpoint1.pt", weights_only=True)["state_dict"]
    launched = torch.load(torchrun_dir / "checkpoint1.pt", weights_only=True)["state_dict"]
    for key, value in launched.items():
        assert torch.equal(spawned[key], value), key


def test_a_ddp_checkpoint_resumes_in_a_single_process(torchrun_run, tmp_path):
    _, save_dir, _ = torchrun_run
    for name in ("checkpoint1.pt", "args.json", "log.csv"):
        (tmp_path / name).write_bytes((save_dir / name).read_bytes())
    train = [a if a != "1" or TRAIN[i - 1] != "--epochs" else "2" for i, a in enumerate(TRAIN)]
    run_bounded([sys.executable, str(IMAGENET / "main.py"), *train, "--save-dir", str(tmp_path),
                 "--resume", str(tmp_path / "checkpoint1.pt")])
    assert (tmp_path / "checkpoint2.pt").is_file()
    log = lawa_utils.read_results(tmp_path / "log.csv")
    assert sorted(set(log["epoch"])) == [1, 2] and len(log) == 12
