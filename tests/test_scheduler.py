"""Tests for lawa_scheduler.LawaScheduler: closed forms on hand-set tensors, agreement with the post-hoc
lawa_utils.average_state_dicts, resume, the swap context, and a real 2-process DDP run on gloo/CPU."""

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode

from lawa_scheduler import LawaScheduler
from lawa_tidy import LawaError
from lawa_utils import average_state_dicts, recompute_bn

# ---------------------------------------------------------------------------------------------------
# models, batches and comparisons
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on 2 shared cores two threads per process oversubscribe (the post-hoc test ran
    6x slower under load), and the DDP test's single-process reference must match its workers' threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _set_bn(bn: nn.BatchNorm1d, value: float, batches: int) -> None:
    """Give every tensor of a BatchNorm1d a hand-chosen value, as if training had put it there."""
    with torch.no_grad():
        bn.weight.fill_(value)
        bn.bias.fill_(-value)
        bn.running_mean.fill_(10 * value)
        bn.running_var.fill_(value * value)
        bn.num_batches_tracked.fill_(batches)


def _resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


def _batch(step: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The same 3×32×32 batch for the same step, in every process and every run."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    plain = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {name: t.clone() for name, t in plain.state_dict().items()}


def _train(model: nn.Module, optimizer, lawa: LawaScheduler, steps: range) -> list[dict[str, torch.Tensor]]:
    """SGD on fixed synthetic batches, calling lawa.step() after every optimizer step; returns the snapshots
    the scheduler should have taken (the model's state right after each step where it says it did)."""
    snapshots = []
    model.train()
    for step in steps:
        x, y = _batch(step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if lawa.step():
            snapshots.append(_plain_state(model))
    return snapshots


def _assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def _assert_matches_posthoc(online: dict[str, torch.Tensor], snapshots: list[dict[str, torch.Tensor]]):
    posthoc = average_state_dicts(snapshots)
    assert list(online) == list(posthoc)
    for name, t in posthoc.items():
        if t.is_floating_point():
            torch.testing.assert_close(online[name], t, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(online[name], t), name


# ---------------------------------------------------------------------------------------------------
# closed forms on hand-set tensors
# ---------------------------------------------------------------------------------------------------


def test_per_epoch_average_is_the_mean_of_the_k_latest_closed_form():
    bn = nn.BatchNorm1d(2)
    lawa = LawaScheduler(bn, k=3)
    expected_weight = {1: 1.0, 2: 1.5, 3: 2.0, 4: 3.0, 5: 4.0}  # epochs E−2 … E once three exist
    for epoch in range(1, 6):
        _set_bn(bn, float(epoch), batches=100 * epoch)
        assert lawa.update() is True
        avg = lawa.averaged_state_dict()
        assert lawa.num_averaged == min(epoch, 3)
        assert torch.equal(avg["weight"], torch.full((2,), expected_weight[epoch]))
        assert torch.equal(avg["bias"], torch.full((2,), -expected_weight[epoch]))
    window = [3.0, 4.0, 5.0]
    assert torch.allclose(avg["running_mean"], torch.full((2,), 10 * sum(window) / 3))
    assert torch.allclose(avg["running_var"], torch.full((2,), sum(v * v for v in window) / 3))


def test_integer_buffers_come_from_the_newest_snapshot_and_are_never_divided():
    bn = nn.BatchNorm1d(2)
    lawa = LawaScheduler(bn, k=3)
    for epoch, batches in enumerate([1, 2, 4, 7], start=1):
        _set_bn(bn, float(epoch), batches)
        lawa.update()
    for _ in range(2):  # asking twice gives the same answer: nothing was divided in place
        tracked = lawa.averaged_state_dict()["num_batches_tracked"]
        assert tracked.dtype == torch.long
        assert tracked.item() == 7  # the newest, not (2 + 4 + 7) // 3
    assert sorted(slot["num_batches_tracked"].item() for slot in lawa.state_dict()["ring"]) == [2, 4, 7]


def test_step_mode_snapshots_multiples_of_n_from_start():
    lin = nn.Linear(1, 1, bias=False)
    lawa = LawaScheduler(lin, k=2, every_n_steps=3, start=5)
    taken = []
    for step in range(1, 14):
        with torch.no_grad():
            lin.weight.fill_(step)
        if step == 5:
            with pytest.raises(LawaError, match="no snapshot yet.*step 6"):
                lawa.averaged_state_dict()
        if lawa.step():
            taken.append(step)
    assert taken == [6, 9, 12]
    assert lawa.num_snapshots == 3
    assert lawa.averaged_state_dict()["weight"].item() == (9 + 12) / 2


def test_per_epoch_mode_start_skips_early_epochs():
    lin = nn.Linear(1, 1, bias=False)
    lawa = LawaScheduler(lin, k=10, start=3)
    for epoch in range(1, 6):
        with torch.no_grad():
            lin.weight.fill_(epoch)
        assert lawa.update() is (epoch >= 3)
    assert lawa.num_averaged == 3
    assert lawa.averaged_state_dict()["weight"].item() == (3 + 4 + 5) / 3


def test_wrong_mode_calls_are_refused():
    with pytest.raises(RuntimeError, match="update\\(\\)"):
        LawaScheduler(nn.Linear(1, 1), k=2).step()
    with pytest.raises(RuntimeError, match="step\\(\\)"):
        LawaScheduler(nn.Linear(1, 1), k=2, every_n_steps=4).update()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"k": 0},
        {"k": -1},
        {"k": 2.5},
        {"k": True},
        {"k": "3"},
        {"k": 2, "every_n_steps": 0},
        {"k": 2, "every_n_steps": 1.5},
        {"k": 2, "start": -1},
    ],
)
def test_bad_settings_raise_lawa_error(kwargs):
    name = [key for key in kwargs if key != "k"] or ["k"]
    with pytest.raises(LawaError, match=f"{name[0]} must be an integer"):
        LawaScheduler(nn.Linear(1, 1), **kwargs)


def test_asking_for_an_average_before_any_snapshot_raises_lawa_error():
    lawa = LawaScheduler(nn.BatchNorm1d(2), k=3, start=2)
    lawa.update()  # epoch 1 < start: no snapshot
    for ask in (lawa.averaged_state_dict, lawa.averaged_model, lambda: lawa.swapped_in().__enter__()):
        with pytest.raises(LawaError, match="no snapshot yet.*epoch 2"):
            ask()


def test_instances_do_not_share_state():
    a_model, b_model = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    a, b = LawaScheduler(a_model, k=2), LawaScheduler(b_model, k=2)
    with torch.no_grad():
        a_model.weight.fill_(1.0)
        b_model.weight.fill_(5.0)
    a.update()
    with pytest.raises(LawaError):
        b.averaged_state_dict()
    b.update()
    assert a.averaged_state_dict()["weight"].item() == 1.0
    assert b.averaged_state_dict()["weight"].item() == 5.0


def test_wrapped_models_give_plain_names():
    model = _resnet()
    plain_names = list(model.state_dict())
    for wrapped in (nn.DataParallel(model), torch.compile(model), torch.compile(nn.DataParallel(model))):
        assert list(wrapped.state_dict()) != plain_names  # the wrappers do add prefixes
        lawa = LawaScheduler(wrapped, k=2)
        lawa.update()
        averaged = lawa.averaged_state_dict()
        assert list(averaged) == plain_names
        torchvision.models.resnet18(num_classes=10).load_state_dict(averaged)  # strict


# ---------------------------------------------------------------------------------------------------
# agreement with the post-hoc average, drift, cost
# ---------------------------------------------------------------------------------------------------


def test_online_average_equals_posthoc_average_of_the_k_latest_snapshots():
    model = _resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    k = 3
    lawa = LawaScheduler(model, k=k, every_n_steps=2, start=3)
    snapshots = []
    for end in range(2, 18, 2):  # check during the fill, at the wrap and past resets of the running sum
        snapshots += _train(model, optimizer, lawa, range(end - 2, end))
        if snapshots:
            _assert_matches_posthoc(lawa.averaged_state_dict(), snapshots[-k:])
    assert lawa.num_snapshots == len(snapshots) == 7  # steps 4, 6, …, 16


def test_channels_last_model_averages_and_resumes_like_a_contiguous_one():
    """A model converted to channels_last (non-contiguous conv weights) gives the same averages, also after a
    resume from a saved state whose tensors are channels_last too."""
    model = _resnet().to(memory_format=torch.channels_last)
    assert not model.conv1.weight.is_contiguous()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lawa = LawaScheduler(model, k=3, every_n_steps=1)
    snapshots = _train(model, optimizer, lawa, range(4))
    _assert_matches_posthoc(lawa.averaged_state_dict(), snapshots[-3:])
    state = lawa.state_dict()
    state["sum"] = {name: t.to(memory_format=torch.channels_last) if t.dim() == 4 else t
                    for name, t in state["sum"].items()}
    resumed = LawaScheduler(model, k=3, every_n_steps=1)
    resumed.load_state_dict(state)
    snapshots += _train(model, optimizer, resumed, range(4, 6))
    _assert_matches_posthoc(resumed.averaged_state_dict(), snapshots[-3:])
    with resumed.swapped_in():
        _assert_states_equal(_plain_state(model), resumed.averaged_state_dict())


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_element_tensors_are_carried_along():
    lin = nn.Linear(0, 3)  # weight (3, 0): empty, as a pruned or placeholder layer can be
    lawa = LawaScheduler(lin, k=2)
    for value in (1.0, 2.0, 4.0):
        with torch.no_grad():
            lin.bias.fill_(value)
        lawa.update()
    averaged = lawa.averaged_state_dict()
    assert averaged["weight"].shape == (3, 0)
    assert torch.equal(averaged["bias"], torch.full((3,), 3.0))


def test_running_sum_does_not_drift_over_many_updates():
    # A large common offset makes every `sum += new − evicted` round (ulp(5000) ≈ 5e-4). Without the exact
    # re-summation every k snapshots the error random-walks upwards: a plain running sum fed these values
    # passes 1e-6 relative within ~500 updates (measured 2.6e-6 at 500, 5.7e-6 at 2000); ours stays ≈3e-7.
    k, n_updates = 5, 2000
    lin = nn.Linear(256, 1, bias=False)
    lawa = LawaScheduler(lin, k=k)
    g = torch.Generator().manual_seed(0)
    history, worst = [], 0.0
    for _ in range(n_updates):
        value = 1000.0 + torch.randn(1, 256, generator=g)
        with torch.no_grad():
            lin.weight.copy_(value)
        lawa.update()
        history = (history + [value])[-k:]
        exact = torch.stack(history).double().mean(0)
        err = ((lawa.averaged_state_dict()["weight"].double() - exact).abs() / exact.abs()).max().item()
        worst = max(worst, err)
    assert worst <= 1e-6, worst
    _assert_matches_posthoc(lawa.averaged_state_dict(), [{"weight": w} for w in history])


class _CountTorchCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_update_cost_does_not_grow_with_k():
    """Each snapshot does the same tensor work whatever k is (copy, add, subtract, and one reduction that
    recounts 1/k of each sum from the k slots): no pass over the whole ring."""
    calls_per_k = {}
    for k in (2, 32):
        bn = nn.BatchNorm1d(8)
        lawa = LawaScheduler(bn, k=k)
        for _ in range(64):  # fill and wrap the ring
            lawa.update()
        per_update = []
        for _ in range(32):  # updates 65 … 96: mid-window ones and ones that replace the running sum
            with _CountTorchCalls() as counter:
                lawa.update()
            per_update.append(counter.calls)
        calls_per_k[k] = max(per_update)
    assert calls_per_k[2] == calls_per_k[32]


# ---------------------------------------------------------------------------------------------------
# the averaged model and the swap context
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """A resnet18 after 8 SGD steps with a k=3 scheduler snapshotting every 2 steps."""
    model = _resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lawa = LawaScheduler(model, k=3, every_n_steps=2)
    _train(model, optimizer, lawa, range(8))
    return model, lawa


def test_swapped_in_loads_the_average_and_restores_the_live_weights_exactly(trained):
    model, lawa = trained
    live = _plain_state(model)
    params = list(model.parameters())
    with lawa.swapped_in():
        _assert_states_equal(_plain_state(model), lawa.averaged_state_dict())
        recompute_bn(model, [_batch(100)[0]])  # evaluation-time work on the live model must leave no trace
        with torch.no_grad():
            model.eval()(_batch(101)[0])
        with pytest.raises(RuntimeError, match="swapped"):
            lawa.step()
    model.train()
    _assert_states_equal(_plain_state(model), live)
    assert all(p is q for p, q in zip(model.parameters(), params, strict=True))  # the optimizer's tensors


def test_swapped_in_restores_the_live_weights_when_the_block_raises(trained):
    model, lawa = trained
    live = _plain_state(model)
    with pytest.raises(KeyError), lawa.swapped_in():
        with torch.no_grad():
            next(model.parameters()).mul_(3.0)
        raise KeyError("evaluation failed")
    _assert_states_equal(_plain_state(model), live)
    with lawa.swapped_in():  # and the scheduler is usable again
        pass


def test_averaged_model_is_a_separate_copy_that_recompute_bn_can_refresh(trained):
    model, lawa = trained
    live = _plain_state(model)
    averaged = lawa.averaged_model()
    assert averaged is not model
    _assert_states_equal(_plain_state(averaged), lawa.averaged_state_dict())
    before = averaged.bn1.running_mean.clone()
    recompute_bn(averaged, [_batch(200)[0], _batch(201)[0]])
    assert not torch.equal(averaged.bn1.running_mean, before)
    assert averaged.bn1.num_batches_tracked.item() == 2
    _assert_states_equal(_plain_state(model), live)


# ---------------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------------


def _fresh_run(seed: int):
    model = _resnet(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return model, optimizer, LawaScheduler(model, k=3, every_n_steps=2, start=3)


def test_killed_and_resumed_run_gives_bit_identical_averages(tmp_path):
    steps, kill_after = 14, 11  # snapshots at 4, 6, …, 14; killed mid-interval, ring wrapped, n % k ≠ 0
    reference_model, reference_optimizer, reference = _fresh_run(seed=0)
    _train(reference_model, reference_optimizer, reference, range(steps))

    model, optimizer, lawa = _fresh_run(seed=0)
    _train(model, optimizer, lawa, range(kill_after))
    path = tmp_path / "checkpoint.pt"
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lawa": lawa.state_dict()}
    torch.save(state, path)
    del model, optimizer, lawa, state  # the process dies here

    model, optimizer, lawa = _fresh_run(seed=1)  # a different init: everything must come from the file
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    lawa.load_state_dict(saved["lawa"])
    _train(model, optimizer, lawa, range(kill_after, steps))

    _assert_states_equal(_plain_state(model), _plain_state(reference_model))  # training itself matched
    _assert_states_equal(lawa.averaged_state_dict(), reference.averaged_state_dict())
    resumed_state, reference_state = lawa.state_dict(), reference.state_dict()
    for key in ("count", "num_snapshots"):
        assert resumed_state[key] == reference_state[key]
    for a, b in zip(resumed_state["ring"], reference_state["ring"], strict=True):
        _assert_states_equal(a, b)
    _assert_states_equal(resumed_state["sum"], reference_state["sum"])


def test_load_state_dict_refuses_other_settings_and_other_models():
    bn = nn.BatchNorm1d(2)
    lawa = LawaScheduler(bn, k=3)
    lawa.update()
    state = lawa.state_dict()
    with pytest.raises(LawaError, match="k=3 but this scheduler has k=4"):
        LawaScheduler(bn, k=4).load_state_dict(state)
    with pytest.raises(LawaError, match="every_n_steps"):
        LawaScheduler(bn, k=3, every_n_steps=5).load_state_dict(state)
    with pytest.raises(LawaError, match="weight is \\(2,\\).*model's is \\(3,\\)"):
        LawaScheduler(nn.BatchNorm1d(3), k=3).load_state_dict(state)
    with pytest.raises(LawaError, match="tensor names differ"):
        LawaScheduler(nn.Linear(2, 2), k=3).load_state_dict(state)
    with pytest.raises(LawaError, match="not a LawaScheduler state"):
        LawaScheduler(bn, k=3).load_state_dict(bn.state_dict())
    with pytest.raises(LawaError, match="state version 2"):
        LawaScheduler(bn, k=3).load_state_dict({**state, "version": 2})


# ---------------------------------------------------------------------------------------------------
# which tensors: the params filter and tied names
# ---------------------------------------------------------------------------------------------------


def _held_bytes(lawa: LawaScheduler) -> int:
    state = lawa.state_dict()
    return sum(t.numel() * t.element_size() for slot in state["ring"] for t in slot.values()) + sum(
        t.numel() * t.element_size() for t in state["sum"].values())


class _Tied(nn.Module):
    """Input and output embeddings sharing one weight, as GPT-2's wte and lm_head do."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 4)
        self.mid = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 11, bias=False)
        self.lm_head.weight = self.wte.weight


def _move(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.fill_(value + i)


def test_trainable_filter_keeps_only_trainable_parameters_and_buffers():
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    model[0].requires_grad_(False)  # a frozen base
    lawa = LawaScheduler(model, k=2, params="trainable")
    frozen = model[0].weight.clone()
    for value in (1.0, 2.0, 4.0):
        with torch.no_grad():
            for p in (*model[1].parameters(), *model[2].parameters()):
                p.fill_(value)
            model[1].running_mean.fill_(10 * value)
        lawa.update()
    averaged = lawa.averaged_state_dict()
    assert sorted(averaged) == sorted(n for n in model.state_dict() if not n.startswith("0."))
    assert torch.equal(averaged["2.weight"], torch.full((2, 5), 3.0))
    assert torch.equal(averaged["1.running_mean"], torch.full((5,), 30.0))
    kept = {n: t.numel() * t.element_size() for n, t in model.state_dict().items() if not n.startswith("0.")}
    # (k+1) x the kept float tensors, k x the integer counter (no sum), nothing for the frozen layer
    assert _held_bytes(lawa) == 3 * sum(kept.values()) - kept["1.num_batches_tracked"]
    with lawa.swapped_in():
        assert torch.equal(model[2].weight, torch.full((2, 5), 3.0))
        assert torch.equal(model[0].weight, frozen)
    assert torch.equal(model[2].weight, torch.full((2, 5), 4.0))
    model.load_state_dict(averaged, strict=False)  # what the docstring promises for filtered states


def test_predicate_filter_gets_the_parameters_themselves():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    seen = {}

    def only_biases(name, tensor):
        seen[name] = isinstance(tensor, nn.Parameter)
        return name.endswith("bias")

    lawa = LawaScheduler(model, k=2, params=only_biases)
    lawa.update()
    assert sorted(lawa.averaged_state_dict()) == ["0.bias", "1.bias"]
    assert seen and all(seen.values())
    with pytest.raises(LawaError, match="params must be"):
        LawaScheduler(model, k=2, params="frozen")


def test_tied_weights_are_stored_once_and_written_to_every_name():
    model = _Tied()
    lawa = LawaScheduler(model, k=2)
    for value in (1.0, 3.0):
        _move(model, value)
        lawa.update()
    state = model.state_dict()
    assert "lm_head.weight" in state and "wte.weight" in state
    distinct = {"wte.weight", "mid.weight", "mid.bias"}
    assert _held_bytes(lawa) == 3 * sum(state[n].numel() * 4 for n in distinct)  # the tied weight once
    averaged = lawa.averaged_state_dict()
    assert list(averaged) == list(state)
    assert averaged["lm_head.weight"] is averaged["wte.weight"]
    assert torch.equal(averaged["wte.weight"], torch.full((11, 4), 2.0))
    fresh = _Tied()
    fresh.load_state_dict(averaged)  # strict: every name present
    _move(model, 5.0)
    with lawa.swapped_in():
        assert torch.equal(model.lm_head.weight, torch.full((11, 4), 2.0))
        assert model.lm_head.weight is model.wte.weight  # still tied: written in place
    assert torch.equal(model.lm_head.weight, torch.full((11, 4), 5.0))
    copy = lawa.averaged_model()
    assert copy.lm_head.weight is copy.wte.weight and torch.equal(copy.wte.weight, torch.full((11, 4), 2.0))


def test_save_file_round_trip_is_bit_identical_and_safe(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lawa = LawaScheduler(model, k=3, every_n_steps=2, start=3)

    def train(schedulers, steps):
        for step in steps:
            g = torch.Generator().manual_seed(step)
            optimizer.zero_grad()
            F.cross_entropy(model(torch.randn(8, 5, generator=g)), torch.randint(0, 3, (8,), generator=g)).backward()
            optimizer.step()
            assert len({s.step() for s in schedulers}) == 1

    train([lawa], range(13))  # ring wrapped, n % k != 0
    path = tmp_path / "lawa_state.safetensors"
    lawa.save_file(path)
    resumed = LawaScheduler(model, k=3, every_n_steps=2, start=3)
    resumed.load_file(path)
    _assert_states_equal(resumed.averaged_state_dict(), lawa.averaged_state_dict())
    assert resumed.count == lawa.count == 13 and resumed.num_snapshots == lawa.num_snapshots == 5
    train([lawa, resumed], range(13, 19))  # in lockstep on the same model: the averages stay bit-identical
    _assert_states_equal(resumed.averaged_state_dict(), lawa.averaged_state_dict())
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LawaError, match="junk.safetensors: not a LawaScheduler state file"):
        resumed.load_file(tmp_path / "junk.safetensors")
    with pytest.raises(LawaError, match="k=3 but this scheduler has k=2"):
        LawaScheduler(model, k=2, every_n_steps=2, start=3).load_file(path)


# ---------------------------------------------------------------------------------------------------
# DistributedDataParallel: 2 processes, gloo, CPU
# ---------------------------------------------------------------------------------------------------

DDP_STEPS = 8  # snapshots at steps 2, 4, 6, 8 with every_n_steps=2; k=3 wraps the ring once


def _ddp_run(model: nn.Module) -> dict:
    """The same training and LAWA calls for a DDP-wrapped model (per rank) and a plain one (reference)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    lawa = LawaScheduler(model, k=3, every_n_steps=2)
    _train(model, optimizer, lawa, range(DDP_STEPS))
    with lawa.swapped_in(model), torch.no_grad():
        logits = model.eval()(_batch(999)[0])
    return {"average": lawa.averaged_state_dict(), "logits": logits, "live": _plain_state(model)}


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        model = nn.parallel.DistributedDataParallel(_resnet(seed=0))
        torch.save(_ddp_run(model), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_match_each_other_and_a_single_process_run(tmp_path):
    """Every rank keeps its own scheduler and nothing is communicated for LAWA. Both ranks see the same batch
    so that one process training on it is an exact reference: with different data per rank, BatchNorm's
    batch statistics would make any single-process run differ, and the ranks' running statistics differ
    until DDP's next forward re-broadcasts rank 0's (parameters still agree; see lawa_scheduler's docstring)."""
    ctx = mp.start_processes(
        _ddp_worker,
        args=(2, str(tmp_path / "store"), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 180
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail("the 2-process DDP run did not finish within 180 s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ("average", "live"):
        _assert_states_equal(ranks[0][key], ranks[1][key])
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])

    # One process on the same batches is the exact reference: each rank's gradient is the single-process one
    # and DDP's mean of two equal halves is exact, so bit-identical results are expected (measured so).
    single = _ddp_run(_resnet(seed=0))  # one thread, as in the workers (the _one_thread fixture)
    for key in ("average", "live"):
        _assert_states_equal(ranks[0][key], single[key])
    assert torch.equal(ranks[0]["logits"], single["logits"])
