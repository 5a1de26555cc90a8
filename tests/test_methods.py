"""lawa_methods: EMA, SWA and EWA sweeps against closed forms; lawa_twa: TWA's basis, projection, start point and
limits; the imagenet/train_twa.py command end to end on a tiny trajectory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # lawa_methods is a top-level module beside lawa_utils

import lawa_methods as lm  # noqa: E402
import lawa_twa as twa  # noqa: E402
import lawa_utils as lu  # noqa: E402


def theta(e: int) -> dict:
    """A hand-written checkpoint of epoch e: float32, float16 and an integer buffer."""
    return {
        "w": torch.tensor([float(e), float(e * e), -3.0 * e]),
        "h": torch.tensor([0.5 * e], dtype=torch.float16),
        "bn.num_batches_tracked": torch.tensor(100 * e),
    }


def trajectory(n: int = 8) -> dict[int, dict]:
    return {e: theta(e) for e in range(1, n + 1)}


def counting(reads: list):
    def load(state):
        reads.append(int(state["bn.num_batches_tracked"]) // 100)
        return state

    return load


def close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.allclose(a[key].double(), b[key].double(), atol=tol, rtol=tol), (key, a[key], b[key])


def uniform(epochs) -> dict:
    return lu.average_state_dicts([theta(i) for i in epochs])


# ---------------------------------------------------------------- EMA


def test_ema_matches_unrolled_recursion_and_exp_weights_over_the_whole_trajectory():
    reads: list[int] = []
    cells = list(lm.iter_ema_averages(trajectory(6), [0.5, 0.9], load=counting(reads)))
    assert reads == [1, 2, 3, 4, 5, 6]  # one pass
    assert [(e, k) for e, k, _ in cells] == [(e, k) for e in range(1, 7) for k in (2, 10)]
    for end, k, state in cells:
        d = {2: 0.5, 10: 0.9}[k]
        # closed form: θ_1 gets d^(E−1), θ_i (i ≥ 2) gets (1−d)·d^(E−i)
        weights = [d ** (end - 1)] + [(1 - d) * d ** (end - i) for i in range(2, end + 1)]
        expected = {"w": sum(w * theta(i)["w"] for i, w in zip(range(1, end + 1), weights, strict=True))}
        assert torch.allclose(state["w"], expected["w"], atol=1e-5)
        # … which is the paper's EXP with α = 1 − d over every checkpoint so far
        exp_weights = lu.method_weights("exp", end, 1 - d)
        close(state, lu.average_state_dicts([theta(i) for i in range(1, end + 1)], exp_weights))
        assert state["bn.num_batches_tracked"].item() == 100 * end  # integer buffers from the newest


def test_ema_labels_ends_skip_and_errors():
    assert (lm.ema_label(0.0), lm.ema_label(0.5), lm.ema_label(0.9), lm.ema_label(0.99)) == (1, 2, 10, 100)
    cells = list(lm.iter_ema_averages(trajectory(5), [0.9], ends=[3, 5], skip={(3, 10)}, load=lambda s: s))
    assert [(e, k) for e, k, _ in cells] == [(5, 10)]
    with pytest.raises(lu.LawaError, match=r"EMA decays 0.9 and 0.902 share the label k=10"):
        list(lm.iter_ema_averages(trajectory(3), [0.9, 0.902], load=lambda s: s))
    with pytest.raises(lu.LawaError, match=r"decay must be in \[0, 1\)"):
        list(lm.iter_ema_averages(trajectory(3), [1.0]))
    gap = trajectory(5)
    del gap[3]
    with pytest.raises(lu.LawaError, match=r"checkpoint3\.pt is missing \(the EMA from epoch 1 to 5 needs it\)"):
        list(lm.iter_ema_averages(gap, [0.5], load=lambda s: s))
    assert [(e, k) for e, k, _ in lm.iter_ema_averages(gap, [0.5], ends=[2], load=lambda s: s)] == [(2, 2)]


# ---------------------------------------------------------------- SWA


def test_swa_is_the_mean_from_each_start_and_equals_the_lawa_window():
    reads: list[int] = []
    cells = list(lm.iter_swa_averages(trajectory(6), [2, 4], load=counting(reads)))
    assert reads == [2, 3, 4, 5, 6]  # nothing before the earliest start, each once
    assert [(e, k) for e, k, _ in cells] == [(2, 1), (3, 2), (4, 1), (4, 3), (5, 2), (5, 4), (6, 3), (6, 5)]
    for end, k, state in cells:
        start = end - k + 1
        close(state, uniform(range(start, end + 1)))
        lawa = next(lu.iter_window_averages(trajectory(6), [k], [end], load=lambda s: s))[2]
        close(state, lawa)


def test_swa_errors_name_the_start_or_the_missing_file():
    with pytest.raises(lu.LawaError, match="SWA start epoch 9 has no checkpoint"):
        list(lm.iter_swa_averages(trajectory(4), [9]))
    gap = trajectory(5)
    del gap[4]
    with pytest.raises(lu.LawaError, match=r"checkpoint4\.pt is missing \(SWA from epoch 2 to 5 needs it\)"):
        list(lm.iter_swa_averages(gap, [2], load=lambda s: s))


# ---------------------------------------------------------------- EWA


def test_ewa_spaced_windows_are_every_s_th_checkpoint_ending_at_e():
    assert list(lm.ewa_window(9, 3, 2)) == [5, 7, 9]
    reads: list[int] = []
    cells = list(lm.iter_ewa_averages(trajectory(10), [2, 3], spacing=2, load=counting(reads)))
    assert sorted(reads) == list(range(1, 11))  # each once
    expected = [(e, k) for e in range(1, 11) for k in (2, 3) if e - (k - 1) * 2 >= 1]
    assert [(e, k) for e, k, _ in cells] == expected
    for end, k, state in cells:
        close(state, uniform([end - j * 2 for j in reversed(range(k))]))
        assert state["bn.num_batches_tracked"].item() == 100 * end


def script_blocks(epochs: list[int], k: int) -> list[list[int]]:
    """Sanyal et al.'s EWA.py selection: sorted saved checkpoints in non-overlapping groups of k
    (``paths[i:i+interval][-NUM_MODELS:]`` with interval = NUM_MODELS = k); complete groups only."""
    groups = [epochs[i : i + k][-k:] for i in range(0, len(epochs), k)]
    return [g for g in groups if len(g) == k]


@pytest.mark.parametrize("spacing", [1, 3])
def test_ewa_blocks_are_the_scripts_non_overlapping_groups_of_spaced_checkpoints(spacing):
    n, k = 20, 3
    saved = list(range(1, n + 1, spacing))  # their trajectory: a checkpoint every `spacing` epochs from the first
    reads: list[int] = []
    cells = list(lm.iter_ewa_averages(trajectory(n), [k], spacing, blocks=True, load=counting(reads)))
    groups = script_blocks(saved, k)
    assert [e for e, _, _ in cells] == [g[-1] for g in groups]  # labelled by the block's last checkpoint
    for (_, _, state), group in zip(cells, groups, strict=True):
        close(state, uniform(group))
    assert sorted(reads) == sorted(i for g in groups for i in g)  # checkpoints outside the blocks are never read
    # a block average is the spaced (sliding) average at the same end: the same cells, so the same label
    sliding = {(e, kk): s for e, kk, s in lm.iter_ewa_averages(trajectory(n), [k], spacing, load=lambda s: s)}
    for end, kk, state in cells:
        close(state, sliding[(end, kk)])


def test_ewa_with_spacing_1_is_lawa_and_errors_are_clear():
    ewa = list(lm.iter_ewa_averages(trajectory(6), [1, 2, 4], load=lambda s: s))
    lawa = list(lu.iter_window_averages(trajectory(6), [1, 2, 4], load=lambda s: s))
    assert [(e, k) for e, k, _ in ewa] == [(e, k) for e, k, _ in lawa]
    for (_, _, a), (_, _, b) in zip(ewa, lawa, strict=True):
        close(a, b)
    gap = trajectory(9)
    del gap[5]
    with pytest.raises(lu.LawaError, match=r"checkpoint5\.pt is missing \(EWA window 1\.\.9 spaced 4 needs it\)"):
        list(lm.iter_ewa_averages(gap, [3], 4, ends=[9]))
    with pytest.raises(lu.LawaError, match="spacing must be a positive integer"):
        list(lm.iter_ewa_averages(trajectory(3), [2], 0))


# ---------------------------------------------------------------- one entry point, files, bad weights


def test_dispatch_labels_and_real_checkpoint_files(tmp_path):
    assert [lm.method_label(m, spacing=4) for m in lm.METHODS] == ["lawa", "exp", "ema", "swa", "ewa-s4"]
    with pytest.raises(lu.LawaError, match="unknown averaging method 'sma'"):
        lm.method_label("sma")
    paths = {}
    for e, state in trajectory(4).items():  # pytorch/examples format with DDP's module. prefix
        paths[e] = tmp_path / f"checkpoint{e}.pt"
        torch.save({"epoch": e, "arch": "x", "state_dict": {f"module.{k}": v for k, v in state.items()}}, paths[e])
    assert lu.find_checkpoints(tmp_path) == paths
    from_files = list(lm.iter_method_averages("ewa", paths, ks=[2], spacing=2))
    in_memory = list(lm.iter_ewa_averages(trajectory(4), [2], 2, load=lambda s: s))
    for (e1, k1, a), (e2, k2, b) in zip(from_files, in_memory, strict=True):
        assert (e1, k1) == (e2, k2)
        close(a, b)
    lawa = list(lm.iter_method_averages("exp", paths, ks=[3], alpha=0.8))
    assert [(e, k) for e, k, _ in lawa] == [(3, 3), (4, 3)]
    with pytest.raises(lu.LawaError, match="ewa needs window sizes"):
        lm.iter_method_averages("ewa", paths)


def test_sweeps_refuse_nan_weights_and_mismatched_keys():
    bad = trajectory(3)
    bad[2] = {**bad[2], "w": torch.tensor([1.0, float("nan"), 0.0])}
    with pytest.raises(lu.LawaError, match=r"checkpoint2: tensor 'w' has NaN/Inf"):
        list(lm.iter_ema_averages(bad, [0.5], load=lambda s: s))
    odd = trajectory(3)
    odd[3] = {**odd[3], "extra": torch.zeros(1)}
    with pytest.raises(lu.LawaError, match="mismatched keys between checkpoint1 and checkpoint3"):
        list(lm.iter_swa_averages(odd, [1], load=lambda s: s))


# ---------------------------------------------------------------- TWA: basis


def near_parallel_rows(n: int = 6, dim: int = 3000, step: float = 1e-3) -> torch.Tensor:
    """Rows like a trajectory's checkpoints: a common point plus small cumulative steps (cosine ≈ 1)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(dim, generator=g)
    steps = torch.randn(n, dim, generator=g) * step
    return base + steps.cumsum(0)


@pytest.mark.parametrize("step", [1e-3, 1e-5])  # one Gram–Schmidt pass: off by 2e-3 and 1.0 here
def test_basis_is_orthonormal_and_spans_nearly_parallel_checkpoints(step):
    w = near_parallel_rows(step=step)
    p = w.clone()
    kept = twa.orthonormalize_rows_(p, distributed=False)
    assert kept == [True] * 6
    eye = (p.double() @ p.double().T) - torch.eye(6, dtype=torch.float64)
    assert eye.abs().max() < 1e-6
    residual = w.double() - (w.double() @ p.double().T) @ p.double()
    assert residual.norm() / w.double().norm() < 1e-6


def test_linearly_dependent_checkpoints_are_dropped():
    w = near_parallel_rows(4)
    w = torch.stack([w[0], w[1], w[0].clone(), 0.5 * w[0] + 0.5 * w[1], w[3]])
    kept = twa.orthonormalize_rows_(w, distributed=False)
    assert kept == [True, True, False, False, True]
    p = w[:3]
    assert ((p.double() @ p.double().T) - torch.eye(3, dtype=torch.float64)).abs().max() < 1e-6


# ---------------------------------------------------------------- TWA: training in the subspace


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def tiny_trajectory(tmp_path: Path, n: int = 5) -> dict[int, Path]:
    torch.manual_seed(0)
    model, paths = Tiny(), {}
    for e in range(1, n + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            model.bn.running_mean.add_(0.1)
            model.bn.num_batches_tracked.fill_(10 * e)
        paths[e] = tmp_path / f"checkpoint{e}.pt"
        torch.save({"epoch": e, "arch": "tiny", "state_dict": model.state_dict()}, paths[e])
    return paths


def twa_steps(model, sub, lr: float, steps: int = 4, wd: float = 1e-3):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    projector = twa.TWAProjector(sub.basis, sub.names, weight_decay=wd)
    scheduler = twa.twa_scheduler(optimizer, "linear", epochs=1, iters_per_epoch=steps)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        projector.project_(model)
        optimizer.step()
        scheduler.step()
    return projector


def params_of(model) -> torch.Tensor:
    return twa.flatten_params({n: p.detach() for n, p in model.named_parameters()}, twa.param_names(model))


def test_zero_learning_rate_leaves_the_model_at_the_mean_the_swa_point(tmp_path):
    paths = tiny_trajectory(tmp_path)
    model = Tiny()
    sub = twa.build_subspace(model, paths, twa.twa_epochs(paths, "2:5"))
    assert (sub.epochs, sub.dim, sub.dropped, tuple(sub.basis.shape)) == ([2, 3, 4, 5], 4, [], (4, 91))
    model.load_state_dict(sub.start_state("mean"))
    twa_steps(model, sub, lr=0.0)
    swa = next(lm.iter_swa_averages(paths, [2], ends=[5]))[2]
    for name, p in model.named_parameters():
        assert torch.allclose(p, swa[name], atol=1e-6), name
    last = lu.load_model_state(paths[5])
    start = sub.start_state("last")
    close(start, last, tol=0)
    assert sub.start_state("mean")["bn.running_mean"].equal(last["bn.running_mean"])  # buffers: the last's


def test_projected_gradient_and_trained_weights_lie_in_the_span(tmp_path):
    paths = tiny_trajectory(tmp_path)
    model = Tiny()
    sub = twa.build_subspace(model, paths, [1, 2, 3, 4, 5])
    model.load_state_dict(sub.start_state("mean"))
    start = params_of(model)
    projector = twa_steps(model, sub, lr=0.5)
    theta_end = params_of(model)
    assert (theta_end - start).norm() > 1e-2  # it trained
    w = torch.stack([twa.flatten_params(lu.load_model_state(paths[e]), sub.names) for e in range(1, 6)]).double()

    def off_span(v: torch.Tensor) -> float:
        coeff = torch.linalg.lstsq(w.T, v.double().unsqueeze(1)).solution
        return float((w.T @ coeff).squeeze(1).sub(v.double()).norm() / v.double().norm())

    grad = twa.flatten_params({n: p.grad for n, p in model.named_parameters()}, sub.names)
    assert off_span(grad) < 1e-5
    assert (projector.project(grad) - grad).norm() / grad.norm() < 1e-5  # projecting again changes nothing
    assert off_span(theta_end) < 1e-6
    raw = torch.randn(grad.numel(), generator=torch.Generator().manual_seed(2))
    assert off_span(raw) > 0.5 and off_span(projector.project(raw)) < 1e-5


def test_tied_weights_start_at_the_mean_under_every_name(tmp_path):
    class TiedLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(7, 4)
            self.head = torch.nn.Linear(4, 7, bias=False)
            self.head.weight = self.embed.weight

    model, paths = TiedLM(), {}
    for e in (1, 2):
        with torch.no_grad():
            model.embed.weight.add_(1.0)
        paths[e] = tmp_path / f"checkpoint{e}.pt"
        torch.save(model.state_dict(), paths[e])
    sub = twa.build_subspace(model, paths, [1, 2])
    assert sub.names == ["embed.weight"] and sub.tied == {"head.weight": "embed.weight"}
    state = sub.start_state("mean")
    assert state["head.weight"].equal(state["embed.weight"])
    mean = (lu.load_model_state(paths[1])["embed.weight"] + lu.load_model_state(paths[2])["embed.weight"]) / 2
    assert torch.allclose(state["embed.weight"], mean)


def test_twa_refuses_too_much_memory_and_ranges_outside_the_trajectory(tmp_path):
    paths = tiny_trajectory(tmp_path)
    assert twa.twa_memory_bytes(5, 91) == 4 * 5 * 91 + 20 * 91
    assert twa.default_max_bytes() > 1 << 28
    too_big = r"TWA needs 0\.00364 MB per process .*\(5 checkpoints × 91 parameters.* limit is 0\.001 MB"
    with pytest.raises(lu.LawaError, match=too_big):
        twa.build_subspace(Tiny(), paths, [1, 2, 3, 4, 5], max_bytes=1000)
    for spec, message in [
        ("0:3", r"TWA range 0:3 lies outside the trajectory \(checkpoint1\.pt\.\.checkpoint5\.pt\)"),
        ("4:9", "TWA range 4:9 lies outside the trajectory"),
        ("4:2", "TWA range 4:2 is empty"),
        ("2-4", "TWA range must be 'A:B'"),
    ]:
        with pytest.raises(lu.LawaError, match=message):
            twa.twa_epochs(paths, spec)
    del paths[3]
    with pytest.raises(lu.LawaError, match=r"checkpoint3\.pt is missing \(TWA range 1:5 needs it\)"):
        twa.twa_epochs(paths, "1:5")
    with pytest.raises(lu.LawaError, match="has shape"):
        twa.build_subspace(torch.nn.Sequential(torch.nn.Linear(5, 8)), {1: paths[1]}, [1], load=lambda p: {
            "0.weight": torch.zeros(8, 4), "0.bias": torch.zeros(8)})


def test_twa_schedules_follow_the_reference():
    step = [twa.twa_lr_factor("step", it, epochs=10, iters_per_epoch=3) for it in range(30)]
    assert step == [1.0] * 15 + [pytest.approx(0.1)] * 9 + [pytest.approx(0.01)] * 6  # milestones epochs 5 and 8
    assert [twa.twa_lr_factor("step", it, 2, 1) for it in range(2)] == [1.0, pytest.approx(0.1)]
    assert [twa.twa_lr_factor("linear", it, 2, 2) for it in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert twa.twa_lr_factor("constant", 99, 2, 2) == 1.0
    with pytest.raises(lu.LawaError, match="unknown TWA schedule 'cosine'"):
        twa.twa_lr_factor("cosine", 0, 1, 1)


# ---------------------------------------------------------------- imagenet/train_twa.py


def test_train_twa_command_writes_rows_and_a_trainer_format_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = torchvision.models.get_model("mobilenet_v3_small", num_classes=10)
    ckpt_dir = tmp_path / "run"
    ckpt_dir.mkdir()
    for e in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        torch.save({"epoch": e, "arch": "mobilenet_v3_small", "state_dict": model.state_dict()},
                   ckpt_dir / f"checkpoint{e}.pt")
    out, save = tmp_path / "results.csv", tmp_path / "twa.pt"
    common = ["fashion-mnist", "--ckpt-dir", ckpt_dir, "--image-size", "16", "--train-subset", "64",
              "--val-subset", "32", "-b", "16", "-j", "0", "--train-eval-subset", "32", "--out", out]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}  # PYTHONPATH: lawa_twa at the root
    proc = subprocess.run([sys.executable, str(REPO / "imagenet" / "train_twa.py"), *map(str, common), "--range",
                           "2:3", "--epochs", "1", "--bn-batches", "2", "--save", str(save)],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = lu.read_results(out)
    assert set(rows["method"]) == {"twa"} and set(rows["k"]) == {2} and set(rows["epoch"]) == {3}
    assert sorted(zip(rows["split"], rows["metric"], strict=True)) == sorted(
        (s, m) for s in ("train", "val") for m in ("loss", "acc1", "acc5"))
    saved = lu.load_checkpoint(save)  # weights_only: the record holds plain types only
    assert saved["epoch"] == 3 and saved["arch"] == "mobilenet_v3_small"
    assert saved["twa"]["subspace"]["epochs"] == [2, 3] and saved["twa"]["subspace"]["dim"] == 2
    torchvision.models.get_model("mobilenet_v3_small", num_classes=10).load_state_dict(saved["state_dict"])
    assert (tmp_path / "twa_2-3_seed0.json").is_file()

    # reruns and bad input, in this process (no second torch import)
    sys.path.insert(0, str(REPO / "imagenet"))
    import train_twa

    train_twa.main([*map(str, common), "--range", "2:3"])
    assert "already has twa rows for checkpoints 2..3" in capsys.readouterr().out
    assert len(lu.read_results(out)) == len(rows)
    for flags, message in [
        (["--range", "2:7"], "TWA range 2:7 lies outside the trajectory (checkpoint1.pt..checkpoint3.pt)"),
        (["--range", "1:3", "--save", str(save)], f"--save {save} already exists; pass --force to overwrite it"),
        (["--range", "1:3", "--max-memory-gb", "0.001"], "TWA needs 48.9 MB per process for its subspace (3 chec"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            train_twa.main([*map(str, common), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(f"train_twa.py: error: {message}")
