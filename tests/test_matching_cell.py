"""The online average and the post-hoc sweep agree: ``LawaTrainerCallback``'s logged ``eval_lawa_loss`` for epoch
E equals ``lawa_sweep.sweep`` over the ``checkpoint-{step}/`` directories the same HF Trainer run wrote, with an
evaluation function that computes the Trainer's eval loss on the same batches."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["HF_HUB_OFFLINE"] = "1"  # tiny models from configs: nothing is downloaded

transformers = pytest.importorskip("transformers")

import lawa_sweep as ls  # noqa: E402

EPOCHS, K = 3, 2


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_for(out: Path, model):
    args = transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=EPOCHS, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=5e-3, eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch",
        report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(16, 1), eval_dataset=Tokens(12, 2))


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def test_callback_eval_lawa_loss_equals_the_sweep_of_the_checkpoints_it_sat_beside(tmp_path):
    from lawa_callbacks import LawaTrainerCallback

    run = tmp_path / "run"
    trainer = trainer_for(run, tiny_gpt2())
    LawaTrainerCallback(trainer, k=K, output_dir="")
    trainer.train()
    logged = {round(r["epoch"]): (r["step"], r["eval_lawa_loss"]) for r in trainer.state.log_history
              if "eval_lawa_loss" in r}
    assert sorted(logged) == list(range(1, EPOCHS + 1))

    # The user's evaluation for `lawa sweep --eval`: the Trainer's own eval loss of the state, same batches.
    evaluator = trainer_for(tmp_path / "eval", tiny_gpt2())

    def evaluate(state, cell):
        missing, unexpected = evaluator.model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to wte: stored once
        return {"eval_loss": evaluator.evaluate()["eval_loss"]}

    results = ls.sweep(run, [ls.Lawa((K,))], evaluate, tmp_path / "results.csv", distributed=False)
    swept = {(r.method, r.epoch): r.value for r in results.itertuples()}
    assert set(results["unit"]) == {"step"}
    # Bit for bit: with k=2 both sum the same two float32 tensors and halve them (exact), and the evaluation is
    # the same code on the same batches. Before epoch K the callback averages the fewer snapshots it has.
    for epoch, (step, loss) in logged.items():
        if epoch >= K:
            assert swept["lawa", step] == loss, epoch
    # the baseline rows are the Trainer's own eval_loss of each epoch
    live = {r["step"]: r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r}
    for step, loss in live.items():
        assert swept["baseline", step] == loss
