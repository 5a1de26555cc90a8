"""LawaScheduler across processes (gloo on CPU, a file:// store in the test's temp dir): shard=True under DDP
(averages equal the unsharded scheduler's, (k+1)/W × the model per rank, exact restore, resume) at W=2 and 3,
and FSDP2 (fully_shard: DTensor parameters; it runs on CPU with gloo in torch 2.14) with local-shard
averaging, swap without communication, DCP save/load and resharding from 3 ranks to 2."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lawa_scheduler import LawaScheduler
from lawa_tidy import LawaError

K = 3


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _held(lawa: LawaScheduler) -> list[torch.Tensor]:
    """Every tensor the scheduler keeps (this rank's part), read through its state_dict."""
    state = lawa.state_dict()
    tensors = [t for slot in state["ring"] for t in slot.values()] + list(state["sum"].values())
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


class _Net(nn.Module):
    """Odd sizes (uneven slices and shards), BatchNorm (float and integer buffers) and a tied pair of names."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(7, 13)
        self.bn = nn.BatchNorm1d(13)
        self.head = nn.Linear(13, 5)
        self.out = nn.Linear(5, 13, bias=False)
        self.back = nn.Linear(13, 5, bias=False)
        self.back.weight = self.head.weight  # tied: two names, one tensor

    def forward(self, x):
        return self.back(self.out(self.head(torch.tanh(self.bn(self.embed(x))))))


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(6, 7, generator=g), torch.randn(6, 5, generator=g)


def _train_step(model, optimizer, step: int) -> None:
    x, y = _batch(step)
    optimizer.zero_grad()
    F.mse_loss(model(x), y).backward()
    optimizer.step()


def _ddp_sharded(world: int) -> dict:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(_Net())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sharded = LawaScheduler(model, k=K, every_n_steps=2, shard=True)
    plain = LawaScheduler(model, k=K, every_n_steps=2)
    for step in range(9):  # the same batch on every rank: buffers agree too, so one reference serves all
        _train_step(model, optimizer, step)
        assert sharded.step() == plain.step()
    live = {n: t.clone() for n, t in model.module.state_dict().items()}
    at_swap = plain.averaged_state_dict()
    with sharded.swapped_in():  # an all_gather of the averaged slices
        inside = {n: t.clone() for n, t in model.module.state_dict().items()}
        assert model.module.back.weight is model.module.head.weight
    restored = {n: torch.equal(t, live[n]) for n, t in model.module.state_dict().items()}

    state = {key: value for key, value in sharded.state_dict().items()}
    state["ring"] = [{n: t.clone() for n, t in slot.items()} for slot in state["ring"]]
    state["sum"] = {n: t.clone() for n, t in state["sum"].items()}
    resumed = LawaScheduler(model, k=K, every_n_steps=2, shard=True)
    resumed.load_state_dict(state)
    for step in range(9, 13):
        _train_step(model, optimizer, step)
        sharded.step(), resumed.step(), plain.step()
    resumed_equal = all(
        torch.equal(a, b)
        for a, b in zip(sharded.averaged_state_dict().values(), resumed.averaged_state_dict().values(), strict=True)
    )
    return {
        "sharded": sharded.averaged_state_dict(), "plain": plain.averaged_state_dict(), "inside": inside,
        "at_swap": at_swap,        "restored": restored, "resumed_equal": resumed_equal,
        "held_bytes": _bytes(_held(sharded)), "plain_bytes": _bytes(_held(plain)),
    }


def _fsdp_net():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _fsdp(out_dir: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    model = _fsdp_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    lawa = LawaScheduler(model, k=K, every_n_steps=1)
    snapshots = []
    for step in range(5):
        _train_step(model, optimizer, 100 + step + dist.get_rank())  # each rank its own data, as FSDP trains
        lawa.step()
        snapshots.append({n: t.full_tensor() for n, t in model.state_dict().items()})
    averaged = lawa.averaged_state_dict()
    assert all(isinstance(t, DTensor) for t in averaged.values())
    local_live = {n: t.to_local().clone() for n, t in model.state_dict().items()}
    with lawa.swapped_in():
        swapped = all(torch.equal(t.to_local(), averaged[n].to_local()) for n, t in model.state_dict().items())
    restored = all(torch.equal(t.to_local(), local_live[n]) for n, t in model.state_dict().items())

    dcp.save({"lawa": lawa.state_dict()}, checkpoint_id=f"{out_dir}/dcp")
    fresh = LawaScheduler(model, k=K, every_n_steps=1)
    state = {"lawa": fresh.state_dict()}  # allocated for DTensors: a template to load into
    dcp.load(state, checkpoint_id=f"{out_dir}/dcp")
    fresh.load_state_dict(state["lawa"])
    loaded_equal = all(torch.equal(a.to_local(), b.to_local())
                       for a, b in zip(averaged.values(), fresh.averaged_state_dict().values(), strict=True))
    for step in range(5, 7):
        _train_step(model, optimizer, 100 + step + dist.get_rank())
        lawa.step(), fresh.step()
    resumed_equal = all(torch.equal(a.to_local(), b.to_local())
                        for a, b in zip(lawa.averaged_state_dict().values(), fresh.averaged_state_dict().values(),
                                        strict=True))
    return {
        "full_average": {n: t.full_tensor() for n, t in averaged.items()},
        "posthoc": {n: torch.stack([s[n] for s in snapshots[-K:]]).mean(0) for n in snapshots[-1]},
        "swapped": swapped, "restored": restored, "loaded_equal": loaded_equal, "resumed_equal": resumed_equal,
        "held_bytes": _bytes(_held(lawa)),
        "local_model_bytes": _bytes(t.to_local() for t in model.state_dict().values()),
    }


def _reshard(out_dir: str) -> dict:
    import torch.distributed.checkpoint as dcp

    model = _fsdp_net()
    lawa = LawaScheduler(model, k=K, every_n_steps=1)
    state = {"lawa": lawa.state_dict()}
    dcp.load(state, checkpoint_id=f"{out_dir}/dcp")
    lawa.load_state_dict(state["lawa"])
    return {"full_average": {n: t.full_tensor() for n, t in lawa.averaged_state_dict().items()}}


def _worker(rank: int, world: int, init_file: str, out_dir: str, jobs: tuple[str, ...]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        run = {"ddp": lambda: _ddp_sharded(world), "fsdp": lambda: _fsdp(out_dir),
               "reshard": lambda: _reshard(out_dir)}
        torch.save({job: run[job]() for job in jobs}, f"{out_dir}/{'-'.join(jobs)}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, world: int, jobs: tuple[str, ...]) -> list[dict]:
    store = tmp_path / f"store-{'-'.join(jobs)}"
    ctx = mp.start_processes(_worker, args=(world, str(store), str(tmp_path), jobs), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-process run did not finish within 120 s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"{'-'.join(jobs)}-rank{r}.pt", weights_only=True) for r in range(world)]


def _check_sharded(ranks: list[dict], world: int) -> None:
    for result in ranks:
        r = result["ddp"]
        for name, t in r["plain"].items():
            assert torch.equal(r["sharded"][name], ranks[0]["ddp"]["sharded"][name]), name  # one answer on all
            if t.is_floating_point():  # the exact recount visits other chunks when sliced: equal up to rounding
                torch.testing.assert_close(r["sharded"][name], t, rtol=1e-6, atol=1e-7, msg=name)
                torch.testing.assert_close(r["inside"][name], r["at_swap"][name], rtol=1e-6, atol=1e-7, msg=name)
            else:
                assert torch.equal(r["sharded"][name], t), name
        assert all(r["restored"].values()) and r["resumed_equal"]
    # (k+1)/W × the model per rank: the ranks' slices add up to the unsharded scheduler's bytes exactly, and
    # each rank holds its 1/W, give or take one element per tensor per slot.
    full = ranks[0]["ddp"]["plain_bytes"]
    assert sum(result["ddp"]["held_bytes"] for result in ranks) == full
    model_bytes = full / (K + 1)
    tensors = len(ranks[0]["ddp"]["plain"]) - 1  # one name is an alias: stored once
    for result in ranks:
        assert abs(result["ddp"]["held_bytes"] - (K + 1) * model_bytes / world) <= (K + 1) * tensors * 8


def test_sharded_ddp_on_three_and_two_ranks_fsdp2_and_dcp_reshard_from_three_to_two(tmp_path):
    three = _spawn(tmp_path, 3, ("ddp", "fsdp"))
    _check_sharded(three, 3)
    for result in three:
        f = result["fsdp"]
        assert f["swapped"] and f["restored"] and f["loaded_equal"] and f["resumed_equal"]
        for name, t in f["posthoc"].items():
            torch.testing.assert_close(f["full_average"][name], t, rtol=1e-6, atol=1e-7, msg=name)
        assert f["held_bytes"] == (K + 1) * f["local_model_bytes"]  # the local shards only, no gathered copy
    assert sum(result["fsdp"]["local_model_bytes"] for result in three) == _bytes(three[0]["fsdp"]["posthoc"].values())

    two = _spawn(tmp_path, 2, ("ddp", "reshard"))
    _check_sharded(two, 2)
    # DCP reshards: the state saved on 3 ranks loads on 2 and gives the same average, bit for bit.
    for name, t in three[0]["fsdp"]["full_average"].items():
        assert torch.equal(two[0]["reshard"]["full_average"][name], t), name


def test_shard_needs_an_initialized_process_group():
    with pytest.raises(LawaError, match="shard=True\\) needs torch.distributed initialized"):
        LawaScheduler(nn.Linear(2, 2), k=2, shard=True)
