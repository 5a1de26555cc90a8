"""lawa_io: every checkpoint container read lazily and safely, averaged tensor by tensor, written back in the newest
input's layout. Fixtures are written by the real writers (torch.save, safetensors, save_pretrained, dcp.save) and
every average is checked against an independent float64 average of the same tensors.
"""

import collections
import dataclasses
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import lawa_io
import lawa_utils as lu
from lawa_tidy import LawaError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def fp64_average(states, weights=None):
    """The oracle: float64 sums of plain dicts of tensors (integers: the newest's)."""
    weights = weights or [1 / len(states)] * len(states)
    out = {}
    for key, t in states[-1].items():
        if t.is_floating_point():
            out[key] = sum(w * s[key].double() for w, s in zip(weights, states, strict=True))
        else:
            out[key] = t
    return out


def assert_close(state, expected, tol=1e-6):
    assert state.keys() == expected.keys()
    for key, want in expected.items():
        got = state[key]
        if want.is_floating_point():
            scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
            assert float((got.double() - want).abs().max() if got.numel() else 0) <= tol * scale, key
        else:
            assert torch.equal(got, want), key


def model_state(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return {"enc.weight": torch.randn(6, 4).to(dtype), "enc.bias": torch.randn(6).to(dtype),
            "bn.running_mean": torch.randn(6).to(dtype), "bn.num_batches_tracked": torch.tensor(10 * seed)}


class RunsCode:
    """A pickle payload that would create ``marker`` if unpickling ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@dataclasses.dataclass
class TrainConfig:
    lr: float = 0.1
    data: pathlib.Path = pathlib.Path("/data/train")


def lightning_like(seed, marker=None):
    from omegaconf import OmegaConf

    hparams = {"cfg": OmegaConf.create({"model": {"width": 6}, "lr": 0.1}), "root": pathlib.Path("/runs/a"),
               "train": TrainConfig()}
    if marker is not None:
        hparams["payload"] = RunsCode(marker)
    return {"epoch": seed, "global_step": 10 * seed, "pytorch-lightning_version": "2.6.6",
            "state_dict": {f"net.{k}": v for k, v in model_state(seed).items()},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(6, 4) * seed}}}], "hyper_parameters": hparams}


# ---------------------------------------------------------------- safety


def test_lightning_hparams_with_paths_omegaconf_and_dataclasses_average_without_trust_or_running_code(tmp_path):
    marker = tmp_path / "pwned"
    files = []
    for seed in range(3):
        files.append(tmp_path / f"epoch={seed}-step={10 * seed}.ckpt")
        torch.save(lightning_like(seed, marker), files[-1])
    readers = [lawa_io.open_checkpoint(f) for f in files]
    assert readers[-1].layout == "lightning" and readers[-1].entries() == ["state_dict"]
    found = readers[-1].placeholders
    assert "pathlib.PosixPath" in found and any(p.endswith("TrainConfig") for p in found)
    assert any(p.startswith("omegaconf.") for p in found), found
    report = lawa_io.average_checkpoints(readers, None, tmp_path / "avg.ckpt")
    assert not marker.exists()
    assert report["entries"] == ["state_dict"] and report["bytes_read"] > 0 and report["seconds"] >= 0
    # the pickle and every record that is not an averaged storage are the newest input's, byte for byte
    with zipfile.ZipFile(files[-1]) as a, zipfile.ZipFile(tmp_path / "avg.ckpt") as b:
        records = [{n.split("/", 1)[1]: z.read(n) for n in z.namelist()} for z in (a, b)]
    changed = sorted(n for n in records[0] if records[0][n] != records[1].get(n))
    assert "data.pkl" in records[0] and records[1]["data.pkl"] == records[0]["data.pkl"]
    # only the averaged float tensors' storages (3 of the 4 model tensors; the step counter is integer) and the
    # archive's content hash differ; the optimizer state's storage and everything else is the newest's
    assert len([n for n in changed if n.startswith("data/")]) == 3 and set(changed) - {".data/serialization_id"} <= {
        n for n in changed if n.startswith("data/")}
    states = [{k: v for k, v in lightning_like(s)["state_dict"].items()} for s in range(3)]
    assert_close(lu.load_model_state(tmp_path / "avg.ckpt"), fp64_average(states))
    # the trusted load (what Lightning itself does) still sees every object as it was
    loaded = torch.load(tmp_path / "avg.ckpt", weights_only=False)
    assert marker.exists()  # only now, by the explicitly unsafe load
    assert loaded["hyper_parameters"]["cfg"].model.width == 6 and loaded["hyper_parameters"]["train"] == TrainConfig()
    assert torch.equal(loaded["optimizer_states"][0]["state"][0]["exp_avg"], torch.ones(6, 4) * 2)


def _hf_bin_dir(path, seed, *, shards=1):
    path.mkdir()
    state = model_state(seed)
    keys = list(state)
    (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return state
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        weight_map.update({k: name for k in part})
        torch.save(part, path / name)
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def test_malicious_pickles_run_no_code_in_any_container(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pwned"
    payload = RunsCode(marker)
    containers = {}
    def carrier(state):  # a module's state_dict() is an OrderedDict whose _metadata attribute is pickled too
        state = collections.OrderedDict(state)
        state._metadata = {"": payload}
        return state

    d = tmp_path / "hf-bin"
    d.mkdir()
    torch.save(carrier(model_state(0)), d / "pytorch_model.bin")
    containers["bin"] = d
    d = tmp_path / "hf-bin-sharded"
    _hf_bin_dir(d, 0, shards=2)
    first = d / "pytorch_model-00001-of-00002.bin"
    torch.save(carrier(torch.load(first)), first)
    containers["sharded bin"] = d
    containers["ckpt"] = tmp_path / "epoch=0-step=0.ckpt"
    torch.save(lightning_like(0, marker), containers["ckpt"])
    containers["pth.tar"] = tmp_path / "checkpoint-0.pth.tar"
    torch.save({"state_dict": model_state(0), "state_dict_ema": model_state(1), "arch": "x", "version": 2,
                "args": payload}, containers["pth.tar"])
    d = tmp_path / "dcp"
    dcp.save({"model": model_state(0)}, checkpoint_id=str(d))
    with open(d / ".metadata", "rb") as f:
        md = pickle.load(f)  # the file this test just wrote
    md.planner_data = {"payload": payload}  # DCP's .metadata is a pickle too
    with open(d / ".metadata", "wb") as f:
        pickle.dump(md, f)
    containers["dcp .metadata"] = d
    for name, path in containers.items():
        with lawa_io.open_checkpoint(path) as ckpt:
            state = ckpt.state()
        names = [k for k in state]
        assert names and not marker.exists(), name
        out = tmp_path / f"out-{name.replace(' ', '-')}{'.pth.tar' if name == 'pth.tar' else ''}"
        lawa_io.average_checkpoints([lawa_io.open_checkpoint(path)] * 2, None, out)
        assert out.exists() and not marker.exists(), name
    # what the old refusal guarded against really runs code: the test's payload is live
    torch.load(containers["ckpt"], weights_only=False)
    assert marker.exists()


def test_trust_keeps_the_unpickling_path_and_legacy_files_load(tmp_path):
    states = [model_state(s) for s in range(2)]
    for s, state in enumerate(states):
        torch.save({"model": state, "cfg": {}, "extra_state": {}}, tmp_path / f"legacy{s}.pt",
                   _use_new_zipfile_serialization=False)
    readers = [lawa_io.open_checkpoint(tmp_path / f"legacy{s}.pt") for s in range(2)]
    assert readers[-1].container == "torch-object" and readers[-1].layout == "fairseq"
    lawa_io.average_checkpoints(readers, [0.25, 0.75], tmp_path / "avg.pt")
    out = torch.load(tmp_path / "avg.pt")
    assert out["lawa"]["weights"] == [0.25, 0.75] and "cfg" in out
    assert_close(out["model"], fp64_average(states, [0.25, 0.75]))
    trusted = lawa_io.open_checkpoint(tmp_path / "legacy1.pt", trust=True)
    assert trusted.container == "torch-object" and torch.equal(trusted.tensor("enc.weight"), states[1]["enc.weight"])


# ---------------------------------------------------------------- containers and layouts


def test_torch_files_of_every_layout_average_each_entry_against_an_independent_average(tmp_path):
    layouts = {
        "timm": lambda s: {"state_dict": model_state(s), "state_dict_ema": model_state(s + 10), "arch": "resnet",
                           "version": 2, "epoch": s, "optimizer": {"state": {}, "param_groups": []}},
        "torchvision": lambda s: {"model": {f"module.{k}": v for k, v in model_state(s).items()},
                                  "model_ema": {f"module.{k}": v for k, v in model_state(s + 10).items()},
                                  "optimizer": {}, "lr_scheduler": {}, "epoch": s, "args": None},
        "examples": lambda s: {"state_dict": {f"module.{k}": v for k, v in model_state(s).items()}, "epoch": s + 1},
        "nanogpt": lambda s: {"model": {f"_orig_mod.{k}": v for k, v in model_state(s).items()}, "iter_num": s},
        "fairseq": lambda s: {"model": model_state(s), "cfg": {"task": {}}, "extra_state": {"epoch": s}},
        "plain": lambda s: model_state(s),
    }
    for layout, make in layouts.items():
        files = [tmp_path / f"{layout}{s}.pt" for s in range(3)]
        for s, f in enumerate(files):
            torch.save(make(s), f)
        readers = [lawa_io.open_checkpoint(f) for f in files]
        assert readers[-1].layout == layout
        report = lawa_io.average_checkpoints(readers, [0.2, 0.3, 0.5], tmp_path / f"avg-{layout}.pt")
        entries = readers[-1].entries()
        assert report["entries"] == entries
        for entry in entries:
            offset = 10 if "ema" in entry else 0
            expected = fp64_average([model_state(s + offset) for s in range(3)], [0.2, 0.3, 0.5])
            assert_close(lu.load_model_state(tmp_path / f"avg-{layout}.pt", entry=entry), expected)
        raw = torch.load(tmp_path / f"avg-{layout}.pt", weights_only=True)
        original = make(2)
        if isinstance(original, dict) and not lawa_io._is_weights(original):
            for key, value in original.items():  # non-weight keys and the wrapper prefixes are the newest's
                if lawa_io._is_weights(value):
                    assert list(raw[key]) == list(value), (layout, key)
                else:
                    assert raw[key] == value, (layout, key)
    # one entry on request: the EMA of a timm file alone, the rest kept from the newest and reported
    readers = [lawa_io.open_checkpoint(tmp_path / f"timm{s}.pt") for s in range(3)]
    report = lawa_io.average_checkpoints(readers, None, tmp_path / "ema-only.pth.tar", entries=["state_dict_ema"])
    assert report["entries"] == ["state_dict_ema"] and report["kept"] == ["state_dict"] and report["notes"]
    assert_close(lu.load_model_state(tmp_path / "ema-only.pth.tar"), model_state(2))
    with pytest.raises(LawaError, match="no weights entry 'ema'"):
        lawa_io.average_checkpoints(readers, None, tmp_path / "x.pt", entries=["ema"])
    # a dict of weights under a name no layout uses is reported as copied, and can be named to be averaged
    for s in range(2):
        torch.save({"state_dict": model_state(s), "ema_weights": model_state(s + 10)}, tmp_path / f"odd{s}.pt")
    readers = [lawa_io.open_checkpoint(tmp_path / f"odd{s}.pt") for s in range(2)]
    report = lawa_io.average_checkpoints(readers, None, tmp_path / "odd.pt")
    assert report["kept"] == ["ema_weights"] and any("not averaged: ema_weights" in n for n in report["notes"])
    report = lawa_io.average_checkpoints(readers, None, tmp_path / "odd-both.pt", entries=["state_dict", "ema_weights"])
    assert report["kept"] == []
    assert_close(lu.load_model_state(tmp_path / "odd-both.pt", entry="ema_weights"),
                 fp64_average([model_state(10), model_state(11)]))


def test_hf_directories_keep_shards_index_tied_weights_and_load_with_from_pretrained(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=8, bos_token_id=0, eos_token_id=0)
    states = []
    for s in range(3):
        torch.manual_seed(s)
        model = GPT2LMHeadModel(config)
        model.save_pretrained(tmp_path / f"single-{s}")
        model.save_pretrained(tmp_path / f"sharded-{s}", max_shard_size="8KB")
        (tmp_path / f"sharded-{s}" / "optimizer.pt").write_bytes(b"not copied")
        (tmp_path / f"sharded-{s}" / "rng_state_0.pth").write_bytes(b"not copied")
        (tmp_path / f"sharded-{s}" / "tokenizer.json").write_text("{}")
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    expected = fp64_average(states)
    for kind in ("single", "sharded"):
        readers = [lawa_io.open_checkpoint(tmp_path / f"{kind}-{s}") for s in range(3)]
        out = tmp_path / f"avg-{kind}"
        report = lawa_io.average_checkpoints(readers, None, out)
        model = GPT2LMHeadModel.from_pretrained(out)
        assert_close(model.state_dict(), expected)
        newest = sorted(p.name for p in (tmp_path / f"{kind}-2").iterdir() if p.name not in lawa_io.TRAINING_STATE_FILES
                        and not p.name.startswith("rng_state"))
        assert sorted(p.name for p in out.iterdir()) == sorted([*newest, "lawa.json"])
        from safetensors import safe_open

        for shard in out.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as f, safe_open(str(tmp_path / f"{kind}-2" / shard.name), "pt") as g:
                assert f.metadata()["format"] == "pt" and list(f.keys()) == list(g.keys())
                assert "lm_head.weight" not in f.keys()  # tied: stored as the input stored it (not at all)
        if kind == "sharded":
            index = json.loads((out / "model.safetensors.index.json").read_text())
            assert index["weight_map"] == json.loads((tmp_path / "sharded-2/model.safetensors.index.json")
                                                     .read_text())["weight_map"]
            assert any("optimizer.pt" in n for n in report["notes"])
    # pytorch_model.bin with tied weights sharing one storage, and sharded .bin with its index
    for shards in (1, 2):
        dirs = []
        for s in range(3):
            d = tmp_path / f"bin{shards}-{s}"
            _hf_bin_dir(d, s, shards=shards)
            dirs.append(d)
        if shards == 1:
            for s, d in enumerate(dirs):
                state = model_state(s)
                state["head.weight"] = state["enc.weight"]  # tied
                torch.save(state, d / "pytorch_model.bin")
        readers = [lawa_io.open_checkpoint(d) for d in dirs]
        lawa_io.average_checkpoints(readers, None, tmp_path / f"avg-bin{shards}")
        want = fp64_average([model_state(s) for s in range(3)])
        if shards == 1:
            want["head.weight"] = want["enc.weight"]
            raw = torch.load(tmp_path / "avg-bin1" / "pytorch_model.bin")
            assert raw["head.weight"].untyped_storage().data_ptr() == raw["enc.weight"].untyped_storage().data_ptr()
        assert_close(lu.load_model_state(tmp_path / f"avg-bin{shards}"), want)


def test_hf_directory_without_config_writes_weights_and_says_from_pretrained_needs_one(tmp_path):
    from safetensors.torch import save_file

    for s in range(2):
        (tmp_path / f"c{s}").mkdir()
        save_file(model_state(s), tmp_path / f"c{s}" / "model.safetensors", metadata={"format": "pt"})
    report = lawa_io.average_checkpoints([lawa_io.open_checkpoint(tmp_path / f"c{s}") for s in range(2)], None,
                                         tmp_path / "out")
    assert any("from_pretrained on the output will need a config" in n for n in report["notes"])
    assert_close(lu.load_model_state(tmp_path / "out"), fp64_average([model_state(s) for s in range(2)]))


def test_dcp_directories_read_the_model_subtree_and_write_a_dcp_that_dcp_load_reads(tmp_path):
    import torch.distributed.checkpoint as dcp

    for s in range(3):
        dcp.save({"model": model_state(s), "optimizer": {"state": {"w": torch.ones(2) * s}}, "step": s},
                 checkpoint_id=str(tmp_path / f"step-{s}"))
    readers = [lawa_io.open_checkpoint(tmp_path / f"step-{s}") for s in range(3)]
    assert readers[0].layout == "dcp" and set(readers[0].meta()) == set(model_state(0))
    report = lawa_io.average_checkpoints(readers, None, tmp_path / "avg")
    assert any("not the model" in n for n in report["notes"])
    loaded = {"model": {k: torch.empty_like(v) for k, v in model_state(0).items()}}
    dcp.load(loaded, checkpoint_id=str(tmp_path / "avg"))
    assert_close(loaded["model"], fp64_average([model_state(s) for s in range(3)]))
    assert_close(lu.load_model_state(tmp_path / "avg"), loaded["model"], tol=0)
    # an HF Trainer checkpoint saved under FSDP: its model is the DCP directory pytorch_model_fsdp_0
    trainer_dir = tmp_path / "checkpoint-3"
    dcp.save({"model": model_state(3)}, checkpoint_id=str(trainer_dir / "pytorch_model_fsdp_0"))
    (trainer_dir / "trainer_state.json").write_text("{}")
    with lawa_io.open_checkpoint(trainer_dir) as ckpt:
        assert ckpt.layout == "dcp" and ckpt.path.name == "pytorch_model_fsdp_0"
        assert_close(ckpt.state(), model_state(3), tol=0)


def test_safetensors_output_streams_one_entry_with_format_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    for s in range(3):
        save_file(model_state(s), tmp_path / f"m{s}.safetensors")
    readers = [lawa_io.open_checkpoint(tmp_path / f"m{s}.safetensors") for s in range(3)]
    lawa_io.average_checkpoints(readers, None, tmp_path / "avg.safetensors")
    with safe_open(str(tmp_path / "avg.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"
        assert json.loads(f.metadata()["lawa"])["files"][-1].endswith("m2.safetensors")
    assert_close(lu.load_model_state(tmp_path / "avg.safetensors"), fp64_average([model_state(s) for s in range(3)]))
    torch.save({"state_dict": model_state(0), "state_dict_ema": model_state(1), "arch": "a", "version": 2},
               tmp_path / "t.pth.tar")
    with pytest.raises(LawaError, match="choose one"):
        lawa_io.average_checkpoints([lawa_io.open_checkpoint(tmp_path / "t.pth.tar")], None, tmp_path / "t.safetensors")


# ---------------------------------------------------------------- dtypes


def test_dtypes_fp8_bf16_accumulate_in_float32_integers_from_newest_mixed_windows_refused(tmp_path):
    from safetensors.torch import save_file

    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16, torch.float64):
        states = [model_state(s, dtype) for s in range(4)]
        for s, state in enumerate(states):
            torch.save({"state_dict": state}, tmp_path / f"{dtype}-{s}.pt")
        readers = [lawa_io.open_checkpoint(tmp_path / f"{dtype}-{s}.pt") for s in range(4)]
        lawa_io.average_checkpoints(readers, None, tmp_path / f"avg-{dtype}.pt")
        got = lu.load_model_state(tmp_path / f"avg-{dtype}.pt")
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for key, t in got.items():
            assert t.dtype == states[-1][key].dtype, (dtype, key)
            if t.is_floating_point():  # the float32 mean of the widened values, rounded once to the dtype
                want = (sum(s[key].to(acc) for s in states) / 4).to(dtype)
                assert torch.equal(t.view(torch.uint8), want.view(torch.uint8)), (dtype, key)
            else:
                assert torch.equal(t, states[-1][key])
    save_file(model_state(0), tmp_path / "a.safetensors")
    save_file(model_state(1, torch.bfloat16), tmp_path / "b.safetensors")
    readers = [lawa_io.open_checkpoint(tmp_path / n) for n in ("a.safetensors", "b.safetensors")]
    with pytest.raises(LawaError, match=r"float32 in .*a\.safetensors but bfloat16 in .*b\.safetensors"):
        lawa_io.average_checkpoints(readers, None, tmp_path / "mixed.safetensors")
    assert not (tmp_path / "mixed.safetensors").exists()
    lawa_io.average_checkpoints(readers, None, tmp_path / "cast.safetensors", dtype=torch.float32)
    expected = fp64_average([model_state(0), {k: v.float() if v.is_floating_point() else v
                                              for k, v in model_state(1, torch.bfloat16).items()}])
    got = lu.load_model_state(tmp_path / "cast.safetensors")
    assert got["enc.weight"].dtype == torch.float32
    assert_close(got, expected)


# ---------------------------------------------------------------- bad input


def _no_leftovers(directory):
    return [p.name for p in directory.iterdir() if ".part" in p.name or ".old" in p.name]


def test_bad_inputs_give_one_line_errors_naming_the_file_and_write_nothing(tmp_path):
    from safetensors.torch import save_file

    def sharded(name, weight_map, files):
        d = tmp_path / name
        d.mkdir()
        for file, keys in files.items():
            save_file({k: torch.ones(2) for k in keys}, d / file)
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return d

    cases = {
        "missing shard": (sharded("a", {"x": "s1.safetensors", "y": "s2.safetensors"}, {"s1.safetensors": ["x"]}),
                          "s2.safetensors is missing"),
        "outside ../": (sharded("b", {"x": "../s1.safetensors"}, {}), "points outside its directory"),
        "outside absolute": (sharded("c", {"x": "/etc/passwd"}, {}), "points outside its directory"),
        "two shards": (sharded("d", {"x": "s1.safetensors", "y": "s2.safetensors"},
                               {"s1.safetensors": ["x"], "s2.safetensors": ["x", "y"]}), "two shards"),
        "index names a tensor no shard holds": (sharded("e", {"x": "s1.safetensors", "y": "s1.safetensors"},
                                                        {"s1.safetensors": ["x"]}), "no shard holds it"),
        "shard holds an unmapped tensor": (sharded("f", {"x": "s1.safetensors"}, {"s1.safetensors": ["x", "z"]}),
                                           "does not map"),
        "no weights": (tmp_path / "empty", "directory with no weights"),
        "empty file": (tmp_path / "empty.pt", "is empty"),
        "truncated": (tmp_path / "trunc.pt", "truncated"),
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(model_state(0), tmp_path / "whole.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:300])
    for name, (path, message) in cases.items():
        with pytest.raises(LawaError) as info:
            lawa_io.open_checkpoint(path)
        text = str(info.value)
        assert message in text and "\n" not in text and str(path.name) in text, (name, text)
    # inputs that open but cannot be averaged: NaN weights, mismatched shapes; nothing is written
    bad = model_state(1)
    bad["enc.bias"][2] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    torch.save({**model_state(1), "enc.bias": torch.ones(7)}, tmp_path / "shape.pt")
    for other, message in (("nan.pt", "nan.pt: tensor 'enc.bias' has NaN/Inf"), ("shape.pt", "mismatched shapes")):
        readers = [lawa_io.open_checkpoint(tmp_path / "whole.pt"), lawa_io.open_checkpoint(tmp_path / other)]
        with pytest.raises(LawaError, match=message):
            lawa_io.average_checkpoints(readers, None, tmp_path / "out.pt")
        assert not (tmp_path / "out.pt").exists() and not _no_leftovers(tmp_path)
    readers = [lawa_io.open_checkpoint(tmp_path / "whole.pt")]
    lawa_io.average_checkpoints(readers, None, tmp_path / "out.pt")
    with pytest.raises(LawaError, match="already exists"):
        lawa_io.average_checkpoints(readers, None, tmp_path / "out.pt")


# ---------------------------------------------------------------- kills and memory

WRITER = """
import sys, lawa_io
readers = [lawa_io.open_checkpoint(p) for p in sys.argv[2:]]
print(lawa_io.average_checkpoints(readers, None, sys.argv[1], force=True)["bytes_written"])
"""


def _big_hf_run(tmp_path, n=3, tensors=8, numel=1 << 19):
    from safetensors.torch import save_file

    dirs = []
    for s in range(n):
        d = tmp_path / f"checkpoint-{s}"
        d.mkdir()
        g = torch.Generator().manual_seed(s)
        names = [f"layer{i}.weight" for i in range(tensors)]
        weight_map = {}
        for part in range(2):
            file = f"model-{part + 1:05d}-of-00002.safetensors"
            save_file({k: torch.randn(numel, generator=g) for k in names[part::2]}, d / file, metadata={"format": "pt"})
            weight_map.update({k: file for k in names[part::2]})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (d / "config.json").write_text("{}")
        dirs.append(d)
    return dirs


def test_kill_9_of_a_directory_output_leaves_no_target_and_a_rerun_succeeds(tmp_path):
    dirs = _big_hf_run(tmp_path)
    out = tmp_path / "avg"
    cmd = [sys.executable, "-c", WRITER, str(out), *map(str, dirs)]
    killed_mid_write = 0
    for attempt in range(1):
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith(".avg.part") and any(p.iterdir()) for p in tmp_path.iterdir() if p.is_dir()):
                break
            time.sleep(0.001)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_write += proc.wait() == -signal.SIGKILL
        proc.communicate()
        assert not out.exists(), attempt  # never a partial directory under the target's name
    assert killed_mid_write == 1
    assert any(p.name.startswith(".avg.part") for p in tmp_path.iterdir())  # the killed writers' temporaries
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not _no_leftovers(tmp_path)  # the rerun removed them
    states = [lu.load_model_state(d) for d in dirs]
    assert_close(lu.load_model_state(out), fp64_average(states))


MEASURE = """
import os, sys, threading, time, lawa_io
lawa_io.CHUNK_ELEMENTS = int(os.environ.get("CHUNK_ELEMENTS", lawa_io.CHUNK_ELEMENTS))
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
readers = [lawa_io.open_checkpoint(p) for p in sys.argv[2:]]
floor, peak, running = anon(), [0], True
def sample():
    while running:
        peak[0] = max(peak[0], anon())
        time.sleep(0.0005)
t = threading.Thread(target=sample); t.start()
lawa_io.average_checkpoints(readers, None, sys.argv[1])
running = False; t.join()
print(floor, peak[0])
"""


def test_peak_memory_is_about_two_of_the_largest_tensor_whatever_the_model_size_and_k(tmp_path):
    """Anonymous memory only (RssAnon): memory-mapped and page-cache bytes of the inputs do not count."""
    dirs = _big_hf_run(tmp_path, n=4, tensors=8, numel=1 << 20)  # 8 tensors of 4 MB each, k = 4: 128 MB of inputs
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "avg"), *map(str, dirs)], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})  # see the test below
    assert done.returncode == 0, done.stderr
    floor, peak = map(int, done.stdout.split())
    largest = (1 << 20) * 4
    print(f"peak anonymous memory above the floor: {(peak - floor) / largest:.2f} x the largest tensor")
    # the sum and one input tensor: measured 2.05 x (3.0-4.0 x while the writer still held the previous tensor);
    # one model is 8 x, k models 32 x
    assert peak - floor <= 3 * largest, (floor, peak)


def test_large_tensors_are_averaged_in_pieces_with_the_same_bits_and_half_the_memory(tmp_path, monkeypatch):
    """A tensor above CHUNK_ELEMENTS whose inputs are safetensors is summed piece by piece (read with pread):
    the output is bit-equal to the whole-tensor sum (fp32 and bf16, uniform and EXP weights) and the peak is the
    output plus a piece per input, under the 2 x of the largest tensor that the whole-tensor sum needs."""
    from safetensors.torch import save_file

    dirs = _big_hf_run(tmp_path, n=4, tensors=8, numel=1 << 20)
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "avg"), *map(str, dirs)], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          # a fixed mmap threshold: glibc's sliding one otherwise keeps a freed 4 MB output in the
                          # heap now and then (+1 x: 2.15 x in 2 of 10 runs, 1.21 x in the others)
                          env={**os.environ, "CHUNK_ELEMENTS": "65536", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    assert done.returncode == 0, done.stderr
    floor, peak = map(int, done.stdout.split())
    print(f"peak anonymous memory above the floor, in pieces: {(peak - floor) / (4 << 20):.2f} x the largest tensor")
    assert peak - floor <= 2 * (4 << 20), (floor, peak)  # measured 1.12-1.21 x
    files = []
    for s in range(3):
        g = torch.Generator().manual_seed(10 + s)
        files.append(tmp_path / f"m{s}.safetensors")  # sizes that are not multiples of the piece
        save_file({"a": torch.randn(37, 1001, generator=g), "b": torch.randn(50_003, generator=g).bfloat16(),
                   "c": torch.randn(3, generator=g)}, files[-1])
    for weights in (None, lu.method_weights("exp", 3, 0.8)):
        outs = {}
        for chunk in (4096, 1 << 22):
            monkeypatch.setattr(lawa_io, "CHUNK_ELEMENTS", chunk)
            out = tmp_path / f"avg-{chunk}-{weights is None}.safetensors"
            lawa_io.average_checkpoints([lawa_io.open_checkpoint(f) for f in files], weights, out)
            outs[chunk] = lawa_io.open_checkpoint(out).state()
        assert all(torch.equal(outs[4096][k], outs[1 << 22][k]) and outs[4096][k].dtype == outs[1 << 22][k].dtype
                   for k in ("a", "b", "c"))
        want = sum((w if weights else 1 / 3) * lawa_io.open_checkpoint(f).tensor("a").double()
                   for w, f in zip(weights or [1, 1, 1], files, strict=True))
        assert torch.allclose(outs[4096]["a"].double(), want, rtol=1e-6, atol=1e-6)
