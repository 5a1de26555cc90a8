"""imagenet/ under faults: the trainer and the sweep killed with SIGKILL at random seeded moments and resumed,
determinism on CPU, untrusted checkpoints, and the bad inputs tests/test_imagenet.py does not already try.

The tiny run is tests/test_imagenet.py's (mobilenet_v3_small, 16×16 Fashion-MNIST, 256 images, Lookahead),
for 6 epochs. An uninterrupted reference run trains in the background while a second run in another
directory is killed 10 times, each time resumed from its newest checkpoint; at the end both logs and all
checkpoints must be equal (wall_seconds aside). RELIABILITY.md records the trials and their outcomes.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torchvision
from test_imagenet import ARCH, IMAGENET, LOOKAHEAD, REPO, SWEEP, TRAIN, load_script, one_line_error, without_wall
from test_lawa_utils import _RunsCode
from test_reliability import kill_9, one_error_line, wait_until

import lawa_utils as lu

EPOCHS = 6
# -p 1 prints every training step (4 an epoch), so that a kill can be aimed at a step of a given epoch.
CHAIN = [*TRAIN, *LOOKAHEAD, "--epochs", str(EPOCHS), "-p", "1"]
# The 10 kill moments, in an order shuffled by the seed; each aims at an epoch the process has not finished,
# so the run never completes between kills:
#   startup   0-2.5 s after launch: imports, data, args.json and the log cut back to the resumed epoch
#   training  a random training step of the epoch
#   logged    as soon as the epoch's log rows are written: before or during its checkpoint write
#   writing   while checkpoint{E}.pt's temporary file is being written, before the rename
KILLS = ["startup"] * 2 + ["training"] * 2 + ["logged"] * 2 + ["writing"] * 4
SWEEP_FAST = [*SWEEP, "--bn-batches", "2", "--train-eval-subset", "64"]
# The sweep's cells over the 6-epoch run with --ks 2,3: (method, k, E).
SWEEP_CELLS = {("lawa", k, e) for k in (2, 3) for e in range(k, EPOCHS + 1)} | {
    ("baseline", 1, e) for e in range(1, EPOCHS + 1)}


def start(script: str, *args: str, stdout: Path) -> subprocess.Popen:
    """Launch imagenet/<script> as tests/test_imagenet.py's run() does (one OpenMP thread), output to a file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(stdout, "w") as f:
        return subprocess.Popen([sys.executable, str(IMAGENET / script), *args], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, stdout: Path, timeout: float = 600) -> None:
    assert proc.wait(timeout=timeout) == 0, stdout.read_text()[-3000:]


def checkpoints(run_dir: Path) -> dict[int, Path]:
    return lu.find_checkpoints(run_dir) if any(run_dir.glob("checkpoint*.pt")) else {}


def logged_epochs(log: Path) -> set[int]:
    lines = log.read_text().splitlines()[1:] if log.exists() else []
    return {int(line.split(",")[2]) for line in lines if line.count(",") == len(lu.RESULT_COLUMNS) - 1}


def resume_flags(run_dir: Path) -> list[str]:
    newest = max(checkpoints(run_dir), default=0)
    return ["--resume", str(run_dir / f"checkpoint{newest}.pt")] if newest else []


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run, started in the background: (process, run dir, stdout file)."""
    folder = tmp_path_factory.mktemp("reference")
    proc = start("main.py", *CHAIN, "--save-dir", str(folder / "run"), stdout=folder / "stdout.txt")
    yield proc, folder / "run", folder / "stdout.txt"
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def reference(reference_run) -> Path:
    proc, run_dir, stdout = reference_run
    finish(proc, stdout)
    return run_dir


def assert_everything_present_loads(run_dir: Path) -> None:
    for epoch, path in checkpoints(run_dir).items():
        ckpt = lu.load_checkpoint(path)
        assert ckpt["epoch"] == epoch, path
        lu.split_checkpoint(ckpt, str(path))  # holds the model's weights
    if (run_dir / "log.csv").exists():
        lu.read_results(run_dir / "log.csv")  # whole lines of the tidy schema


def assert_same_checkpoints(run_dir: Path, reference: Path) -> None:
    assert sorted(checkpoints(run_dir)) == list(range(1, EPOCHS + 1))
    for epoch in range(1, EPOCHS + 1):
        ours = lu.load_checkpoint(run_dir / f"checkpoint{epoch}.pt")["state_dict"]
        theirs = lu.load_checkpoint(reference / f"checkpoint{epoch}.pt")["state_dict"]
        assert list(ours) == list(theirs)
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), (epoch, key)


def test_trainer_killed_10_times_resumes_to_the_uninterrupted_runs_logs_and_weights(reference_run, tmp_path):
    rng = random.Random(2022)
    kills = KILLS.copy()
    rng.shuffle(kills)
    run_dir, log = tmp_path / "run", tmp_path / "run" / "log.csv"
    trace = []
    for cycle, kind in enumerate(kills):
        newest = max(checkpoints(run_dir), default=0)
        offset = rng.choice([1, 2]) if newest + 2 <= EPOCHS else 1
        epoch = newest + offset  # the epoch the kill aims at
        if kind == "startup" and newest == EPOCHS - 1:
            kind = "training"  # one epoch left: a timed kill could come after the run's end
        out = tmp_path / f"stdout{cycle}.txt"
        proc = start("main.py", *CHAIN, "--save-dir", str(run_dir), *resume_flags(run_dir), stdout=out)
        step = rng.randint(1, 4)
        if kind == "startup":
            time.sleep(rng.uniform(0.0, 2.5))
        elif kind == "training":
            wait_until(proc, lambda out=out, epoch=epoch, step=step: f"Epoch: [{epoch - 1}][{step}/" in out.read_text())
        elif kind == "logged":
            wait_until(proc, lambda out=out, epoch=epoch: f"Epoch: [{epoch - 1}][" in out.read_text()
                       and epoch in logged_epochs(log))
        else:
            wait_until(proc, (run_dir / f".checkpoint{epoch}.pt.tmp{proc.pid}").exists)
        mid_write = any(run_dir.glob(f".checkpoint*.pt.tmp{proc.pid}"))
        killed = kill_9(proc)
        trace.append((kind, newest, epoch, killed, mid_write))
        assert killed, f"cycle {cycle} finished before its kill: {trace}\n{out.read_text()[-2000:]}"
        assert_everything_present_loads(run_dir)
    print("trainer kills (moment, newest checkpoint, aimed epoch, killed, mid-write):", trace)  # for pytest -s
    assert sum(mid_write for *_, mid_write in trace) >= 3, trace
    assert len({newest for _, newest, *_ in trace}) >= 2, trace  # resumed from several epochs

    out = tmp_path / "stdout-final.txt"
    finish(start("main.py", *CHAIN, "--save-dir", str(run_dir), *resume_flags(run_dir), stdout=out), out)
    assert not list(run_dir.glob(".checkpoint*.tmp*"))  # the killed writers' temporaries were cleaned up
    reference_proc, reference_dir, reference_out = reference_run
    finish(reference_proc, reference_out)
    pd.testing.assert_frame_equal(without_wall(lu.read_results(log)),
                                  without_wall(lu.read_results(reference_dir / "log.csv")), check_exact=True)
    assert_same_checkpoints(run_dir, reference_dir)


def whole_cells(out: Path) -> int:
    """Complete cells in a results CSV, checking that it holds only whole lines and whole cells."""
    if not out.exists():
        return 0
    text = out.read_text()
    assert text.endswith("\n"), text[-300:]
    rows = text.splitlines()[1:]
    assert all(row.count(",") == len(lu.RESULT_COLUMNS) - 1 for row in rows)
    assert len(rows) % 6 == 0, rows[-6:]  # (train, val) × (loss, acc1, acc5) per cell
    return len(rows) // 6


def test_sweep_killed_mid_way_reruns_to_every_cell_once_equal_to_an_uninterrupted_sweep(reference, tmp_path):
    uninterrupted, out = tmp_path / "uninterrupted.csv", tmp_path / "results.csv"
    sweep = [*SWEEP_FAST, "--ckpt-dir", str(reference)]
    reference_sweep = start("evaluate_lawa.py", *sweep, "--out", str(uninterrupted), stdout=tmp_path / "ref.txt")
    rng = random.Random(5)
    moments = [("startup", rng.uniform(0.0, 3.0)), ("cells", rng.randint(2, len(SWEEP_CELLS) - 5))]
    done = []
    for i, (kind, value) in enumerate(moments):
        proc = start("evaluate_lawa.py", *sweep, "--out", str(out), stdout=tmp_path / f"sweep{i}.txt")
        if kind == "startup":
            time.sleep(value)
        else:
            wait_until(proc, lambda value=value: whole_cells(out) >= value)
            time.sleep(rng.uniform(0.0, 0.1))  # into the next cell: BN recompute, evaluation or the append
        assert kill_9(proc), (tmp_path / f"sweep{i}.txt").read_text()[-2000:]
        done.append(whole_cells(out))
    print("imagenet sweep: whole cells in the CSV after each kill:", done)
    assert done[-1] < len(SWEEP_CELLS), done
    finish(start("evaluate_lawa.py", *sweep, "--out", str(out), stdout=tmp_path / "rerun.txt"), tmp_path / "rerun.txt")

    whole_cells(out)
    results = lu.read_results(out)
    assert not results.duplicated(["method", "k", "epoch", "split", "metric"]).any()
    assert set(zip(results["method"], results["k"], results["epoch"], strict=True)) == SWEEP_CELLS
    finish(reference_sweep, tmp_path / "ref.txt")
    # Determinism: cells computed by three processes equal one uninterrupted sweep's, bit for bit and in order.
    pd.testing.assert_frame_equal(results, lu.read_results(uninterrupted), check_exact=True)


# --------------------------------------------------------------------------------------------------
# Untrusted and bad input
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluate_lawa():
    return load_script("evaluate_lawa")


@pytest.fixture(scope="module")
def trainer():
    return load_script("main")


def trajectory_with(reference: Path, folder: Path, epoch: int, write) -> Path:
    """Checkpoints 1..3 of the reference run, with checkpoint{epoch}.pt replaced by ``write(path)``'s file."""
    folder.mkdir()
    for e in (1, 2, 3):
        if e != epoch:
            (folder / f"checkpoint{e}.pt").symlink_to(reference / f"checkpoint{e}.pt")
    write(folder / f"checkpoint{epoch}.pt")
    return folder


def with_payload(reference: Path, epoch: int, marker: Path):
    def write(path: Path) -> None:
        ckpt = torch.load(reference / f"checkpoint{epoch}.pt", weights_only=True)
        torch.save({**ckpt, "payload": _RunsCode(marker)}, path)
    return write


def test_untrusted_checkpoint_is_refused_by_the_sweep_and_the_trainer_and_runs_no_code(
        reference, tmp_path, capsys, evaluate_lawa, trainer):
    marker = tmp_path / "pwned"
    folder = trajectory_with(reference, tmp_path / "traj", 2, with_payload(reference, 2, marker))
    evil = folder / "checkpoint2.pt"
    # The sweep reads the weights through lawa_utils' inert unpickler: the payload's code never runs.
    evaluate_lawa.main([*SWEEP, "--ckpt-dir", str(folder), "-a", ARCH, "--ks", "2"])
    assert not marker.exists() and (folder / "results.csv").exists()
    capsys.readouterr()  # the sweep's progress and summary
    run = tmp_path / "run"
    one_line_error(capsys, trainer.main, [*TRAIN, *LOOKAHEAD, "--epochs", "2", "--save-dir", str(run),
                                          "--resume", str(evil)], f"{evil} was refused", "--trust-checkpoints")
    assert not marker.exists() and not run.exists()
    # The opt-in the message names exists: with it the file is unpickled (its code runs) and training resumes.
    trainer.main([*TRAIN, *LOOKAHEAD, "--epochs", "2", "--save-dir", str(run), "--resume", str(evil),
                  "--trust-checkpoints"])
    assert marker.exists() and (run / "args.json").exists()


def test_safetensors_inputs_need_no_trust(reference, tmp_path):
    for e in (1, 2):  # the trainer's checkpoints converted by the CLI (a window of one)
        assert lu.main(["average", "--files", str(reference / f"checkpoint{e}.pt"),
                        "--out", str(tmp_path / f"e{e}.safetensors")]) == 0
    out = tmp_path / "avg.safetensors"
    assert lu.main(["average", "--files", str(tmp_path / "e1.safetensors"), str(tmp_path / "e2.safetensors"),
                    "--out", str(out)]) == 0
    torchvision.models.get_model(ARCH, num_classes=10).load_state_dict(lu.load_model_state(out))


def truncated(reference: Path):
    return lambda path: path.write_bytes((reference / "checkpoint2.pt").read_bytes()[:100_000])


def nan_weights(reference: Path):
    def write(path: Path) -> None:
        ckpt = torch.load(reference / "checkpoint2.pt", weights_only=True)
        ckpt["state_dict"]["features.0.0.weight"][0, 0, 0, 0] = float("nan")
        torch.save(ckpt, path)
    return write


def other_model(path: Path) -> None:
    torch.save({"epoch": 2, "arch": ARCH, "state_dict": torchvision.models.get_model(ARCH, num_classes=5).state_dict()},
               path)


BAD_TRAJECTORIES = {
    "truncated": (truncated, "checkpoint2.pt is not a readable PyTorch checkpoint, or is truncated"),
    "not a checkpoint": (lambda ref: lambda path: path.write_text("epoch,acc1\n2,50.0\n"),
                         "checkpoint2.pt is not a readable PyTorch checkpoint"),
    "nan": (nan_weights, "checkpoint2.pt: tensor 'features.0.0.weight' has NaN/Inf values"),
    "other model": (lambda ref: other_model, "mismatched shapes for 'classifier.3.weight'"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAJECTORIES))
def test_sweep_over_a_bad_checkpoint_names_it_in_one_line_and_writes_no_rows(reference, tmp_path, capsys,
                                                                             evaluate_lawa, case):
    make, fragment = BAD_TRAJECTORIES[case]
    folder = trajectory_with(reference, tmp_path / "traj", 2, make(reference))
    one_error_line(capsys, evaluate_lawa.main, [*SWEEP, "--ckpt-dir", str(folder), "-a", ARCH, "--ks", "2"], fragment)
    # The cells finished before the bad file was reached (the baseline of epoch 1) are whole rows; none after it.
    if (folder / "results.csv").exists():
        assert set(lu.read_results(folder / "results.csv")["epoch"]) <= {1}


def test_sweep_refuses_an_out_file_that_is_not_a_results_csv_and_leaves_it_as_it_was(reference, tmp_path, capsys,
                                                                                     evaluate_lawa):
    out = tmp_path / "notes.csv"
    out.write_text("name,score\nmine,1\n")
    one_line_error(capsys, evaluate_lawa.main, [*SWEEP, "--ckpt-dir", str(reference), "--out", str(out)],
                   f"{out}: missing column(s)")
    assert out.read_text() == "name,score\nmine,1\n"
    one_line_error(capsys, evaluate_lawa.main, [*SWEEP, "--ckpt-dir", str(tmp_path / "nowhere")],
                   "nowhere does not exist")


def test_trainer_resume_from_a_truncated_checkpoint_names_it_and_writes_nothing(reference, tmp_path, capsys,
                                                                                 trainer):
    broken = tmp_path / "checkpoint2.pt"
    truncated(reference)(broken)
    run = tmp_path / "run"
    one_line_error(capsys, trainer.main, [*TRAIN, *LOOKAHEAD, "--epochs", "3", "--save-dir", str(run),
                                          "--resume", str(broken)], f"{broken} is not a readable PyTorch checkpoint")
    assert not run.exists()


def test_save_dir_of_a_run_killed_before_its_first_checkpoint_is_reused_without_duplicate_rows(reference, tmp_path,
                                                                                                trainer):
    # Such a directory holds args.json and perhaps log rows but no checkpoint: nothing to resume or to lose.
    run = tmp_path / "run"
    run.mkdir()
    for name in ("args.json", "log.csv"):
        (run / name).write_bytes((reference / name).read_bytes())
    trainer.main([*TRAIN, *LOOKAHEAD, "--epochs", "1", "--save-dir", str(run)])
    log = lu.read_results(run / "log.csv")
    assert set(log["epoch"]) == {1} and len(log) == 6 and (run / "checkpoint1.pt").exists()


def test_truncated_dataset_file_is_named_in_one_line(tmp_path, capsys, monkeypatch, trainer):
    source = trainer.common.FASHION_MNIST_DIR
    for name in os.listdir(source):
        (tmp_path / name).symlink_to(source / name)
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes((source / "train-images-idx3-ubyte.gz").read_bytes()[:5000])
    monkeypatch.setattr(trainer.common, "FASHION_MNIST_DIR", tmp_path)
    one_line_error(capsys, trainer.main, [*TRAIN, "--save-dir", str(tmp_path / "run")],
                   "train-images-idx3-ubyte.gz")
    assert not (tmp_path / "run").exists()
