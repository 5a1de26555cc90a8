"""Trajectories as users have them: each framework writes a tiny real run through its own save path, the
``average`` CLI averages it with ``--dir``, and the framework's own loader reads the result, which must equal an
independent float64 average of the inputs (read by that framework's loader too) to 1e-6.

Every run is built once per module (fixtures); layout recognition and the refusals run on empty files.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch

import lawa_trajectory as lt
import lawa_utils as lu

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-6
# dcp.save/load in one process, as single-GPU runs do, warn that there is no process group.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def average(capsys, *args) -> tuple[int, str, str]:
    """``python -m lawa_utils average ARGS`` in this process (what the console command runs)."""
    capsys.readouterr()
    status = lu.main(["average", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def mean_state(states, weights=None) -> dict[str, torch.Tensor]:
    """The independent average: float64 weighted sum of floating tensors, others from the newest state."""
    weights = weights or [1.0 / len(states)] * len(states)
    out = {}
    for key, newest in states[-1].items():
        if newest.is_floating_point():
            out[key] = sum(w * s[key].double() for w, s in zip(weights, states, strict=True))
        else:
            out[key] = newest
    return out


def assert_state_close(got, want, what: str) -> None:
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:5])
    for key, t in want.items():
        g = got[key]
        if t.is_floating_point():
            err = (g.double() - t).abs().max().item() if t.numel() else 0.0
            assert err <= TOL * max(1.0, t.abs().max().item()), (what, key, err)
        else:
            assert torch.equal(g, t), (what, key)


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """A deterministic step away from the current weights: each checkpoint of a run differs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g), alpha=0.1)


# ------------------------------------------------------------------ layout recognition (empty files)


def touch(root: Path, *names: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.endswith("/"):
            (root / name).mkdir()
        elif "/" in name:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).touch()
        else:
            (root / name).touch()
    return root


LAYOUT_CASES = [
    # (names written, layout, unit, zero_based, positions)
    (["checkpoint10.pt", "checkpoint9.pt", "checkpoint8.pt", "checkpoint_best.pt", "checkpoint_last.pt",
      "args.json", "log.csv", "results.csv"], "lawa", "epoch", False, (8, 9, 10)),
    (["checkpoint_1_500.pt", "checkpoint_2_1000.pt", "checkpoint_2_1500.pt", "checkpoint_last.pt"],
     "fairseq-updates", "step", False, (500, 1000, 1500)),
    (["checkpoint-1000/", "checkpoint-500/", "checkpoint-1500/", "runs/", "trainer_state.json", "config.json"],
     "hf", "step", False, (500, 1000, 1500)),
    (["step100/", "step20/", "step3000/"], "pythia", "step", False, (20, 100, 3000)),
    # Accelerate's save_state: folders count only when they hold model weights (checkpoint_9/ below is empty)
    (["checkpoint_1/model.safetensors", "checkpoint_0/model.safetensors", "checkpoint_10/pytorch_model.bin",
      "checkpoint_9/"], "accelerate", "epoch", True, (0, 1, 10)),
    (["epoch_2/model.safetensors.index.json", "epoch_0/model.safetensors", "logs/"], "accelerate", "epoch", True,
     (0, 2)),
    (["step_200/model.safetensors", "step_100/model.safetensors"], "accelerate", "step", False, (100, 200)),
    (["epoch=0-step=5.ckpt", "epoch=10-step=55.ckpt", "epoch=2-step=15.ckpt", "last.ckpt", "last-v1.ckpt"],
     "lightning", "epoch", True, (0, 2, 10)),
    (["model-epoch=1-step=10-val_loss=0.50.ckpt", "model-epoch=3-step=20-val_loss=0.40.ckpt"],
     "lightning", "epoch", True, (1, 3)),
    (["epoch=0-step=5.ckpt", "epoch=0-step=10.ckpt", "epoch=1-step=15.ckpt"], "lightning", "step", False,
     (5, 10, 15)),
    (["0-5.ckpt", "1-10.ckpt"], "lightning", "epoch", True, (0, 1)),
    # Lightning's sharded (FSDP) checkpoints: DCP directories named as its files
    (["epoch=1-step=20.ckpt/.metadata", "epoch=0-step=10.ckpt/.metadata", "last.ckpt/.metadata"], "lightning",
     "epoch", True, (0, 1)),
    (["checkpoint-2.pth.tar", "checkpoint-10.pth.tar", "last.pth.tar", "model_best.pth.tar", "recovery-3-40.pth.tar",
      "milestone-3.pth.tar", "tmp.pth.tar", "summary.csv", "args.yaml"], "timm", "epoch", True, (2, 10)),
    (["model_11.pth", "model_9.pth", "model_10.pth", "checkpoint.pth"], "torchvision", "epoch", True, (9, 10, 11)),
    (["step-200/.metadata", "step-100/.metadata", "step-100/__0_0.distcp", "latest"], "dcp", "step", False,
     (100, 200)),
    (["epoch_3/.metadata", "epoch_1/.metadata"], "dcp", "epoch", False, (1, 3)),
]


@pytest.mark.parametrize("names, layout, unit, zero_based, positions", LAYOUT_CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(LAYOUT_CASES)])
def test_layout_is_recognised_and_ordered_by_number(tmp_path, names, layout, unit, zero_based, positions):
    run = lt.find_trajectory(touch(tmp_path / "run", *names))
    assert (run.layout, run.unit, run.zero_based, run.positions) == (layout, unit, zero_based, positions)
    assert [run.path(p) for p in run.positions] == list(run.paths)
    assert run.checkpoints() == {i + 1: p for i, p in enumerate(run.paths)}
    assert run.completed(positions[-1]) == positions[-1] + (1 if zero_based else 0)


def test_pattern_names_any_other_layout(tmp_path):
    root = touch(tmp_path / "run", "ep010.pt", "ep002.pt", "ep7.pt", "ep001.pt", "notes.txt")
    run = lt.find_trajectory(root, pattern="ep{E:03d}.pt")
    assert run.positions == (1, 2, 10) and run.layout == "pattern" and run.unit == "epoch"  # ep7.pt: no width
    steps = lt.find_trajectory(touch(tmp_path / "s", "run-a_s20.bin", "run-b_s10.bin"), pattern="run-*_s{S}.bin")
    assert steps.positions == (10, 20) and steps.unit == "step"
    zero = lt.find_trajectory(touch(tmp_path / "z", "w0.pt", "w1.pt"), pattern="w{E0}.pt")
    assert zero.zero_based and zero.completed(1) == 2
    with pytest.raises(lu.LawaError, match="no number field"):
        lt.find_trajectory(root, pattern="ep.pt")
    with pytest.raises(lu.LawaError, match="matches --pattern"):
        lt.find_trajectory(root, pattern="step{S}.pt")


def test_lightning_version_dir_is_looked_into(tmp_path):
    root = touch(tmp_path / "version_0", "hparams.yaml", "checkpoints/epoch=0-step=2.ckpt",
                 "checkpoints/epoch=1-step=4.ckpt")
    run = lt.find_trajectory(root)
    assert run.root == root / "checkpoints" and run.positions == (0, 1)


AMBIGUOUS = [
    (["checkpoint-10/", "checkpoint-010/"], "the same step appears twice: checkpoint-010 and checkpoint-10"),
    (["checkpoint3.pt", "checkpoint03.pt"], "the same epoch appears twice"),
    (["checkpoint1.pt", "checkpoint2.pt", "model_1.pth"], "mixes checkpoint layouts: 2 lawa (checkpoint1.pt, …); "
     "1 torchvision (model_1.pth, …)"),
    (["checkpoint1.pt", "checkpoint_1_100.pt"], "mixes checkpoint layouts"),
    (["notes.txt", "model.safetensors"], "has no checkpoints in a layout LAWA knows"),
    (["epoch=0-step=5.ckpt", "epoch=0.ckpt"], "share an epoch and not every name has a step"),
]


@pytest.mark.parametrize("names, message", AMBIGUOUS, ids=[m[:24] for _, m in AMBIGUOUS])
def test_ambiguous_directories_are_refused_listing_what_was_found(tmp_path, capsys, names, message):
    root = touch(tmp_path / "run", *names)
    with pytest.raises(lu.LawaError, match=None) as err:
        lt.find_trajectory(root)
    assert message in str(err.value) and "\n" not in str(err.value)
    status, _, stderr = average(capsys, "--dir", root, "--k", 1, "--out", tmp_path / "avg.pt")
    assert status == 2 and stderr.count("\n") == 1 and message in stderr
    assert stderr.startswith("lawa_utils: error: ") and not (tmp_path / "avg.pt").exists()


def test_find_checkpoints_says_which_layout_a_directory_holds(tmp_path):
    with pytest.raises(lu.LawaError, match=r"has no checkpoint\{E\}.pt files; it holds hf checkpoints \(2 check"):
        lu.find_checkpoints(touch(tmp_path / "hf", "checkpoint-5/", "checkpoint-10/"))
    assert list(lu.find_checkpoints(touch(tmp_path / "own", "checkpoint2.pt", "checkpoint10.pt"))) == [2, 10]


def test_windows_count_checkpoints_and_refuse_gaps_and_short_runs(tmp_path):
    run = lt.find_trajectory(touch(tmp_path / "hf", *[f"checkpoint-{s}/" for s in (500, 1000, 1500, 2500, 3000)]))
    assert run.interval == 500
    assert run.window(1500, 3) == [500, 1000, 1500] and run.window(3000, 2) == [2500, 3000]
    with pytest.raises(lu.LawaError, match=r"checkpoint-2000 is missing: the window of k=3 ending at "
                       r"checkpoint-3000/ would span the gap between checkpoint-1500/ and checkpoint-2500/"):
        run.window(3000, 3)
    with pytest.raises(lu.LawaError, match=r"k=6 is larger than the trajectory \(5 checkpoints, steps 500..3000"):
        run.window(3000, 6)
    with pytest.raises(lu.LawaError, match="k=3 reaches before the first checkpoint: only 2 checkpoints up to"):
        run.window(1000, 3)
    with pytest.raises(lu.LawaError, match=r"checkpoint-700 does not exist in .* \(have 5 checkpoints"):
        run.path(700)
    assert [run.completed(p) for p in run.positions] == [500, 1000, 1500, 2500, 3000]


def test_files_are_ordered_by_the_numbers_in_their_names(tmp_path):
    root = touch(tmp_path / "kept", "model_10.pth", "model_11.pth", "model_8.pth", "model_9.pth")
    given = [root / n for n in ("model_10.pth", "model_11.pth", "model_8.pth", "model_9.pth")]
    run = lt.trajectory_from_files(given)  # shell glob order of kept/model_*.pth
    assert [p.name for p in run.paths] == ["model_8.pth", "model_9.pth", "model_10.pth", "model_11.pth"]
    assert run.sorted_by_name and run.layout == "torchvision" and run.completed(11) == 12
    other = touch(tmp_path / "x", "soup-b.pt", "soup-a.pt")
    kept = lt.trajectory_from_files([other / "soup-b.pt", other / "soup-a.pt"])  # no numbers: as given
    assert [p.name for p in kept.paths] == ["soup-b.pt", "soup-a.pt"] and not kept.sorted_by_name
    seeds = touch(tmp_path / "s1", "checkpoint30.pt"), touch(tmp_path / "s2", "checkpoint30.pt")
    same = lt.trajectory_from_files([seeds[1] / "checkpoint30.pt", seeds[0] / "checkpoint30.pt"])
    assert same.paths == (seeds[1] / "checkpoint30.pt", seeds[0] / "checkpoint30.pt")  # one number twice: as given
    with pytest.raises(lu.LawaError, match="nope.pt does not exist"):
        lt.trajectory_from_files([tmp_path / "nope.pt"])


def test_parse_epochs_names_positions_of_a_trajectory(tmp_path):
    run = lt.find_trajectory(touch(tmp_path / "hf", *[f"checkpoint-{s}/" for s in range(100, 1001, 100)]))
    assert lu.parse_epochs("300:600", run) == [300, 400, 500, 600]
    assert lu.parse_epochs("200:1000:400", run) == [200, 600, 1000]
    assert lu.parse_epochs(None, run) == list(run.positions)
    with pytest.raises(lu.LawaError, match="no checkpoint at step 250"):
        lu.parse_epochs("250", run)


# ------------------------------------------------------------------ the averaging functions on trajectories


def _states(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [{"w": torch.randn(3, generator=g), "n": torch.tensor(i)} for i in range(n)]


def test_iter_window_averages_takes_a_trajectory_in_positions(tmp_path):
    states = _states(5)
    root = tmp_path / "run"
    root.mkdir()
    for i, s in zip((0, 1, 2, 3, 5), states, strict=True):  # torchvision names, 0-based; epoch 4 lost
        torch.save({"model": s, "lr_scheduler": {}, "epoch": i}, root / f"model_{i}.pth")
    run = lt.find_trajectory(root)
    cells = list(lu.iter_window_averages(run, [2, 3], ends=[2, 3]))
    assert [(e, k) for e, k, _ in cells] == [(2, 2), (2, 3), (3, 2), (3, 3)]
    assert torch.allclose(cells[1][2]["w"], (states[0]["w"] + states[1]["w"] + states[2]["w"]) / 3, atol=TOL)
    assert int(cells[3][2]["n"]) == 3  # integer tensors from the newest of the window
    assert [(e, k) for e, k, _ in lu.iter_window_averages(run, [2], ends=[2, 3], skip={(2, 2)})] == [(3, 2)]
    with pytest.raises(lu.LawaError, match="model_4.pth is missing"):
        list(lu.iter_window_averages(run, [2], ends=[5]))


def test_iter_window_averages_names_in_memory_states_by_their_key():
    states = dict(enumerate(_states(3), start=1))
    states[3]["w"][0] = float("nan")
    with pytest.raises(lu.LawaError) as err:
        list(lu.iter_window_averages(states, [2], load=lambda s: s))
    assert str(err.value).startswith("checkpoint 3: tensor 'w' has NaN/Inf") and "tensor([" not in str(err.value)


# ------------------------------------------------------------------ framework runs, averaged with --dir


@pytest.fixture(scope="module")
def hf_trainer_run(tmp_path_factory):
    """A tiny GPT-2 trained 6 steps by transformers' Trainer, saving every 2 steps: checkpoint-{2,4,6}/."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("hf") / "out"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16))
    data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))} for _ in range(12)]
    args = TrainingArguments(output_dir=str(out), max_steps=6, save_steps=2, save_strategy="steps",
                             per_device_train_batch_size=2, learning_rate=1e-2, report_to="none", use_cpu=True,
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=data).train()
    return out


def test_hf_trainer_run_averages_into_a_directory_from_pretrained_loads(hf_trainer_run, tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    run = lt.find_trajectory(hf_trainer_run)
    assert (run.layout, run.unit, run.positions) == ("hf", "step", (2, 4, 6))
    out = tmp_path / "lawa-6"
    status, stdout, stderr = average(capsys, "--dir", hf_trainer_run, "--k", 3, "--out", out)
    assert status == 0, stderr
    assert "checkpoint-2" in stdout and str(out) in stdout
    assert (out / "config.json").is_file() and not (out / "optimizer.pt").exists()
    got = GPT2LMHeadModel.from_pretrained(out).state_dict()
    want = mean_state([GPT2LMHeadModel.from_pretrained(run.path(p)).state_dict() for p in (2, 4, 6)])
    assert_state_close(got, want, "hf trainer")


def _accelerate_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory):
    """accelerate's save_state() after each of 4 epochs, automatic naming: checkpoints/checkpoint_{0..3}/."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project = tmp_path_factory.mktemp("accelerate")
    torch.manual_seed(0)
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(project),
                                                                    automatic_checkpoint_naming=True))
    model = acc.prepare(_accelerate_model())
    opt = acc.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    for _ in range(4):
        for _ in range(3):
            acc.backward(model(torch.randn(5, 4)).pow(2).mean())
            opt.step()
            opt.zero_grad()
        acc.save_state()
    return project / "checkpoints"


def test_accelerate_save_state_run_averages_and_load_state_reads_it(accelerate_run, tmp_path, capsys):
    from accelerate import Accelerator
    from safetensors.torch import load_file

    run = lt.find_trajectory(accelerate_run)
    assert (run.layout, run.unit, run.positions, run.completed(3)) == ("accelerate", "epoch", (0, 1, 2, 3), 4)
    out = tmp_path / "lawa"
    status, _, stderr = average(capsys, "--dir", accelerate_run, "--k", 3, "--out", out, "--copy-training-state")
    assert status == 0, stderr
    acc = Accelerator(cpu=True)
    model = acc.prepare(_accelerate_model())
    opt = acc.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    acc.load_state(str(out))  # accelerate's own loader: model weights, optimizer and RNG state
    want = mean_state([load_file(run.path(p) / "model.safetensors") for p in (1, 2, 3)])
    assert_state_close(model.state_dict(), want, "accelerate")
    assert opt.state_dict()["param_groups"][0]["lr"] == 0.1


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """Pythia-style revisions step{N}/ written by save_pretrained in several shards with an index."""
    from transformers import BertConfig, BertForMaskedLM

    root = tmp_path_factory.mktemp("pythia")
    torch.manual_seed(1)
    model = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=16))
    for step in (1000, 2000, 3000):
        perturb_(model, step)
        model.save_pretrained(root / f"step{step}", max_shard_size="20KB")
    return root


def _hub_cache_repo(cache: Path, repo_id: str, revisions: dict[str, Path]) -> Path:
    """Files laid out as huggingface_hub's cache holds a download of ``revisions`` ({name: folder}): content in
    blobs/ by hash, snapshots/COMMIT/ of symlinks, refs/NAME holding the commit."""
    import hashlib

    root = cache / ("models--" + repo_id.replace("/", "--"))
    for name, folder in revisions.items():
        commit = hashlib.sha1(name.encode()).hexdigest()
        for f in folder.iterdir():
            blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(f.read_bytes())
            link = root / "snapshots" / commit / f.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / name).write_text(commit)
    return root


def test_public_checkpoints_in_the_hub_cache_average_by_their_revisions(tmp_path, capsys):
    """Pythia-style revisions as from_pretrained(revision="step{N}") leaves them in the hub cache: the cache folder
    is the trajectory, its refs/step{N} the positions; transformers reads both the cache and the average."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(3)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=16))
    saved = {}
    for step in (1000, 2000, 3000):
        perturb_(model, step)
        model.save_pretrained(tmp_path / "saved" / f"step{step}")
        saved[f"step{step}"] = tmp_path / "saved" / f"step{step}"
    cache = tmp_path / "hub"
    root = _hub_cache_repo(cache, "org/pythia-tiny", {"main": saved["step3000"], **saved})
    def load(**kw):
        return GPTNeoXForCausalLM.from_pretrained(local_files_only=True, **kw).state_dict()
    inputs = [load(pretrained_model_name_or_path="org/pythia-tiny", revision=f"step{s}", cache_dir=cache)
              for s in (2000, 3000)]  # the hub's own resolution of the revisions
    run = lt.find_trajectory(root)
    assert (run.layout, run.unit, run.positions) == ("pythia", "step", (1000, 2000, 3000))
    out = tmp_path / "lawa"
    status, _, stderr = average(capsys, "--dir", root, "--k", 2, "--out", out)
    assert status == 0, stderr
    assert_state_close(load(pretrained_model_name_or_path=out), mean_state(inputs), "hub cache")
    (root / "refs" / "step4000").write_text("0" * 40)  # a revision whose snapshot is missing
    status, _, stderr = average(capsys, "--dir", root, "--k", 2, "--out", tmp_path / "x")
    assert status == 2 and "step4000 names commit" in stderr


def test_sharded_save_pretrained_run_keeps_its_sharding(sharded_run, tmp_path, capsys):
    from transformers import BertForMaskedLM

    shards = sorted(p.name for p in (sharded_run / "step3000").glob("*.safetensors"))
    assert len(shards) > 1 and (sharded_run / "step3000" / "model.safetensors.index.json").is_file()
    out = tmp_path / "lawa"
    status, _, stderr = average(capsys, "--dir", sharded_run, "--end", 3000, "--k", 2, "--out", out)
    assert status == 0, stderr
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    got = BertForMaskedLM.from_pretrained(out).state_dict()
    want = mean_state([BertForMaskedLM.from_pretrained(sharded_run / f"step{s}").state_dict() for s in (2000, 3000)])
    assert_state_close(got, want, "sharded")


def _lightning_module():
    """A LightningModule class, built on demand so that collecting this file imports no Lightning."""
    import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        def __init__(self, data_dir: Path, cfg, lr: float = 0.1):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    return Tiny


def _lightning_trainer(root: Path, epochs: int):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
    return pl.Trainer(max_epochs=epochs, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0)


def _lightning_data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    """ModelCheckpoint(save_top_k=-1, every_n_epochs=1) over 3 epochs; hparams hold a Path and a DictConfig."""
    from omegaconf import OmegaConf

    root = tmp_path_factory.mktemp("lightning") / "checkpoints"
    torch.manual_seed(2)
    module = _lightning_module()(data_dir=Path("/data/x"), cfg=OmegaConf.create({"model": {"width": 3}}))
    _lightning_trainer(root, 3).fit(module, _lightning_data())
    return root


def test_lightning_run_averages_safely_and_resumes(lightning_run, tmp_path, capsys):
    run = lt.find_trajectory(lightning_run)
    assert (run.layout, run.positions, run.zero_based) == ("lightning", (0, 1, 2), True)
    out = tmp_path / "lawa.ckpt"
    status, stdout, stderr = average(capsys, "--dir", lightning_run, "--k", 3, "--out", out)  # no --trust
    assert status == 0, stderr
    tiny = _lightning_module()
    got = tiny.load_from_checkpoint(out, weights_only=False)
    assert got.hparams.data_dir == Path("/data/x") and got.hparams.cfg.model.width == 3
    inputs = [torch.load(p, weights_only=False)["state_dict"] for p in run.paths]
    assert_state_close(got.state_dict(), mean_state(inputs), "lightning")
    trainer = _lightning_trainer(tmp_path / "resumed", 4)
    # Lightning itself refuses hparams holding a Path with weights_only=True: the user opts in for their own file
    trainer.fit(tiny(data_dir=Path("/data/x"), cfg=got.hparams.cfg), _lightning_data(), ckpt_path=out,
                weights_only=False)
    assert trainer.current_epoch == 4


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory):
    """timm's CheckpointSaver with a ModelEmaV3 over 3 epochs (plus last, model_best and a recovery file)."""
    import timm
    from timm.utils import CheckpointSaver, ModelEmaV3

    root = tmp_path_factory.mktemp("timm")
    torch.manual_seed(3)
    model = timm.create_model("test_efficientnet", num_classes=3)
    ema = ModelEmaV3(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(model="test_efficientnet", num_classes=3)
    saver = CheckpointSaver(model, opt, args=args, model_ema=ema, checkpoint_dir=str(root), recovery_dir=str(root),
                            max_history=10)
    for epoch in range(3):
        perturb_(model, epoch)
        model.train()
        model(torch.randn(2, 3, 32, 32))  # moves the BatchNorm statistics
        ema.update(model)
        saver.save_checkpoint(epoch, metric=float(epoch))
    saver.save_recovery(2, batch_idx=1)
    return root


def test_timm_run_averages_model_and_ema_and_create_model_loads(timm_run, tmp_path, capsys):
    import timm

    run = lt.find_trajectory(timm_run)
    assert (run.layout, run.positions) == ("timm", (0, 1, 2))
    out = tmp_path / "lawa.pth.tar"
    status, stdout, stderr = average(capsys, "--dir", timm_run, "--k", 3, "--out", out)
    assert status == 0, stderr
    assert "state_dict_ema" in stdout  # the EMA entry was averaged too, and said so
    inputs = [torch.load(p, weights_only=False) for p in run.paths]
    model = timm.create_model("test_efficientnet", num_classes=3, checkpoint_path=str(out))  # loads the EMA
    assert_state_close(model.state_dict(), mean_state([c["state_dict_ema"] for c in inputs]), "timm ema")
    plain = timm.create_model("test_efficientnet", num_classes=3)
    timm.models.load_checkpoint(plain, str(out), use_ema=False)
    assert_state_close(plain.state_dict(), mean_state([c["state_dict"] for c in inputs]), "timm model")
    only = tmp_path / "ema-only.pth.tar"
    status, stdout, stderr = average(capsys, "--dir", timm_run, "--k", 3, "--weights", "state_dict_ema", "--out", only)
    assert status == 0, stderr
    assert "entries averaged: state_dict_ema)" in stdout and "state_dict" in stdout.split("note:", 1)[1]


def _vision_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 3))


@pytest.fixture(scope="module")
def torchvision_run(tmp_path_factory):
    """The dict torchvision's references/classification/train.py saves, model_{8..11}.pth and checkpoint.pth."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    root = tmp_path_factory.mktemp("vision")
    torch.manual_seed(4)
    model = _vision_model()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)  # the references' EMA
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    args = argparse.Namespace(model="tiny", epochs=12, output_dir=str(root))
    for epoch in range(8, 12):
        perturb_(model, epoch)
        model.train()
        model(torch.randn(2, 3, 8, 8))
        ema.update_parameters(model)
        opt.step()
        sched.step()
        ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                "epoch": epoch, "args": args, "model_ema": ema.state_dict()}
        torch.save(ckpt, root / f"model_{epoch}.pth")
        torch.save(ckpt, root / "checkpoint.pth")
    return root


def _vision_load(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):  # the references' args
        return torch.load(path, map_location="cpu", weights_only=True)


def test_torchvision_run_averages_model_and_ema(torchvision_run, tmp_path, capsys):
    run = lt.find_trajectory(torchvision_run)
    assert (run.layout, run.positions) == ("torchvision", (8, 9, 10, 11))
    out = tmp_path / "lawa.pth"
    status, stdout, stderr = average(capsys, "--dir", torchvision_run, "--end", 10, "--k", 2, "--out", out)
    assert status == 0, stderr
    assert "model_9.pth" in stdout and "model_11.pth" not in stdout and "model_ema" in stdout
    ckpt = _vision_load(out)
    model = _vision_model()
    model.load_state_dict(ckpt["model"])
    inputs = [_vision_load(torchvision_run / f"model_{e}.pth") for e in (9, 10)]
    assert_state_close(model.state_dict(), mean_state([c["model"] for c in inputs]), "torchvision")
    assert_state_close(ckpt["model_ema"], mean_state([c["model_ema"] for c in inputs]), "torchvision ema")
    assert ckpt["epoch"] == 10
    # A torch file output keeps the newest input's pickle, dtypes included: a cast goes to safetensors.
    half = tmp_path / "half.safetensors"
    status, _, stderr = average(capsys, "--dir", torchvision_run, "--end", 10, "--k", 2, "--weights", "model",
                                "--dtype", "float16", "--out", half)
    assert status == 0, stderr
    from safetensors.torch import load_file

    got = load_file(half)
    assert {t.dtype for t in got.values() if t.is_floating_point()} == {torch.float16}
    want = mean_state([c["model"] for c in inputs])
    assert all(torch.allclose(got[key].double(), t, atol=1e-3) for key, t in want.items() if t.is_floating_point())


def test_files_in_shell_order_are_averaged_in_name_order(torchvision_run, tmp_path, capsys):
    files = [torchvision_run / f"model_{e}.pth" for e in (10, 11, 8, 9)]  # `ls model_*.pth` order
    out = tmp_path / "exp.pth"
    status, stdout, stderr = average(capsys, "--files", *files, "--method", "exp", "--alpha", "0.5", "--out", out)
    assert status == 0, stderr
    assert "ordered by the numbers in their names" in stdout
    lines = [line.split() for line in stdout.splitlines() if line.startswith("  ")]
    assert [Path(f).name for _, f, *_ in lines] == ["model_8.pth", "model_9.pth", "model_10.pth", "model_11.pth"]
    assert [float(w) for w, *_ in lines] == [0.125, 0.125, 0.25, 0.5]  # the newest, model_11, gets alpha
    ckpt = _vision_load(out)
    inputs = [_vision_load(torchvision_run / f"model_{e}.pth") for e in (8, 9, 10, 11)]
    assert_state_close(ckpt["model"], mean_state([c["model"] for c in inputs], [0.125, 0.125, 0.25, 0.5]), "exp")
    assert ckpt["epoch"] == 11  # non-model entries from the newest


@pytest.fixture(scope="module")
def dcp_run(tmp_path_factory):
    """torch.distributed.checkpoint.save per step (model and optimizer in one tree): step-{10,20,30}/."""
    import torch.distributed.checkpoint as dcp

    root = tmp_path_factory.mktemp("dcp")
    torch.manual_seed(5)
    model = _vision_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in (10, 20, 30):
        perturb_(model, step)
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
        dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=str(root / f"step-{step}"))
    return root


def _dcp_model_state(path: Path) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    state = {"model": {k: torch.empty_like(v) for k, v in _vision_model().state_dict().items()}}
    dcp.load(state, checkpoint_id=str(path))
    return state["model"]


def test_dcp_run_averages_into_a_directory_dcp_load_reads(dcp_run, tmp_path, capsys):
    run = lt.find_trajectory(dcp_run)
    assert (run.layout, run.unit, run.positions) == ("dcp", "step", (10, 20, 30))
    out = tmp_path / "lawa-30"
    status, _, stderr = average(capsys, "--dir", dcp_run, "--k", 3, "--out", out)
    assert status == 0, stderr
    assert (out / ".metadata").is_file()
    want = mean_state([_dcp_model_state(p) for p in run.paths])
    assert_state_close(_dcp_model_state(out), want, "dcp")


def test_dcp_with_top_level_model_keys_leaves_the_training_state_out(tmp_path, capsys):
    """torchtitan's layout: the model's keys at the top of the tree, the optimizer (FQN-keyed, as DCP's
    get_optimizer_state_dict gives it), scheduler and train state as groups beside them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    torch.manual_seed(6)
    model = _vision_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for step in (10, 20):
        perturb_(model, step)
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
        tree = {**model.state_dict(), "optimizer": get_optimizer_state_dict(model, opt),
                "lr_scheduler": {"last_epoch": step}, "train_state": {"step": torch.tensor(step)}}
        dcp.save(tree, checkpoint_id=str(tmp_path / "ckpt" / f"step-{step}"))
    out = tmp_path / "lawa"
    status, stdout, stderr = average(capsys, "--dir", tmp_path / "ckpt", "--k", 2, "--out", out)
    assert status == 0, stderr
    assert "not written" in stdout or "not written" in stderr
    written = dcp.FileSystemReader(str(out)).read_metadata().state_dict_metadata
    assert set(written) == set(model.state_dict())  # no optimizer moments averaged into the model
    states = []
    for path in (tmp_path / "ckpt" / "step-10", tmp_path / "ckpt" / "step-20", out):
        state = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
        dcp.load(state, checkpoint_id=str(path))  # as torchtitan loads a model-only checkpoint
        states.append(state)
    assert_state_close(states[2], mean_state(states[:2]), "dcp top level")


def test_directory_output_is_refused_when_it_exists(hf_trainer_run, tmp_path, capsys):
    out = tmp_path / "lawa"
    out.mkdir()
    status, _, stderr = average(capsys, "--dir", hf_trainer_run, "--k", 2, "--out", out)
    assert status == 2 and "already exists" in stderr and list(out.iterdir()) == []


# ------------------------------------------------------------------ step-indexed sweeps


def test_step_indexed_sweep_rows_carry_unit_step(hf_trainer_run, tmp_path):
    import lawa_sweep

    run = lt.find_trajectory(hf_trainer_run)

    def evaluate(state, cell):
        return {"val_norm": float(state["transformer.wte.weight"].norm())}

    results = tmp_path / "results.csv"
    lawa_sweep.sweep(run, [lawa_sweep.Lawa((2,))], evaluate, results, distributed=False)
    rows = lu.read_results(results)
    assert set(rows["unit"]) == {"step"}
    assert sorted(set(rows.loc[rows["method"] == "lawa", "epoch"])) == [4, 6]
    assert sorted(set(rows.loc[rows["method"] == "baseline", "epoch"])) == [2, 4, 6]



def test_step_rows_are_labelled_in_steps_by_hours_saved_and_figures(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plots import figstyle, hours_saved
    from plots.tidy import curve, read_tidy

    results = tmp_path / "results.csv"
    rows = [{"method": "baseline", "k": 1, "epoch": s, "split": "val", "metric": "loss", "value": v, "unit": "step"}
            for s, v in ((100, 3.0), (200, 2.0), (300, 1.5), (400, 1.2))]
    rows += [{"method": "lawa", "k": 2, "epoch": s, "split": "val", "metric": "loss", "value": v, "unit": "step"}
             for s, v in ((200, 1.9), (300, 1.4), (400, 1.1))]
    lu.append_rows(results, rows)
    assert hours_saved.main(["--results", str(results), "--metric", "val_loss", "--k", "2",
                             "--epoch-hours", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "steps saved" in out and "at step 200" in out and "epoch" not in out.split("maximum saved:")[1]
    fig, ax = plt.subplots()
    figstyle.plot_curve(ax, curve(read_tidy(results), "val_loss", "lawa", k=2))
    figstyle.format_axis(ax, "val_loss", [1.9, 1.1])
    assert ax.get_xlabel() == "step"
    plt.close(fig)


def test_method_averages_read_any_layout_in_index_space(timm_run, dcp_run):
    import lawa_methods

    run = lt.find_trajectory(timm_run)
    cells = list(lawa_methods.iter_method_averages("swa", run.checkpoints(), starts=[1], ends=[3]))
    assert [(c[0], c[1]) for c in cells] == [(3, 3)]
    inputs = [torch.load(p, weights_only=False)["state_dict"] for p in run.paths]
    assert_state_close(cells[0][2], mean_state(inputs), "swa over timm files")
    steps = lt.find_trajectory(dcp_run)
    (end, k, state), = lu.iter_window_averages(steps, [2], ends=[30])  # DCP directories, in positions
    assert (end, k) == (30, 2)
    assert_state_close(state, mean_state([_dcp_model_state(steps.path(s)) for s in (20, 30)]), "dcp window")


def test_lightning_sharded_checkpoints_average_into_a_directory_lightning_takes_for_one(tmp_path, capsys):
    """Lightning's FSDP sharded checkpoints as its FSDPStrategy.save_checkpoint lays them out: a DCP directory
    epoch=E-step=S.ckpt with the model under ``model``, the optimizer under ``optimizer_0`` and the rest in
    meta.pt. The average is a DCP directory with the newest meta.pt byte for byte: Lightning's own test for a
    sharded checkpoint accepts it, and its own loader reads the averaged weights."""
    import torch.distributed.checkpoint as dcp
    from lightning_fabric.strategies.fsdp import _distributed_checkpoint_load, _is_sharded_checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    run, states = tmp_path / "version_0" / "checkpoints", []
    for epoch in range(3):
        g = torch.Generator().manual_seed(epoch)
        state = {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
        d = run / f"epoch={epoch}-step={5 * (epoch + 1)}.ckpt"
        dcp.save({"model": state, "optimizer_0": {"state": {"0": {"exp_avg": torch.ones(3)}}}}, checkpoint_id=str(d))
        torch.save({"epoch": epoch, "global_step": 5 * (epoch + 1), "loops": {}, "callbacks": {}}, d / "meta.pt")
        states.append(state)
    out = tmp_path / "lawa.ckpt"
    status, printed, err = average(capsys, "--dir", run.parent, "--k", "2", "--out", out)
    assert status == 0, err
    assert "copied meta.pt" in printed
    assert _is_sharded_checkpoint(out)
    newest = run / "epoch=2-step=15.ckpt"
    assert (out / "meta.pt").read_bytes() == (newest / "meta.pt").read_bytes()
    loaded = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    _distributed_checkpoint_load(loaded, out)
    assert_state_close(loaded["model"], mean_state(states[1:]), "lightning sharded")
