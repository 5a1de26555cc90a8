"""lawa_callbacks with the real frameworks: a 2-layer GPT-2 built from a config in HF Trainer, a small MLP in
Lightning. Bit-identical resume after a stop at epoch 2 of 4, the LAWA metrics in the frameworks' own logs
(checked against an independent evaluation of the post-hoc average of the run's own checkpoints), checkpoints
that keep the live weights, the averaged model written at the end, and a 2-process DDP run of each (torchrun,
gloo, 127.0.0.1, shard=True).

This file is also the torchrun worker of the DDP tests: ``python tests/test_callbacks.py both OUT``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the torchrun workers run this file as a script
    sys.path.insert(0, str(REPO))

from lawa_tidy import LawaError  # noqa: E402
from lawa_utils import average_state_dicts  # noqa: E402

K = 3
EPOCHS = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread, as in the torchrun workers: two threads per process oversubscribe 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_states_equal(a: dict, b: dict, keys=None) -> None:
    for name in keys if keys is not None else a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def _assert_close(a: dict, b: dict, keys) -> None:
    for name in keys:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(kind: str, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), __file__, kind, str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------
# HF Trainer
# ---------------------------------------------------------------------------------------------------


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_trainer(out: Path, *, stop_after_epoch: int | None = None, batch_size: int = 8, **lawa):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from lawa_callbacks import LawaTrainerCallback

    class StopAt(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            if round(state.epoch) == stop_after_epoch:
                control.should_training_stop = True

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                                  bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(
        output_dir=str(out), num_train_epochs=EPOCHS, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=8,
        learning_rate=5e-3, eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch",
        report_to="none", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(16, 1), eval_dataset=_Tokens(12, 2),
                      callbacks=[StopAt()] if stop_after_epoch else [])
    return trainer, LawaTrainerCallback(trainer, k=K, **lawa)


def _checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def _lawa_losses(trainer) -> list[float]:
    return [row["eval_lawa_loss"] for row in trainer.state.log_history if "eval_lawa_loss" in row]


def test_hf_trainer_resume_is_bit_identical_and_logs_eval_lawa(tmp_path):
    trainer, lawa = _hf_trainer(tmp_path / "a")
    trainer.train()
    reference = lawa.scheduler.averaged_state_dict()
    losses = _lawa_losses(trainer)
    assert len(losses) == EPOCHS
    epochs = [row["epoch"] for row in trainer.state.log_history if "eval_loss" in row]
    assert epochs == [row["epoch"] for row in trainer.state.log_history if "eval_lawa_loss" in row]

    stopped, _ = _hf_trainer(tmp_path / "b", stop_after_epoch=2)
    stopped.train()
    assert len(_checkpoints(tmp_path / "b")) == 2
    # Without its state file a resumed run refuses to start rather than silently restart the window.
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    (tmp_path / "c" / "checkpoint-4" / "lawa_state.safetensors").unlink()
    with pytest.raises(LawaError, match="resuming at step 4 but .*c/checkpoint-4/lawa_state.safetensors"):
        _hf_trainer(tmp_path / "c")[0].train(resume_from_checkpoint=True)
    resumed, resumed_lawa = _hf_trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=True)
    _assert_states_equal(resumed_lawa.scheduler.averaged_state_dict(), reference)
    assert _lawa_losses(resumed) == losses  # the resumed log_history holds the first two epochs' rows too

    # Checkpoints keep the live weights: the post-hoc average of the last k equals the online one, and the
    # Trainer's own evaluation of that average gives the logged eval_lawa_loss of the last epoch.
    files = [load_file(c / "model.safetensors") for c in _checkpoints(tmp_path / "a")]
    live = trainer.model.state_dict()
    _assert_states_equal(files[-1], live, keys=files[-1].keys())
    posthoc = average_state_dicts(files[-K:])
    _assert_close(posthoc, reference, posthoc.keys())
    for c in _checkpoints(tmp_path / "a"):
        assert (c / "lawa_state.safetensors").is_file()
    final = load_file(tmp_path / "a" / "lawa" / "model.safetensors")
    _assert_states_equal(final, reference, keys=final.keys())
    trainer.model.load_state_dict(reference)
    assert trainer.evaluate()["eval_loss"] == losses[-1]


def _hf_worker(out: Path) -> None:
    trainer, lawa = _hf_trainer(out, shard=True, every_n_steps=2, batch_size=4)  # 2 steps per epoch and rank
    trainer.train()
    assert lawa.scheduler.count == 2 * EPOCHS and lawa.scheduler.num_snapshots == EPOCHS
    averaged = lawa.scheduler.averaged_state_dict()  # a collective: every rank gets whole tensors
    held = sum(t.numel() * t.element_size() for t in lawa.scheduler.state_dict()["sum"].values())
    torch.save({"average": averaged, "sum_bytes": held}, out / f"rank{trainer.args.process_index}.pt")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One 2-process torchrun that trains with each callback in turn (process start-up and imports paid once)."""
    out = tmp_path_factory.mktemp("ddp")
    (out / "hf").mkdir()
    (out / "lightning").mkdir()
    _torchrun("both", out)
    return out


def test_hf_trainer_ddp_two_processes_sharded_step_snapshots(ddp_runs):
    tmp_path = ddp_runs / "hf"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    _assert_states_equal(ranks[0]["average"], ranks[1]["average"])
    files = [load_file(c / "model.safetensors") for c in _checkpoints(tmp_path)]
    assert len(files) == EPOCHS
    _assert_close(average_state_dicts(files[-K:]), ranks[0]["average"], files[-1].keys())
    model_bytes = sum(t.numel() * t.element_size() for t in files[-1].values())  # tied lm_head stored once
    assert sum(r["sum_bytes"] for r in ranks) == model_bytes  # each rank sums its half
    for c in _checkpoints(tmp_path):
        assert sorted(p.name for p in c.glob("lawa_state*")) == [
            "lawa_state-rank0-of-2.safetensors", "lawa_state-rank1-of-2.safetensors"]
    log = json.loads((_checkpoints(tmp_path)[-1] / "trainer_state.json").read_text())["log_history"]
    assert len([row for row in log if "eval_lawa_loss" in row]) == EPOCHS
    final = load_file(tmp_path / "lawa" / "model.safetensors")
    _assert_states_equal(final, ranks[0]["average"], keys=final.keys())


# ---------------------------------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------------------------------


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        import pytorch_lightning as pl
    return pl


def _lightning_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(96, 8, generator=g)
    y = (x @ torch.randn(8, 1, generator=g)).squeeze(1) + 0.1 * torch.randn(96, generator=g)
    train = torch.utils.data.TensorDataset(x[:64], y[:64])
    val = torch.utils.data.TensorDataset(x[64:], y[64:])
    return (torch.utils.data.DataLoader(train, batch_size=8), torch.utils.data.DataLoader(val, batch_size=10))


def _lightning_module():
    pl = _lightning()

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

        def forward(self, x):
            return self.net(x).squeeze(1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), sync_dist=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return Regression


def _lightning_trainer(root: Path, *, stop_after_epoch: int | None = None, **lawa):
    pl = _lightning()
    from lawa_callbacks import LawaLightningCallback

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.rows: list[dict] = []

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})

        def on_train_epoch_end(self, trainer, pl_module):
            if stop_after_epoch is not None and trainer.current_epoch + 1 == stop_after_epoch:
                trainer.should_stop = True

    callback, recorder = LawaLightningCallback(k=K, **lawa), Recorder()
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=int(os.environ.get("WORLD_SIZE", "1")),
        strategy="ddp" if "WORLD_SIZE" in os.environ else "auto", default_root_dir=root,
        callbacks=[callback, recorder, checkpoints], logger=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True, num_sanity_val_steps=1,
    )
    return trainer, callback, recorder


def _fit(root: Path, ckpt_path=None, **kwargs):
    _lightning().seed_everything(0, verbose=False)
    trainer, callback, recorder = _lightning_trainer(root, **kwargs)
    module = _lightning_module()()
    trainer.fit(module, *_lightning_data(), ckpt_path=ckpt_path)
    return trainer, module, callback, recorder


def _ckpt_files(root: Path) -> list[Path]:
    return sorted((root / "ckpt").glob("epoch=*.ckpt"), key=lambda p: int(p.name.split("=")[1].split("-")[0]))


def test_lightning_resume_is_bit_identical_and_validates_the_average_after_its_snapshot(tmp_path):
    trainer, module, callback, recorder = _fit(tmp_path / "a")
    reference = callback.scheduler.averaged_state_dict()
    assert len(recorder.rows) == EPOCHS and all("val_lawa_loss" in row for row in recorder.rows)

    # val_lawa_loss of epoch E is the average of the checkpoints of epochs E-k+1 … E (snapshot E included),
    # evaluated independently: batch-size-weighted mean of the MSE over the validation loader.
    files = [torch.load(p, weights_only=True)["state_dict"] for p in _ckpt_files(tmp_path / "a")]
    assert len(files) == EPOCHS
    _assert_states_equal(files[-1], module.state_dict())  # ModelCheckpoint keeps the live weights
    _, val = _lightning_data()
    probe = _lightning_module()()
    for epoch, row in enumerate(recorder.rows):
        probe.load_state_dict(average_state_dicts(files[max(0, epoch - K + 1):epoch + 1]))
        with torch.no_grad():
            total = sum(torch.nn.functional.mse_loss(probe(x), y).double() * len(y) for x, y in val)
        assert row["val_lawa_loss"] == pytest.approx(float(total) / len(val.dataset), rel=1e-6)
    _assert_close(average_state_dicts(files[-K:]), reference, reference.keys())
    final = torch.load(tmp_path / "a" / "lawa.ckpt", weights_only=True)["state_dict"]
    _assert_states_equal(final, reference)

    _fit(tmp_path / "b", stop_after_epoch=2)
    assert len(_ckpt_files(tmp_path / "b")) == 2
    _, _, resumed, rows = _fit(tmp_path / "b", ckpt_path=_ckpt_files(tmp_path / "b")[-1])
    _assert_states_equal(resumed.scheduler.averaged_state_dict(), reference)
    assert [row["val_lawa_loss"] for row in rows.rows] == [row["val_lawa_loss"] for row in recorder.rows[2:]]


def _lightning_worker(out: Path) -> None:
    trainer, module, callback, _ = _fit(out, shard=True)
    averaged = callback.scheduler.averaged_state_dict()
    torch.save({"average": averaged, "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}},
               out / f"rank{trainer.global_rank}.pt")


def test_lightning_ddp_two_processes_sharded(ddp_runs):
    tmp_path = ddp_runs / "lightning"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    _assert_states_equal(ranks[0]["average"], ranks[1]["average"])
    assert "val_lawa_loss" in ranks[0]["metrics"]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # sync_dist: one value on every rank
    files = [torch.load(p, weights_only=True)["state_dict"] for p in _ckpt_files(tmp_path)]
    assert len(files) == EPOCHS
    _assert_close(average_state_dicts(files[-K:]), ranks[0]["average"], files[-1].keys())
    final = torch.load(tmp_path / "lawa.ckpt", weights_only=True)["state_dict"]
    _assert_states_equal(final, ranks[0]["average"])


def test_importing_lawa_callbacks_needs_neither_framework():
    code = ("import sys, lawa_callbacks; "
            "assert 'transformers' not in sys.modules and 'pytorch_lightning' not in sys.modules; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


if __name__ == "__main__":  # a torchrun worker of the DDP tests
    torch.set_num_threads(1)
    out_dir = Path(sys.argv[2])
    _hf_worker(out_dir / "hf")  # accelerate starts the process group; Lightning's DDP strategy then reuses it
    _lightning_worker(out_dir / "lightning")
