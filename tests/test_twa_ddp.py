"""TWA over two gloo processes on CPU equals TWA in one process: the row blocks of P stack to P, the
all-reduced projection is Pᵀ(P g), and a few DDP training steps land on the same weights.

The processes rendezvous through a file in the test's temporary directory and talk over the loopback
interface only; collectives time out after 60 s and the test kills its workers after TIMEOUT.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # lawa_twa is a top-level module beside lawa_utils

import lawa_twa as twa  # noqa: E402

WORLD = 2
TIMEOUT = 180  # seconds for both workers together, rendezvous included
EPOCHS = [1, 2, 3, 4, 5]  # rank 0 holds rows 1-2, rank 1 rows 3-5; checkpoint 4 repeats checkpoint 1
STEPS, BATCH, LR, MOMENTUM, WD = 3, 8, 0.5, 0.9, 1e-3


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))


def write_trajectory(tmp: Path) -> dict[int, Path]:
    model, paths = net(), {}
    for e in EPOCHS:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        state = model.state_dict() if e != 4 else torch.load(paths[1], weights_only=True)["state_dict"]
        paths[e] = tmp / f"checkpoint{e}.pt"
        torch.save({"epoch": e, "arch": "mlp", "state_dict": state}, paths[e])
    return paths


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def run_twa(tmp: Path, rank: int = 0, world: int = 1) -> dict:
    """Build the subspace, project a fixed vector, train STEPS steps; each process sees its share of a batch."""
    paths = {e: tmp / f"checkpoint{e}.pt" for e in EPOCHS}
    model = net()
    sub = twa.build_subspace(model, paths, EPOCHS, distributed=world > 1)
    projector = twa.TWAProjector(sub.basis, sub.names, weight_decay=WD, distributed=world > 1)
    vector = torch.randn(sub.basis.shape[1], generator=torch.Generator().manual_seed(7))
    projected = projector.project(vector)
    model.load_state_dict(sub.start_state("mean"))
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    share = BATCH // world
    for step in range(STEPS):
        x, y = data(step)
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        optimizer.zero_grad()
        F.cross_entropy(trained(x), y).backward()  # DDP averages the gradient over the processes
        projector.project_(trained)
        optimizer.step()
    params = twa.flatten_params({n: p.detach() for n, p in model.named_parameters()}, sub.names)
    return {"basis": sub.basis, "dim": sub.dim, "dropped": sub.dropped, "mean": sub.mean,
            "projected": projected, "params": params}


def worker(rank: int, world: int, tmp: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(run_twa(Path(tmp), rank, world), Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    write_trajectory(tmp_path)
    context = mp.start_processes(worker, args=(WORLD, str(tmp_path)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} TWA workers did not finish within {TIMEOUT} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = run_twa(tmp_path)

    # the blocks: rank 1 dropped checkpoint 4, a copy of checkpoint 1 that rank 0 holds
    assert [len(r["basis"]) for r in ranks] == [2, 2] and len(single["basis"]) == 4
    assert all(r["dim"] == 4 and r["dropped"] == [4] for r in ranks) and single["dropped"] == [4]
    stacked = torch.cat([r["basis"] for r in ranks])
    assert (stacked - single["basis"]).abs().max() < 1e-6
    assert ((stacked.double() @ stacked.double().T) - torch.eye(4, dtype=torch.float64)).abs().max() < 1e-6
    for r in ranks:
        assert torch.equal(r["mean"], ranks[0]["mean"]) and torch.allclose(r["mean"], single["mean"], atol=1e-7)
        # the all-reduce of the block projections is the one-process projection Pᵀ(P g), on every rank
        assert torch.equal(r["projected"], ranks[0]["projected"])
        assert (r["projected"] - single["projected"]).abs().max() < 1e-5
        # and training: DDP keeps the replicas equal, and they equal one process on the whole batch
        assert torch.equal(r["params"], ranks[0]["params"])
        assert (r["params"] - single["params"]).abs().max() < 1e-5
    assert (single["params"] - single["mean"]).norm() > 1e-2  # the steps did move the weights
