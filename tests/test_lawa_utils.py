"""lawa_utils: averaging against closed forms, the one-pass sweep, BN recompute, formats, the CLI."""

import argparse
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from torch.optim.swa_utils import update_bn

import lawa_utils as lu

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "lawa_utils", *map(str, args)], capture_output=True, text=True, cwd=cwd or REPO
    )


def tiny_state(value: float, steps: int = 0) -> dict:
    return {
        "w": torch.full((2, 3), value),
        "b": torch.tensor([value, -value], dtype=torch.float16),
        "bn.num_batches_tracked": torch.tensor(steps),
    }


# ---------------------------------------------------------------- averaging (pure)


def test_uniform_average_matches_closed_form_and_keeps_dtypes():
    states = [tiny_state(1.0, 10), tiny_state(2.0, 20), tiny_state(6.0, 30)]
    avg = lu.average_state_dicts(states)
    assert torch.allclose(avg["w"], torch.full((2, 3), 3.0))
    assert avg["b"].dtype == torch.float16 and torch.equal(avg["b"], torch.tensor([3.0, -3.0], dtype=torch.float16))
    assert avg["bn.num_batches_tracked"].item() == 30  # integer buffers come from the newest, undivided
    assert avg["bn.num_batches_tracked"].dtype == torch.int64


def test_exp_weights_follow_paper_eq1_unrolled():
    alpha, thetas = 0.9, [torch.tensor([float(v)]) for v in (3.0, -1.0, 4.0, 1.5, 9.0)]
    ema = thetas[0]
    for theta in thetas[1:]:
        ema = alpha * theta + (1 - alpha) * ema  # eq. (1): the newest gets alpha
    weights = lu.method_weights("exp", len(thetas), alpha)
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-12)
    assert weights[-1] == pytest.approx(alpha)
    avg = lu.average_state_dicts([{"x": t} for t in thetas], weights)
    assert avg["x"].item() == pytest.approx(ema.item(), rel=1e-6)


def test_arbitrary_weights_and_uniform_weights():
    assert lu.method_weights("uni", 4) == [0.25] * 4
    avg = lu.average_state_dicts([{"x": torch.tensor([1.0])}, {"x": torch.tensor([5.0])}], [0.25, 0.75])
    assert avg["x"].item() == pytest.approx(4.0)


def test_float32_accumulation_is_accurate_for_k64():
    torch.manual_seed(0)
    base = torch.randn(200_000)
    states = [{"x": base + 0.01 * torch.randn_like(base)} for _ in range(64)]
    exact = torch.stack([s["x"].double() for s in states]).mean(0)
    avg = lu.average_state_dicts(states)["x"].double()
    assert ((avg - exact).abs().max() / exact.abs().max()).item() <= 1e-6


@pytest.mark.parametrize(
    "other, message",
    [
        ({"w": torch.zeros(2, 3), "b": torch.zeros(2)}, "mismatched keys"),
        ({**tiny_state(0.0), "w": torch.zeros(3, 2)}, "mismatched shapes for 'w'"),
    ],
)
def test_mismatch_names_key_and_both_inputs(other, message):
    with pytest.raises(lu.LawaError, match=message) as info:
        lu.average_state_dicts([other, tiny_state(1.0)], names=["a.pt", "b.pt"])
    assert "a.pt" in str(info.value) and "b.pt" in str(info.value)


def test_window_is_k_latest_inclusive():
    assert list(lu.window(8, 3)) == [6, 7, 8]
    assert len(lu.window(90, 6)) == 6


# ---------------------------------------------------------------- the one-pass sweep


def write_trajectory(tmp_path, n=7, prefix="module."):
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=4)
    paths = {}
    for epoch in range(1, n + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            model.bn1.running_mean.add_(0.1)
            model.bn1.num_batches_tracked.fill_(100 * epoch)
        state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
        paths[epoch] = tmp_path / f"checkpoint{epoch}.pt"
        torch.save({"epoch": epoch, "arch": "resnet18", "state_dict": state, "optimizer": {}}, paths[epoch])
    return paths


@pytest.mark.parametrize("method", ["uni", "exp"])
def test_sweep_equals_from_scratch_windows_and_reads_each_file_once(tmp_path, method):
    paths = write_trajectory(tmp_path)
    assert lu.find_checkpoints(tmp_path) == paths
    reads = []

    def counting_load(p):
        reads.append(p)
        return lu.load_model_state(p)

    cells = list(lu.iter_window_averages(paths, [1, 2, 3, 5], method=method, alpha=0.8, load=counting_load))
    assert sorted(reads) == sorted(paths.values())  # every checkpoint exactly once
    expected_cells = [(e, k) for e in range(1, 8) for k in (1, 2, 3, 5) if e - k + 1 >= 1]
    assert [(e, k) for e, k, _ in cells] == expected_cells
    loaded = {e: lu.load_model_state(p) for e, p in paths.items()}
    for end, k, state in cells:
        window = [loaded[i] for i in lu.window(end, k)]
        ref = lu.average_state_dicts(window, lu.method_weights(method, k, 0.8))
        assert state.keys() == ref.keys()
        for key in ref:
            assert (state[key].double() - ref[key].double()).abs().max() <= 1e-6, (end, k, key)
        assert state["bn1.num_batches_tracked"].item() == 100 * end


def test_sweep_skips_done_cells_and_limits_ends(tmp_path):
    paths = write_trajectory(tmp_path, n=5)
    cells = [(e, k) for e, k, _ in lu.iter_window_averages(paths, [2, 3], ends=[4, 5], skip={(4, 2)})]
    assert cells == [(4, 3), (5, 2), (5, 3)]


def test_sweep_errors_name_the_missing_file_and_bad_k(tmp_path):
    paths = write_trajectory(tmp_path, n=6)
    del paths[4]
    with pytest.raises(lu.LawaError, match=r"checkpoint4\.pt is missing \(window 4\.\.6 needs it\)"):
        list(lu.iter_window_averages(paths, [3], ends=[6]))
    with pytest.raises(lu.LawaError, match="k=9 is larger than the trajectory"):
        list(lu.iter_window_averages(paths, [9]))
    with pytest.raises(lu.LawaError, match="positive"):
        list(lu.iter_window_averages(paths, [0]))


def test_sweep_refuses_nan_weights(tmp_path):
    paths = write_trajectory(tmp_path, n=3, prefix="")
    obj = torch.load(paths[2], weights_only=True)
    obj["state_dict"]["fc.weight"][0, 0] = float("nan")
    torch.save(obj, paths[2])
    with pytest.raises(lu.LawaError, match=r"checkpoint2\.pt: tensor 'fc\.weight' has NaN/Inf"):
        list(lu.iter_window_averages(paths, [2]))


# ---------------------------------------------------------------- BatchNorm recompute


def test_recompute_bn_equals_swa_update_bn_and_restores_state():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    batches = [(torch.randn(4, 3, 32, 32), torch.zeros(4)) for _ in range(3)]
    reference = torchvision.models.resnet18(num_classes=3)
    reference.load_state_dict(model.state_dict())
    update_bn(batches, reference)
    model.bn1.momentum = 0.3
    model.eval()
    lu.recompute_bn(model, batches)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    assert model.bn1.momentum == 0.3 and model.layer1[0].bn1.momentum == 0.1
    assert not model.training


def test_recompute_bn_uses_only_num_batches_and_is_noop_without_bn():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    batches = [torch.randn(4, 3, 32, 32) for _ in range(5)]
    lu.recompute_bn(model, batches, num_batches=2)
    assert model.bn1.num_batches_tracked.item() == 2
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 2))
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    lu.recompute_bn(mlp, [torch.randn(2, 3)])
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


# ---------------------------------------------------------------- formats and safe loading


def test_every_format_yields_the_same_unwrapped_state(tmp_path):
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    sd = model.state_dict()
    files = {
        "examples": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3, "arch": "x"},
        "fairseq": {"model": sd, "args": argparse.Namespace(lr=[0.1]), "cfg": {"task": {}}, "extra_state": {}},
        "fairseq-old": {"model": sd, "args": argparse.Namespace(lr=[0.1]), "optimizer_history": [], "extra_state": {}},
        "torchvision": {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}, "lr_scheduler": {},
                        "epoch": 4, "args": argparse.Namespace(model="resnet18"), "model_ema": {"n_averaged": 1}},
        "nanogpt": {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}, "iter_num": 5},
        "net": {"net": sd, "step": 1},
        "plain": dict(sd),
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / f"{name}.pt")
    save_file(dict(sd), tmp_path / "st.safetensors")
    for path in [*(tmp_path / f"{n}.pt" for n in files), tmp_path / "st.safetensors"]:
        state = lu.load_model_state(path)
        assert state.keys() == sd.keys() and all(torch.equal(state[k], sd[k]) for k in sd), path
    formats = {name: lu.split_checkpoint(lu.load_checkpoint(tmp_path / f"{name}.pt"))[0] for name in files}
    assert formats == {"examples": "examples", "fairseq": "fairseq", "fairseq-old": "fairseq",
                       "torchvision": "torchvision", "nanogpt": "nanogpt", "net": "nanogpt", "plain": "plain"}
    back = lu.with_model_state(lu.load_checkpoint(tmp_path / "torchvision.pt"), "torchvision", sd)
    assert list(back["model"]) == [f"module.{k}" for k in sd] and back["epoch"] == 4 and "model_ema" in back
    fmt, state = lu.split_checkpoint(lu.load_checkpoint(tmp_path / "examples.pt"))
    back = lu.with_model_state(lu.load_checkpoint(tmp_path / "examples.pt"), fmt, state)
    assert list(back["state_dict"]) == list(files["examples"]["state_dict"]) and back["epoch"] == 3


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_runs_no_code_and_unpickling_it_needs_trust(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _RunsCode(marker)}, tmp_path / "checkpoint1.pt")
    with pytest.raises(lu.LawaError, match="--trust-checkpoints"):
        lu.load_checkpoint(tmp_path / "checkpoint1.pt")  # the whole object cannot be built safely
    # averaging reads the tensors only: the payload stays an inert placeholder, and the output keeps the input's
    # pickle as it was (so the output is exactly as trustworthy as the input, no less)
    result = run_cli("average", "--files", tmp_path / "checkpoint1.pt", "--out", tmp_path / "o.pt")
    assert result.returncode == 0, result.stderr
    assert not marker.exists() and torch.equal(lu.load_model_state(tmp_path / "o.pt")["w"], torch.zeros(1))
    lu.load_checkpoint(tmp_path / "checkpoint1.pt", trust=True)  # explicit opt-in does unpickle
    assert marker.exists()


def test_save_checkpoint_is_atomic_and_refuses_overwrite(tmp_path):
    out = tmp_path / "avg.pt"
    lu.save_checkpoint({"w": torch.ones(2)}, out)
    with pytest.raises(lu.LawaError, match="already exists"):
        lu.save_checkpoint({"w": torch.zeros(2)}, out)

    def crash(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lu.atomic_write(out, crash, force=True)
    assert torch.equal(torch.load(out)["w"], torch.ones(2))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["avg.pt"]  # and no temporary file is left


# ---------------------------------------------------------------- tidy CSV


def test_append_rows_repairs_a_torn_line_and_read_results_parses(tmp_path):
    path = tmp_path / "results.csv"
    lu.append_rows(path, [{"method": "lawa", "k": 2, "epoch": 3, "split": "val", "metric": "acc1", "value": 0.5}])
    with open(path, "a") as f:
        f.write("lawa,2,4,val,ac")  # a writer killed mid-line
    assert len(lu.read_results(path)) == 1
    lu.append_rows(path, [{"method": "lawa", "k": 2, "epoch": 4, "split": "val", "metric": "acc1", "value": 0.6}])
    df = lu.read_results(path)
    assert df["epoch"].tolist() == [3, 4] and list(df.columns) == lu.RESULT_COLUMNS
    with pytest.raises(lu.LawaError, match="unknown column"):
        lu.append_rows(path, [{"methd": "x"}])


# ---------------------------------------------------------------- the CLI


def test_cli_average_writes_torchvision_loadable_checkpoint(tmp_path):
    paths = write_trajectory(tmp_path, n=4)
    out = tmp_path / "lawa4.pt"
    result = run_cli("average", "--dir", tmp_path, "--end", 4, "--k", 3, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "checkpoint2.pt" in result.stdout and "checkpoint1.pt" not in result.stdout
    obj = torch.load(out, weights_only=True)
    model = torchvision.models.resnet18(num_classes=4)
    model.load_state_dict({k.removeprefix("module."): v for k, v in obj["state_dict"].items()})
    ref = lu.average_state_dicts([lu.load_model_state(paths[i]) for i in (2, 3, 4)])
    assert all(torch.allclose(model.state_dict()[k].float(), v.float()) for k, v in ref.items())
    with zipfile.ZipFile(out) as z:  # provenance rides beside the pickle, which is the newest input's own
        lawa = json.loads(z.read(next(n for n in z.namelist() if n.endswith(".data/lawa.json"))))
    assert obj["epoch"] == 4 and lawa["method"] == "uni" and lawa["positions"] == [2, 3, 4]
    exp_out = tmp_path / "exp.safetensors"
    result = run_cli("average", "--files", paths[3], paths[4], "--method", "exp", "--alpha", "0.75", "--out", exp_out)
    assert result.returncode == 0, result.stderr
    st = lu.load_model_state(exp_out)
    a, b = lu.load_model_state(paths[3]), lu.load_model_state(paths[4])
    assert torch.allclose(st["fc.weight"], 0.25 * a["fc.weight"] + 0.75 * b["fc.weight"], atol=1e-6)


def _bad_inputs(tmp_path):
    """(name, setup(dir) -> cli args, expected message fragment)."""
    good = tmp_path / "good"
    good.mkdir()
    paths = write_trajectory(good, n=4, prefix="")

    def hole(d):
        for e in (1, 2, 4):
            (d / f"checkpoint{e}.pt").write_bytes(paths[e].read_bytes())
        return ["--dir", d, "--end", 4, "--k", 3]

    def copy_with(d, epoch, mutate):
        for e in (1, 2):
            (d / f"checkpoint{e}.pt").write_bytes(paths[e].read_bytes())
        obj = torch.load(paths[epoch], weights_only=True)
        mutate(obj["state_dict"])
        torch.save(obj, d / f"checkpoint{epoch}.pt")
        return ["--dir", d, "--end", 2, "--k", 2]

    def nan(sd):
        sd["conv1.weight"].view(-1)[0] = float("inf")

    def drop(sd):
        sd.pop("fc.bias")

    def reshape(sd):
        sd["fc.bias"] = torch.zeros(5)

    def truncated(d):
        (d / "checkpoint1.pt").write_bytes(paths[1].read_bytes()[:5000])
        (d / "checkpoint2.pt").write_bytes(paths[2].read_bytes())
        return ["--dir", d, "--end", 2, "--k", 2]

    def not_a_checkpoint(d):
        (d / "checkpoint1.pt").write_text("epoch,acc\n1,0.5\n")
        return ["--files", d / "checkpoint1.pt"]

    def not_model(d):
        torch.save({"epoch": 1, "notes": "hello"}, d / "checkpoint1.pt")
        return ["--files", d / "checkpoint1.pt"]

    return [
        ("missing file in window", hole, "checkpoint3.pt is missing: the window of k=3 ending at checkpoint4.pt"),
        ("k larger than trajectory", lambda d: ["--dir", good, "--end", 4, "--k", 9], "k=9 is larger"),
        ("empty dir", lambda d: ["--dir", d, "--end", 2, "--k", 2], "has no checkpoint"),
        ("missing dir", lambda d: ["--dir", d / "nope", "--end", 2, "--k", 2], "does not exist"),
        ("missing end", lambda d: ["--dir", good, "--end", 7, "--k", 2], "checkpoint7.pt does not exist"),
        ("truncated", truncated, "checkpoint1.pt is not a readable PyTorch checkpoint"),
        ("not a checkpoint", not_a_checkpoint, "checkpoint1.pt is not a readable PyTorch checkpoint"),
        ("no model inside", not_model, "holds no model weights"),
        ("nan", lambda d: copy_with(d, 2, nan), "'conv1.weight' has NaN/Inf"),
        ("keys", lambda d: copy_with(d, 2, drop), "mismatched keys"),
        ("shapes", lambda d: copy_with(d, 2, reshape), "mismatched shapes for 'fc.bias'"),
        ("out exists", lambda d: ["--dir", good, "--end", 2, "--k", 2, "--out", paths[1]], "already exists"),
        ("alpha without exp", lambda d: ["--dir", good, "--end", 2, "--k", 2, "--alpha", 0.5],
         "--alpha applies to --method exp, not uni"),
    ]


def test_cli_bad_inputs_give_one_line_error_and_no_output(tmp_path, capsys):
    # In-process (lu.main is what `python -m lawa_utils` runs) to keep the suite fast; the subprocess
    # path is covered by the tests above.
    for i, (name, setup, message) in enumerate(_bad_inputs(tmp_path)):
        d = tmp_path / f"case{i}"
        d.mkdir()
        args = setup(d)
        out = d / "out.pt"
        if "--out" not in args:
            args += ["--out", out]
        capsys.readouterr()
        status = lu.main(["average", *map(str, args)])
        stderr = capsys.readouterr().err
        assert status == 2, (name, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (name, stderr)
        assert not out.exists(), name
        assert not [p for p in d.iterdir() if p.name.startswith(".")], name  # no temporary left behind


def test_safe_loading_keeps_globals_registered_by_others(tmp_path):
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([argparse.Namespace])  # as the fairseq plugin does
    try:
        torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(a=1)}, tmp_path / "f.pt")
        lu.load_checkpoint(tmp_path / "f.pt")
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
