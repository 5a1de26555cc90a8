"""bert/: data preparation, tiny fairseq training, the safe-loading plugin, the one-process sweep.

Fixtures are built here from slices of Penn Treebank (the `treebank` package) and a stand-in GPT-2 BPE; the
model is train.sh's tiny preset on 200 sentences, two epochs, shared by the whole session.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BERT = REPO / "bert"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(BERT))

import evaluate_lawa  # noqa: E402  (bert/ is not a package: its scripts import each other by name)
from log_to_csv import parse_fairseq_log  # noqa: E402
from synthetic_trajectory import assert_matches_reference, write_fairseq_run  # noqa: E402

import lawa_utils  # noqa: E402

# The tiny preset with 8 sequences per forward pass and 2 passes per update, so that 2 gloo ranks of 8 make
# the same updates; no dropout, so that the two runs must agree to rounding.
TRAIN_ENV = {"MAX_EPOCH": "2", "BATCH_SIZE": "8", "SEQS_PER_UPDATE": "16", "WARMUP": "10"}
NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0"]


def run(cmd, env=None, check=True, cwd=REPO):
    proc = subprocess.run([str(c) for c in cmd], env={**os.environ, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def ptb(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("bert") / "data-bin"
    run(["bash", BERT / "prepare_data.sh"],
        {"DATA_DIR": str(data), "PTB_TRAIN_LINES": "200", "PTB_VALID_LINES": "48"})
    return data


@pytest.fixture(scope="session")
def trained(ptb, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("bert") / "run"
    run(["bash", BERT / "train.sh", *NO_DROPOUT], {**TRAIN_ENV, "DATA": str(ptb), "SAVE_DIR": str(save)})
    return save


def model_state(path: Path) -> dict:
    return lawa_utils.load_model_state(path)


def test_prepare_data_ptb_writes_fairseq_binaries_and_reuses_them(ptb):
    for name in ("dict.txt", "train.bin", "train.idx", "valid.bin", "valid.idx", "test.bin", "test.idx"):
        assert (ptb / name).is_file(), name
    assert len((ptb / "text" / "train.txt").read_text().splitlines()) == 200
    assert len((ptb / "text" / "valid.txt").read_text().splitlines()) == 48
    assert "<unk>" in (ptb / "text" / "train.txt").read_text()  # PTB's <unk> becomes fairseq's own <unk>:
    assert "<unk>" not in (ptb / "dict.txt").read_text()           # a built-in symbol, not a dictionary entry
    again = run(["bash", BERT / "prepare_data.sh"],
                {"DATA_DIR": str(ptb), "PTB_TRAIN_LINES": "200", "PTB_VALID_LINES": "48"})
    assert "up to date" in again.stdout


def write_stand_in_gpt2_bpe(folder: Path) -> dict[str, int]:
    """encoder.json / vocab.bpe / dict.txt in GPT-2's format, for ASCII text: printable characters map to
    themselves in GPT-2's byte-to-unicode table, the space byte to 'Ġ'. Merges make ' the' one token."""
    symbols = [chr(c) for c in range(33, 127)] + ["Ġ", "th", "the", "Ġthe"]
    encoder = {s: i for i, s in enumerate(symbols)}
    (folder / "encoder.json").write_text(json.dumps(encoder))
    (folder / "vocab.bpe").write_text("#version: 0.2\nt h\nth e\nĠ the\n")
    (folder / "dict.txt").write_text("".join(f"{i} 1\n" for i in range(len(symbols))))
    return encoder


def test_prepare_data_wikitext_encodes_with_the_users_gpt2_bpe(tmp_path):
    raw, out = tmp_path / "wikitext-103-raw", tmp_path / "data-bin"
    raw.mkdir()
    lines = [" = Valkyria = ", "", " the cat sat on the mat . ", " they thought the theory through . "]
    for split, n in (("train", 12), ("valid", 3), ("test", 3)):
        (raw / f"wiki.{split}.raw").write_text("\n".join(lines * n) + "\n")
    missing = run(["bash", BERT / "prepare_data.sh"], {"WIKITEXT": str(raw), "DATA_DIR": str(out)}, check=False)
    assert missing.returncode == 2 and "encoder.json" in missing.stderr and "GPT2_BPE" in missing.stderr
    encoder = write_stand_in_gpt2_bpe(raw)

    run(["bash", BERT / "prepare_data.sh"], {"WIKITEXT": str(raw), "DATA_DIR": str(out), "WORKERS": "1"})
    encoded = (out / "text" / "train.txt").read_text().splitlines()
    assert encoded[1] == ""  # --keep-empty keeps the document structure line for line
    ids = encoded[2].split()
    assert str(encoder["Ġthe"]) in ids and str(encoder["the"]) in ids  # the merges were applied
    assert (out / "dict.txt").read_text() == (raw / "dict.txt").read_text()  # the user's dict.txt is used
    assert (out / "train.bin").stat().st_size > 0 and (out / "valid.idx").is_file()


def test_prepare_data_names_what_to_provide(tmp_path):
    proc = run(["bash", BERT / "prepare_data.sh"], {"WIKITEXT": str(tmp_path / "nowhere")}, check=False)
    assert proc.returncode == 2 and "wiki.train.raw" in proc.stderr and "wikitext-103-raw" in proc.stderr


def test_tiny_training_writes_epoch_checkpoints_and_a_tidy_log(trained):
    for name in ("checkpoint1.pt", "checkpoint2.pt", "train.log", "args.json"):
        assert (trained / name).is_file(), name
    log = lawa_utils.read_results(trained / "log.csv")
    assert list(log.columns) == lawa_utils.RESULT_COLUMNS
    assert sorted(set(zip(log["epoch"], log["split"], strict=True))) == [(1, "train"), (1, "val"), (2, "train"),
                                                                         (2, "val")]
    assert set(log["method"]) == {"baseline"} and set(log["optimizer"]) == {"adam"}
    assert (log["wall_seconds"] > 0).all() and log["value"].between(1, 20).all()
    info = json.loads((trained / "args.json").read_text())
    assert "--keep-last-epochs -1" in info["command"] and info["versions"]["fairseq"] == "0.12.3.1"


def test_training_masks_change_every_epoch_with_dataloader_workers(trained, ptb):
    """fairseq-fixed 0.12.3.1 reuses one DataLoader with persistent workers across epochs; their dataset copies
    never see set_epoch(), so masked-LM masks freeze at epoch 1 unless train.sh's --update-epoch-batch-itr
    rebuilds the iterator each epoch. Checked here on fairseq's own iterator, as its trainer builds it, with a
    loader process (fairseq's default, train.sh on GPUs) and without (train.sh on the CPU: no 5 s shutdown
    stalls when the garbage collector reaches old iterators)."""
    from fairseq.tasks.masked_lm import MaskedLMConfig, MaskedLMTask

    command = json.loads((trained / "args.json").read_text())["command"]
    assert "--update-epoch-batch-itr" in command
    assert "--num-workers 0 " in command  # the tiny preset runs on the CPU
    task = MaskedLMTask.setup_task(MaskedLMConfig(data=str(ptb), tokens_per_sample=128,
                                                  sample_break_mode="complete", seed=1))
    task.load_dataset("train", epoch=1)

    def first_batch_masks(update_epoch_batch_itr: bool, num_workers: int) -> list:
        task.dataset_to_epoch_iter.clear()
        masks, itr = [], None
        for epoch in (1, 2):
            if itr is None or update_epoch_batch_itr:
                itr = task.get_batch_iterator(dataset=task.dataset("train"), max_sentences=8, seed=1, epoch=epoch,
                                              num_workers=num_workers, update_epoch_batch_itr=update_epoch_batch_itr)
            batches = list(itr.next_epoch_itr(shuffle=False))
            masks.append(batches[0]["target"].ne(task.source_dictionary.pad()).nonzero().tolist())
        return masks

    first, second = first_batch_masks(update_epoch_batch_itr=True, num_workers=1)
    assert first != second  # every epoch draws new masks, as RoBERTa's dynamic masking intends
    frozen = first_batch_masks(update_epoch_batch_itr=False, num_workers=1)
    assert frozen[0] == frozen[1]  # the fairseq behaviour the flag works around
    in_process = first_batch_masks(update_epoch_batch_itr=True, num_workers=0)
    assert in_process == [first, second]  # same masks as with a loader process: the same run either way


def test_fairseq_checkpoints_need_only_the_plugins_safe_globals(trained):
    """Without the plugin, safe loading refuses a fairseq checkpoint; with it nothing unsafe is left."""
    probe = (
        "import sys, torch\n"
        "path = sys.argv[1]\n"
        "print(torch.serialization.get_unsafe_globals_in_checkpoint(path))\n"
        "try:\n"
        "    torch.load(path, weights_only=True)\n"
        "except Exception as exc:\n"
        "    print('refused', type(exc).__name__)\n"
        "import lawa_plugin\n"
        "print(torch.serialization.get_unsafe_globals_in_checkpoint(path))\n"
        "print(torch.load(path, weights_only=True)['cfg']['task']['_name'])\n"
    )
    out = run([sys.executable, "-c", probe, trained / "checkpoint2.pt"], cwd=BERT).stdout.splitlines()
    assert out == ["['argparse.Namespace']", "refused UnpicklingError", "[]", "masked_lm"]


def test_log_to_csv_keeps_the_last_summary_of_each_epoch():
    lines = [
        'INFO | train_inner | {"epoch": 1, "update": 0.5, "loss": "12.0", "train_wall": "3", "wall": "4"}',
        '{"epoch": 1, "valid_loss": "10.5", "valid_ppl": "1448"}',
        '{"epoch": 1, "train_loss": "11.0", "train_train_wall": "9", "train_wall": "12"}',
        "{'common': {'seed': 1}}",
        '{"epoch": 1, "valid_loss": "10.25"}',  # a resumed run repeating epoch 1
        '{"epoch": 1, "train_loss": "10.75", "train_wall": "30"}',
    ]
    assert parse_fairseq_log(lines) == {1: {"val": 10.25, "train": 10.75, "wall": 30.0}}


def fairseq_validate(data: Path, checkpoint: Path) -> float:
    proc = run([BIN / "fairseq-validate", data, "--path", checkpoint, "--task", "masked_lm", "--batch-size", "16",
                "--skip-invalid-size-inputs-valid-test", "--user-dir", BERT / "lawa_plugin", "--cpu",
                "--log-format", "simple"])
    return float(re.search(r"valid on 'valid' subset \| loss ([\d.]+)", proc.stdout + proc.stderr).group(1))


def test_sweep_cell_equals_fairseq_validate_on_the_averaged_checkpoint(trained, ptb, tmp_path):
    averaged = tmp_path / "lawa2.pt"
    run([sys.executable, "-m", "lawa_utils", "average", "--dir", trained, "--end", "2", "--k", "2", "--out", averaged])
    reference = fairseq_validate(ptb, averaged)  # fairseq's own tool, safe loading on through the plugin

    out = tmp_path / "results.csv"
    evaluate_lawa.main(["--ckpt-dir", str(trained), "--ks", "2", "--out", str(out), "--train-batches", "2"])
    rows = lawa_utils.read_results(out).set_index(["method", "k", "epoch", "split"])["value"]
    assert abs(rows["lawa", 2, 2, "val"] - reference) <= 0.0005 + 1e-6  # fairseq prints 3 decimals
    log = lawa_utils.read_results(trained / "log.csv").set_index(["epoch", "split"])["value"]
    for epoch in (1, 2):  # the plain checkpoints: the loss fairseq-train logged for them
        assert abs(rows["baseline", 1, epoch, "val"] - log[epoch, "val"]) <= 0.0005 + 1e-6
    assert {split for (_, _, _, split) in rows.index} == {"val", "train"}

    again = subprocess.run([sys.executable, BERT / "evaluate_lawa.py", "--ckpt-dir", trained, "--ks", "2",
                            "--out", out, "--train-batches", "2"], capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0 and "already in" in again.stderr  # a rerun skips the cells done
    assert len(lawa_utils.read_results(out)) == len(rows)
    record = json.loads((tmp_path / "results.args.json").read_text())  # the run that computed cells
    assert len(record) == 1 and record[0]["args"]["ks"] == "2" and "fairseq" in record[0]["versions"]


def test_sweep_reproduces_the_reference_values_of_a_synthetic_trajectory(trained, ptb, tmp_path):
    # Synthetic weights in this run's configuration; tests/data holds what the sweep computed on them before it
    # was built on lawa_sweep.
    run_dir = write_fairseq_run(tmp_path / "run", trained / "checkpoint1.pt", epochs=4)
    evaluate_lawa.main([str(ptb), "--ckpt-dir", str(run_dir), "--method", "uni,ema,swa", "--ks", "2,3",
                        "--decays", "0.5", "--swa-starts", "2", "--train-batches", "2", "--cpu",
                        "--out", str(tmp_path / "results.csv")])
    assert_matches_reference(lawa_utils.read_results(tmp_path / "results.csv"), "bert")


def test_sweep_reads_paper_era_fp16_checkpoints_as_they_are(trained, tmp_path, ptb):
    """The published RoBERTa run trained with --fp16 and a patched fairseq: half-precision model tensors, a
    loss scale in the optimizer state, an extra ``avg`` config group. Such files are read as they are."""
    old = tmp_path / "paper_era"
    old.mkdir()
    for epoch in (1, 2):
        state = torch.load(trained / f"checkpoint{epoch}.pt", weights_only=False)
        state["model"] = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
        state["cfg"]["common"].update(fp16=True, wandb_project="transformers")
        state["cfg"]["avg"] = {"_name": None, "avg": False, "avg_start_idx": 25, "avg_end_idx": 35}
        state["last_optimizer_state"]["loss_scale"] = 128.0
        torch.save(state, old / f"checkpoint{epoch}.pt")
    out = tmp_path / "results.csv"
    evaluate_lawa.main([str(ptb), "--ckpt-dir", str(old), "--ks", "2", "--out", str(out)])
    half = lawa_utils.read_results(out).set_index(["method", "k", "epoch"])["value"]
    full = lawa_utils.read_results(trained / "log.csv").set_index(["epoch", "split"])["value"]
    assert abs(half["baseline", 1, 2] - full[2, "val"]) < 0.02
    assert ("lawa", 2, 2) in half.index


def test_two_gloo_processes_train_like_one_process_with_update_freq(trained, ptb, tmp_path):
    save = tmp_path / "gloo"
    run(["bash", BERT / "train.sh", *NO_DROPOUT],
        {**TRAIN_ENV, "CPU_PROCS": "2", "DATA": str(ptb), "SAVE_DIR": str(save)})
    info = json.loads((save / "args.json").read_text())
    assert info["workers"] == 2 and "--update-freq 1" in info["command"]
    single, ranks = model_state(trained / "checkpoint2.pt"), model_state(save / "checkpoint2.pt")
    for key, value in single.items():
        torch.testing.assert_close(ranks[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_sweep_errors_name_the_missing_checkpoints_or_data(trained, ptb, tmp_path, capsys):
    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            evaluate_lawa.main([*argv, "--ks", "2", "--out", str(tmp_path / "r.csv")])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no checkpoints in a layout LAWA knows" in error("--ckpt-dir", str(empty))

    gap = tmp_path / "gap"
    gap.mkdir()
    for epoch in (2, 3, 5):
        (gap / f"checkpoint{epoch}.pt").symlink_to(trained / "checkpoint2.pt")
    assert "checkpoint4.pt is missing" in error("--ckpt-dir", str(gap))

    assert "prepare_data.sh" in error(str(tmp_path / "no-data"), "--ckpt-dir", str(trained))
    no_valid = tmp_path / "no-valid"
    no_valid.mkdir()
    (no_valid / "dict.txt").write_text((ptb / "dict.txt").read_text())
    assert "valid.bin is missing" in error(str(no_valid), "--ckpt-dir", str(trained))


def test_method_sweeps_write_their_labels_and_an_ema_cell_equals_fairseq_validate_on_its_average(
        trained, ptb, tmp_path, capsys):
    out = tmp_path / "results.csv"
    for flags in (["--method", "swa,ema", "--swa-starts", "1,2", "--decays", "0.75"],  # two in one process
                  ["--method", "ewa", "--ks", "2", "--spacing", "1", "--no-baseline"]):
        evaluate_lawa.main(["--ckpt-dir", str(trained), "--out", str(out), *flags])
    printed = capsys.readouterr().out
    rows = lawa_utils.read_results(out).set_index(["method", "k", "epoch", "split"])["value"]
    # SWA's k is E − s + 1, EMA's 1/(1 − d); the baseline was written once, by the first command.
    assert sorted((m, k, e) for m, k, e, _ in rows.index) == [
        ("baseline", 1, 1), ("baseline", 1, 2), ("ema", 4, 1), ("ema", 4, 2), ("ewa-s1", 2, 2), ("swa", 1, 1),
        ("swa", 1, 2), ("swa", 2, 2)]
    # SWA at its start and EMA at the first checkpoint are the checkpoint itself; SWA from 1 at E=2 is the mean
    # of checkpoints 1 and 2, as is EWA with spacing 1 and k=2 (LAWA).
    assert rows["swa", 1, 1, "val"] == rows["baseline", 1, 1, "val"]
    assert rows["swa", 1, 2, "val"] == rows["baseline", 1, 2, "val"]
    assert rows["ema", 4, 1, "val"] == rows["baseline", 1, 1, "val"]
    assert rows["swa", 2, 2, "val"] == rows["ewa-s1", 2, 2, "val"]
    assert "s=1" in printed and "s=2" in printed and "k=4" in printed  # summaries: SWA curves by their start

    # EMA with d=0.75 at E=2 is 0.75·θ1 + 0.25·θ2: written by hand as a fairseq checkpoint, validated by fairseq.
    ema = lawa_utils.load_checkpoint(trained / "checkpoint2.pt", mmap=False)
    first = model_state(trained / "checkpoint1.pt")
    ema["model"] = {key: 0.75 * first[key] + 0.25 * v if v.is_floating_point() else v
                    for key, v in ema["model"].items()}
    torch.save(ema, tmp_path / "ema.pt")
    assert abs(rows["ema", 4, 2, "val"] - fairseq_validate(ptb, tmp_path / "ema.pt")) <= 0.0005 + 1e-6


@pytest.mark.parametrize("flags, fragment", [
    (["--method", "swa", "--swa-starts", "1", "--spacing", "2"], "--spacing applies to --method ewa, not swa"),
    (["--method", "uni", "--decays", "0.5"], "--decays applies to --method ema, not uni"),
    (["--method", "ema"], "--method ema needs --decays, e.g. --decays 0.5,0.75"),
    (["--method", "ewa", "--ks", "2"], "--method ewa needs --spacing"),
    (["--method", "swa", "--swa-starts", "5"], "checkpoint5.pt does not exist"),
])
def test_bad_method_flags_are_refused_in_one_line(trained, tmp_path, capsys, flags, fragment):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_lawa.main(["--ckpt-dir", str(trained), "--out", str(tmp_path / "r.csv"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("evaluate_lawa.py: error: ") and fragment in err, err
    assert not (tmp_path / "r.csv").exists()


def test_training_without_data_says_how_to_make_it(tmp_path):
    proc = run(["bash", BERT / "train.sh"], {"DATA": str(tmp_path / "none"), "SAVE_DIR": str(tmp_path / "s")},
               check=False)
    assert proc.returncode == 2 and "bert/prepare_data.sh" in proc.stderr and not (tmp_path / "s").exists()
