"""imagenet/: the trainer, the (E, k) sweep and their errors, on a tiny real Fashion-MNIST run.

One 3-epoch trajectory (mobilenet_v3_small, 16×16 inputs, 256 training images) is trained once per module
and shared; the sweep reads a copy of it converted to the paper's published pytorch/examples format.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision
from synthetic_trajectory import assert_matches_reference, write_image_run

import lawa_utils

REPO = Path(__file__).resolve().parents[1]
IMAGENET = REPO / "imagenet"
ARCH = "mobilenet_v3_small"  # BatchNorm, dropout, 1.5M parameters: small files, quick epochs
DATA = ["fashion-mnist", "--image-size", "16", "--train-subset", "256", "--val-subset", "256"]
TRAIN = [*DATA, "-a", ARCH, "-b", "64", "--lr", "0.05", "-j", "0", "-p", "100"]
# The shared trajectory uses Lookahead, the optimizer with the most state to resume (slow weights and a step
# counter that runs across epochs: 4 steps an epoch, a slow update every 3); DDP tests cover plain SGD.
LOOKAHEAD = ["--optimizer", "lookahead", "--lookahead-k", "3"]


def load_script(name: str):
    """Import imagenet/<name>.py in this process (it imports its sibling `common` from imagenet/)."""
    if str(IMAGENET) not in sys.path:
        sys.path.insert(0, str(IMAGENET))
    spec = importlib.util.spec_from_file_location(f"imagenet_{name}", IMAGENET / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(script: str, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    # One thread: these models are too small to gain from two, and two OpenMP threads slow down many times
    # over when other jobs share the cores (measured 25 vs 181 img/s on a busy 2-core machine).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(IMAGENET / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def without_wall(log: pd.DataFrame) -> pd.DataFrame:
    return log.drop(columns="wall_seconds").reset_index(drop=True)


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trajectory") / "run"
    run("main.py", *TRAIN, "--epochs", "3", "--save-dir", str(run_dir), *LOOKAHEAD)
    return run_dir


@pytest.fixture(scope="module")
def published(trajectory, tmp_path_factory) -> Path:
    """The trajectory as the paper published its ResNet-50 one: pytorch/examples keys, `module.` prefix,
    no args.json beside it."""
    out = tmp_path_factory.mktemp("published")
    for epoch in (1, 2, 3):
        ours = torch.load(trajectory / f"checkpoint{epoch}.pt", weights_only=True)
        torch.save({"epoch": epoch, "arch": ARCH, "best_acc1": torch.tensor(0.0), "optimizer": ours["optimizer"],
                    "state_dict": {f"module.{k}": v for k, v in ours["state_dict"].items()}},
                   out / f"checkpoint{epoch}.pt")
    return out


SWEEP = [*DATA, "--ks", "2,3", "--bn-batches", "0", "--train-eval-subset", "256", "-b", "64",
         "--eval-batch-size", "100", "-j", "0"]


@pytest.fixture(scope="module")
def published_results(published) -> pd.DataFrame:
    run("evaluate_lawa.py", *SWEEP, "--ckpt-dir", str(published))
    return lawa_utils.read_results(published / "results.csv")


def test_training_writes_a_checkpoint_per_epoch_args_and_a_tidy_log(trajectory):
    assert sorted(p.name for p in trajectory.iterdir()) == [
        "args.json", "checkpoint1.pt", "checkpoint2.pt", "checkpoint3.pt", "log.csv"]
    ckpt = torch.load(trajectory / "checkpoint2.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["arch"] == ARCH
    assert {"optimizer", "scheduler", "rng", "wall_seconds"} <= set(ckpt)
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    torchvision.models.get_model(ARCH, num_classes=10).load_state_dict(ckpt["state_dict"])

    record = json.loads((trajectory / "args.json").read_text())
    assert {"command", "git_sha", "versions", "hardware"} <= set(record)
    assert record["args"]["arch"] == ARCH and record["args"]["train_subset"] == 256

    log = lawa_utils.read_results(trajectory / "log.csv")
    assert list(log.columns) == lawa_utils.RESULT_COLUMNS
    assert len(log) == 3 * 2 * 3  # epochs × splits × metrics
    assert set(log["method"]) == {"baseline"} and set(log["k"]) == {1} and set(log["seed"]) == {0}
    assert set(log["optimizer"]) == {"lookahead"}
    assert set(zip(log["split"], log["metric"], strict=True)) == {
        (s, m) for s in ("train", "val") for m in ("loss", "acc1", "acc5")}
    wall = log.groupby("epoch")["wall_seconds"].first()
    assert wall.is_monotonic_increasing and wall.iloc[0] > 0


def test_resume_logs_the_same_numbers_as_an_uninterrupted_run(trajectory, tmp_path):
    # The run "died" after epoch 1's checkpoint but with later log rows already written: the resume must
    # cut the log back and then reproduce epochs 2-3 exactly (CPU, same seed).
    for name in ("checkpoint1.pt", "args.json", "log.csv"):
        shutil.copy(trajectory / name, tmp_path / name)
    proc = run("main.py", *TRAIN, "--epochs", "3", "--save-dir", str(tmp_path), *LOOKAHEAD,
               "--resume", str(tmp_path / "checkpoint1.pt"))
    assert "resumed from" in proc.stdout
    pd.testing.assert_frame_equal(without_wall(lawa_utils.read_results(tmp_path / "log.csv")),
                                  without_wall(lawa_utils.read_results(trajectory / "log.csv")))
    resumed = torch.load(tmp_path / "checkpoint3.pt", weights_only=True)
    uninterrupted = torch.load(trajectory / "checkpoint3.pt", weights_only=True)
    for key, value in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert len(json.loads((tmp_path / "args.json").read_text())["previous"]) == 1


def test_sweep_reads_the_published_format_and_skips_done_cells_on_rerun(trajectory, published, published_results):
    cells = set(zip(published_results["method"], published_results["k"], published_results["epoch"], strict=True))
    assert cells == {("baseline", 1, 1), ("baseline", 1, 2), ("baseline", 1, 3),
                     ("lawa", 2, 2), ("lawa", 2, 3), ("lawa", 3, 3)}
    assert len(published_results) == 6 * 6
    # The baseline rows are the trainer's own validation numbers: the `module.` weights were loaded.
    val = lambda df: df[(df["split"] == "val") & (df["method"] == "baseline")].set_index(["epoch", "metric"])["value"]
    trainer = val(lawa_utils.read_results(trajectory / "log.csv"))
    pd.testing.assert_series_equal(val(published_results).sort_index(), trainer.sort_index(), rtol=1e-5)

    before = (published / "results.csv").read_bytes()
    proc = run("evaluate_lawa.py", *SWEEP, "--ckpt-dir", str(published))
    assert "already" in proc.stderr
    assert (published / "results.csv").read_bytes() == before


def test_one_sweep_cell_equals_averaging_bn_recompute_and_evaluation_by_hand(published, published_results):
    common = load_script("common")
    data = common.build_datasets("fashion-mnist", image_size=16, train_subset=256, val_subset=256)
    states = [torch.load(published / f"checkpoint{e}.pt", weights_only=True)["state_dict"] for e in (2, 3)]
    averaged = {k.removeprefix("module."): (v + states[0][k]) / 2 if v.is_floating_point() else v
                for k, v in states[1].items()}
    model = torchvision.models.get_model(ARCH, num_classes=10)
    model.load_state_dict(averaged)
    bn_batches = torch.utils.data.DataLoader(data.train, batch_size=64, drop_last=True)  # a full pass
    torch.optim.swa_utils.update_bn(bn_batches, model)
    model.eval()
    cell = published_results[(published_results["method"] == "lawa") & (published_results["k"] == 2)
                             & (published_results["epoch"] == 3)].set_index(["split", "metric"])["value"]
    for split, dataset in (("train", data.train_eval), ("val", data.val)):
        with torch.no_grad():
            images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
            logits = model(torch.stack(images))
        labels = torch.stack(labels)
        assert cell[split, "loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-4)
        one_image = 100 / len(labels)  # channels_last convolutions round differently: allow one flip
        assert cell[split, "acc1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item(),
                                                    abs=one_image + 1e-9)


def test_lookahead_moves_slow_weights_a_fraction_alpha_towards_the_fast_ones_every_k_steps(trainer):
    # Constant gradient g=1, plain SGD with lr 0.1: after k=5 fast steps θ = θ0 − 0.5; the slow weights
    # move α=0.8 of the way, φ = θ0 − 0.4, and the fast weights restart from them.
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.zeros(1))
    flags = ["--optimizer", "lookahead", "--lr", "0.1", "--momentum", "0", "--wd", "0"]  # default α=0.8, k=5
    optimizer = trainer.build_optimizer(model, trainer.get_args_parser().parse_args(flags))
    for expected in [-0.1, -0.2, -0.3, -0.4, -0.4, -0.5]:
        model.weight.grad = torch.ones(1)
        optimizer.step()
        assert model.weight.item() == pytest.approx(expected)


@pytest.fixture(scope="module")
def evaluate_lawa():
    return load_script("evaluate_lawa")


@pytest.fixture(scope="module")
def trainer():
    return load_script("main")


def test_sweep_reproduces_the_reference_values_of_a_synthetic_trajectory(evaluate_lawa, tmp_path):
    # Every method on checkpoints drawn from a seeded generator; tests/data holds what the sweep computed on
    # them before it was built on lawa_sweep (same flags, one thread).
    run_dir = write_image_run(tmp_path / "run", ARCH, epochs=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        evaluate_lawa.main(["fashion-mnist", "--image-size", "16", "--train-subset", "256", "--val-subset", "128",
                            "--ckpt-dir", str(run_dir), "--method", "uni,exp,ema,swa,ewa", "--ks", "2,3",
                            "--decays", "0.5", "--swa-starts", "2", "--spacing", "2", "--bn-batches", "2",
                            "--train-eval-subset", "0", "-b", "32", "--eval-batch-size", "64", "-j", "0",
                            "--out", str(tmp_path / "results.csv")])
    finally:
        torch.set_num_threads(threads)
    assert_matches_reference(lawa_utils.read_results(tmp_path / "results.csv"), "imagenet")


def one_line_error(capsys, entry, argv, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        entry(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_a_checkpoint_missing_inside_a_window_is_named(published, tmp_path, capsys, evaluate_lawa):
    for epoch, source in ((1, 1), (2, 2), (4, 3)):  # saved every epoch, but for epoch 3
        (tmp_path / f"checkpoint{epoch}.pt").symlink_to(published / f"checkpoint{source}.pt")
    one_line_error(capsys, evaluate_lawa.main, [*SWEEP, "--ckpt-dir", str(tmp_path), "--ks", "2"],
                   "checkpoint3.pt is missing", "window of k=2 ending at checkpoint4.pt")


@pytest.mark.parametrize("ks, fragment", [("2,x", "comma-separated integers"), ("1,2", "≥ 2"),
                                          ("2,9", "k=9 is larger than the trajectory")])
def test_bad_window_sizes_are_refused(published, capsys, evaluate_lawa, ks, fragment):
    one_line_error(capsys, evaluate_lawa.main, [*DATA, "--ckpt-dir", str(published), "--ks", ks], fragment)


def test_bad_sweep_inputs_are_refused(published, tmp_path, capsys, evaluate_lawa):
    one_line_error(capsys, evaluate_lawa.main, [*SWEEP, "--ckpt-dir", str(tmp_path)],
                   "has no checkpoints in a layout LAWA knows")
    one_line_error(capsys, evaluate_lawa.main, [*SWEEP, "--ckpt-dir", str(published), "--epochs", "7"],
                   "checkpoint7.pt does not exist")
    one_line_error(capsys, evaluate_lawa.main, ["/no/such/data", "--ckpt-dir", str(published), "--ks", "2"],
                   "/no/such/data/train is not a directory")


def test_missing_data_says_how_to_get_it(tmp_path, capsys, monkeypatch, trainer):
    monkeypatch.setattr(trainer.common, "FASHION_MNIST_DIR", tmp_path)
    one_line_error(capsys, trainer.main, [*TRAIN, "--save-dir", str(tmp_path / "run")],
                   "Fashion-MNIST is missing", "apt-get install dataset-fashion-mnist")
    proc = run("main.py", "/no/such/imagenet", "--save-dir", str(tmp_path / "run"), expect=2)
    assert proc.stderr.strip() == ("main.py: error: /no/such/imagenet/train is not a directory: DATA must be an "
                                   "ImageFolder root with train/ and val/ (ImageNet: see imagenet/README.md), or "
                                   "'fashion-mnist'")


def test_training_refuses_to_overwrite_a_run_without_resume_or_force(trajectory, tmp_path, capsys, trainer):
    one_line_error(capsys, trainer.main, [*TRAIN, "--epochs", "1", "--save-dir", str(trajectory)],
                   "already holds checkpoint1.pt", "--resume")
    one_line_error(capsys, trainer.main, [*TRAIN, "--save-dir", str(tmp_path), "--resume", str(tmp_path / "no.pt")],
                   "no such checkpoint")



# ---------------------------------------------------------------- other averaging methods (lawa_methods)

# SWEEP without --ks: the flags every method shares.
METHOD_SWEEP = [*DATA, "--bn-batches", "0", "--train-eval-subset", "256", "-b", "64", "--eval-batch-size", "100",
                "-j", "0"]


def cell(df: pd.DataFrame, method: str, k: int, epoch: int) -> pd.Series:
    rows = df[(df["method"] == method) & (df["k"] == k) & (df["epoch"] == epoch)]
    return rows.set_index(["split", "metric"])["value"].sort_index()


@pytest.fixture(scope="module")
def method_results(published, published_results, evaluate_lawa, tmp_path_factory) -> pd.DataFrame:
    """SWA, EMA and EWA sweeps over the published-format trajectory into one new CSV, in this process with one
    thread as the subprocess sweeps of `published_results` (the same rounding: cells can be compared)."""
    out = tmp_path_factory.mktemp("methods") / "results.csv"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for flags in (["--method", "swa", "--swa-starts", "2"], ["--method", "ema", "--decays", "0.5"],
                      ["--method", "ewa", "--ks", "2", "--spacing", "2"]):
            evaluate_lawa.main([*METHOD_SWEEP, "--ckpt-dir", str(published), "--out", str(out), *flags])
    finally:
        torch.set_num_threads(threads)
    return lawa_utils.read_results(out)


def test_method_sweeps_write_their_labels_and_the_baseline_once(method_results):
    cells = sorted(set(zip(method_results["method"], method_results["k"], method_results["epoch"], strict=True)))
    # SWA from 2 at E=2 is one checkpoint (k=1) yet an swa row; EMA's k is 1/(1−d); EWA s=2, k=2 ends at 3.
    assert cells == [("baseline", 1, 1), ("baseline", 1, 2), ("baseline", 1, 3), ("ema", 2, 1), ("ema", 2, 2),
                     ("ema", 2, 3), ("ewa-s2", 2, 3), ("swa", 1, 2), ("swa", 2, 3)]
    assert len(method_results) == len(cells) * 6  # the baseline was written by the first sweep only


def test_swa_and_ema_cells_equal_the_lawa_cells_of_the_same_weights(method_results, published_results):
    # SWA from 2 at E=3 and EMA d=0.5 at E=2 are the mean of two checkpoints, as LAWA k=2 at E=3 and E=2.
    pd.testing.assert_series_equal(cell(method_results, "swa", 2, 3), cell(published_results, "lawa", 2, 3))
    ema, lawa = cell(method_results, "ema", 2, 2), cell(published_results, "lawa", 2, 2)  # 0.5·θ1 + 0.5·θ2 rounds
    for split in ("train", "val"):                                                       # differently from (θ1+θ2)/2
        assert ema[split, "loss"] == pytest.approx(lawa[split, "loss"], rel=1e-4)
        assert ema[split, "acc1"] == pytest.approx(lawa[split, "acc1"], abs=100 / 256 + 1e-9)
    # SWA at its start is the checkpoint itself, evaluated with BatchNorm recomputed like every averaged cell.
    assert not cell(method_results, "swa", 1, 2).equals(cell(method_results, "baseline", 1, 2))


def test_method_sweep_reruns_skip_done_cells_and_redo_torn_ones(method_results, published, evaluate_lawa, tmp_path,
                                                                capsys):
    out = tmp_path / "results.csv"
    torn = (method_results["method"] == "swa") & (method_results["epoch"] == 3) & (
        method_results["split"] == "val") & (method_results["metric"] == "acc5")
    method_results[~torn].to_csv(out, index=False)  # the swa E=3 cell lost its last row: a sweep killed mid-cell
    evaluate_lawa.main([*METHOD_SWEEP, "--ckpt-dir", str(published), "--out", str(out), "--method", "swa",
                        "--swa-starts", "2"])
    assert "1 cells in" in capsys.readouterr().err
    again = lawa_utils.read_results(out)
    assert len(again) == len(method_results) - 1 + 6
    evaluate_lawa.main([*METHOD_SWEEP, "--ckpt-dir", str(published), "--out", str(out), "--method", "ema",
                        "--decays", "0.5"])
    assert "all ema" in capsys.readouterr().err and len(lawa_utils.read_results(out)) == len(again)


def test_several_methods_in_one_process_write_the_cells_of_separate_sweeps(method_results, published,
                                                                          evaluate_lawa, tmp_path, capsys):
    out = tmp_path / "results.csv"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as method_results: the same rounding
    try:
        evaluate_lawa.main([*METHOD_SWEEP, "--ckpt-dir", str(published), "--out", str(out), "--method", "swa,ema,ewa",
                            "--swa-starts", "2", "--decays", "0.5", "--ks", "2", "--spacing", "2"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr()
    assert "9 cells in" in printed.err
    assert "swa and the baseline" in printed.out and "ewa-s2 and the baseline" in printed.out
    key = ["method", "k", "epoch", "split", "metric"]
    together = lawa_utils.read_results(out).sort_values(key).reset_index(drop=True)
    separate = method_results.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(together[key + ["value"]], separate[key + ["value"]])


@pytest.mark.parametrize("flags, fragment", [
    (["--method", "uni,sma"], "--method uni,sma: unknown method 'sma'; choose from uni, exp, ema, swa, ewa"),
    (["--method", "ema,swa", "--decays", "0.5", "--swa-starts", "2", "--spacing", "2"],
     "--spacing applies to --method ewa, not ema,swa"),
    (["--method", "ema,swa", "--decays", "0.5"], "--method swa needs --swa-starts"),
    (["--method", "swa", "--decays", "0.5"], "--decays applies to --method ema, not swa"),
    (["--method", "uni", "--alpha", "0.5"], "--alpha applies to --method exp, not uni"),
    (["--method", "ema", "--ks", "2"], "--ks applies to --method uni or exp or ewa, not ema"),
    (["--method", "ema"], "--method ema needs --decays, e.g. --decays 0.5,0.75"),
    (["--method", "ewa", "--ks", "2"], "--method ewa needs --spacing"),
    (["--method", "ema", "--decays", "0.5,x"], "--decays must be comma-separated numbers"),
    (["--method", "ema", "--decays", "1"], "EMA decay must be in [0, 1), got 1.0"),
    (["--method", "swa", "--swa-starts", "5"], "checkpoint5.pt does not exist"),
])
def test_bad_method_flags_are_refused_in_one_line(published, capsys, evaluate_lawa, flags, fragment):
    one_line_error(capsys, evaluate_lawa.main, [*DATA, "--ckpt-dir", str(published), *flags], fragment)


def test_both_commands_read_the_trajectory_flags_from_args_json_unless_given(trajectory, tmp_path, evaluate_lawa):
    common, train_twa = load_script("common"), load_script("train_twa")
    for parser, extra in ((evaluate_lawa.get_args_parser(), []), (train_twa.get_args_parser(), ["--range", "1:2"])):
        args = common.parse_trajectory_args(parser, ["fashion-mnist", "--ckpt-dir", str(trajectory), *extra,
                                                     "--image-size", "20"])
        assert (args.arch, args.image_size, args.train_subset, args.optimizer, args.batch_size) == (
            ARCH, 20, 256, "lookahead", 64)
    (tmp_path / "args.json").write_text("{not json")
    with pytest.raises(lawa_utils.LawaError, match="args.json is not the JSON record main.py writes"):
        common.trajectory_defaults(tmp_path)
