"""lawa_sweep and ``lawa sweep``: every method against an independent average, resume after kill -9, the
console command with a user's evaluation file, sharding over 2 gloo ranks (equal to one process, every cell
once, also after one rank is killed; a DCP trajectory), and step-indexed runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lawa_sweep as ls  # noqa: E402
import lawa_utils as lu  # noqa: E402
from lawa_trajectory import Trajectory  # noqa: E402

TIMEOUT = 240  # seconds per subprocess: a hung rendezvous fails the test, not the CI run
N = 8  # checkpoints in the tiny run


def theta(e: int) -> dict[str, torch.Tensor]:
    """Checkpoint e: float32 weights drawn from seed e, a float16 bias and an integer buffer."""
    g = torch.Generator().manual_seed(e)
    return {"w": torch.randn(5, 3, generator=g), "b": torch.randn(4, generator=g).half(),
            "bn.num_batches_tracked": torch.tensor(10 * e)}


def write_run(directory: Path, positions=range(1, N + 1), name="checkpoint{}.pt") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for e in positions:
        torch.save({"state_dict": {"module." + k: v for k, v in theta(e).items()}, "epoch": e},
                   directory / name.format(e))
    return directory


def weight_sum(state) -> float:
    return float(sum(t.double().sum() for t in state.values() if t.is_floating_point()))


def expected(weights: dict[int, float]) -> float:
    """Σ of all float weights of Σ_i w_i θ_i, computed independently in float64 (each tensor in its dtype first)."""
    total = 0.0
    for key in ("w", "b"):
        avg = sum(w * theta(i)[key].double() for i, w in weights.items())
        total += float(avg.to(theta(1)[key].dtype).double().sum())
    return total


def closed_form(label: str, end: int, k: int) -> dict[int, float]:
    """The weights each method puts on checkpoints 1..N at end ``end`` (epochs = indices here)."""
    if label in ("baseline", "lawa", "swa"):
        return {i: 1.0 / k for i in range(end - k + 1, end + 1)}
    if label == "exp":
        w = lu.method_weights("exp", k, 0.8)
        return dict(zip(range(end - k + 1, end + 1), w, strict=True))
    if label == "ema":  # k = 2: d = 0.5 over every checkpoint from the first
        w = lu.method_weights("exp", end, 0.5)
        return dict(zip(range(1, end + 1), w, strict=True))
    if label == "ewa-s2":
        return {end - 2 * j: 1.0 / k for j in range(k)}
    raise AssertionError(label)


METHODS = [ls.Lawa((2, 3)), ls.Exp((2,), alpha=0.8), ls.Ema((0.5,)), ls.Swa((3,)), ls.Ewa((2,), spacing=2)]


def test_every_method_equals_an_independent_average_and_rows_are_tidy(tmp_path):
    run = write_run(tmp_path / "run")
    seen = []

    def evaluate(state, cell):
        seen.append(cell)
        return {"val_sum": weight_sum(state), "train_n": float(state["bn.num_batches_tracked"])}

    out = tmp_path / "results.csv"
    results = ls.sweep(run, METHODS, evaluate, out, optimizer="sgd", seed=3)
    planned = ls.plan_cells(run, METHODS)
    assert seen == planned and len(set(seen)) == len(seen)
    # cells: baseline 8, lawa k=2: 7, k=3: 6, exp 7, ema 8, swa 6 (s=3: E=3..8), ewa-s2 k=2: 6
    assert len(seen) == 8 + 7 + 6 + 7 + 8 + 6 + 6
    assert len(results) == 2 * len(seen)
    for row in results.itertuples():
        if row.split == "val":
            assert row.value == pytest.approx(expected(closed_form(row.method, row.epoch, row.k)), rel=1e-6, abs=1e-5)
        else:  # integer buffers come from the newest checkpoint of the window, never averaged
            assert row.value == 10 * row.epoch
    assert set(results["optimizer"]) == {"sgd"} and set(results["seed"]) == {3}
    assert list(lu.read_results(out).columns[:9]) == lu.RESULT_COLUMNS[:9]
    # a second sweep finds everything done and evaluates nothing
    again = ls.sweep(run, METHODS, lambda s, c: pytest.fail("nothing is left to evaluate"), out, optimizer="sgd",
                     seed=3)
    assert len(again) == len(results)


def test_flags_old_and_new_names_give_the_same_specs(tmp_path):
    import argparse

    traj = ls._trajectory(write_run(tmp_path / "run", range(1, 5)))
    p = argparse.ArgumentParser()
    ls.add_sweep_args(p)
    new = ls.methods_from_args(p.parse_args(["--method", "uni,ema,ewa", "--ks", "2", "--decays", "0.5",
                                             "--spacing", "2", "--ewa-blocks"]), traj)
    assert new == [ls.Lawa((2,)), ls.Ema((0.5,)), ls.Ewa((2,), 2, True)]
    old = ls.methods_from_args(p.parse_args(["--ks", "2", "--spacings", "1,2", "--layout", "blocks",
                                             "--ema-decays", "0.5", "--swa-starts", "2", "--updates", "2:4"]), traj)
    assert [m.label for m in old] == ["lawa", "ewa-s2", "ema", "swa"]
    assert ls.parse_ends("2:4", traj) == [2, 3, 4]
    with pytest.raises(lu.LawaError, match="--decays applies to --method ema"):
        ls.methods_from_args(p.parse_args(["--method", "uni", "--decays", "0.5"]), traj)
    with pytest.raises(lu.LawaError, match="checkpoint9.pt does not exist"):
        ls.methods_from_args(p.parse_args(["--method", "swa", "--swa-starts", "9"]), traj)


def test_step_indexed_run_records_steps_and_refuses_windows_across_a_gap(tmp_path):
    run = write_run(tmp_path / "run", (100, 200, 300, 400, 600, 700))
    paths = tuple(sorted(run.iterdir(), key=lambda p: int(p.stem[10:])))
    traj = Trajectory(run, "pattern", "step", (100, 200, 300, 400, 600, 700), paths)
    out = tmp_path / "results.csv"
    results = ls.sweep(traj, [ls.Lawa((2,))], lambda s, c: {"val_sum": weight_sum(s)}, out, ends=[200, 300, 400, 700])
    assert sorted(results["epoch"].unique()) == [200, 300, 400, 700]
    if "unit" in results.columns:
        assert set(results["unit"]) == {"step"}
    with pytest.raises(lu.LawaError, match="gap"):
        ls.plan_cells(traj, [ls.Lawa((2,))], ends=[600])


def test_each_block_of_ends_reads_only_the_checkpoints_its_windows_need(tmp_path):
    run = write_run(tmp_path / "run")
    methods = [ls.Lawa((2, 3))]
    blocks = ls.shard_ends(ls.plan_cells(run, methods), 2)
    assert blocks == [[1, 2, 3, 4], [5, 6, 7, 8]]  # 9 cells and 12: end 5's cells are 10..12 of 21, centred on 10.5
    for r, block in enumerate(blocks):
        reads: list[str] = []

        def load(path, reads=reads):
            reads.append(Path(path).name)
            return lu.load_model_state(path)

        ls.sweep(run, methods, lambda s, c: {"val_sum": weight_sum(s)}, tmp_path / f"r{r}.csv", ends=block, load=load,
                 distributed=False)
        first = max(1, block[0] - 2)  # the k=3 window of the block's first end
        assert reads == [f"checkpoint{e}.pt" for e in range(first, block[-1] + 1)]


def test_lawa_average_is_the_average_command(tmp_path, capsys):
    import lawa_cli

    run = write_run(tmp_path / "run", range(1, 5))
    assert lawa_cli.main(["average", "--dir", str(run), "--end", "4", "--k", "2", "--out", str(tmp_path / "a.pt")]) == 0
    averaged = lu.load_model_state(tmp_path / "a.pt")
    assert weight_sum(averaged) == pytest.approx(expected({3: 0.5, 4: 0.5}), rel=1e-6)
    assert lawa_cli.main(["average", "--dir", str(run), "--end", "9", "--k", "2", "--out", str(tmp_path / "b.pt")]) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "b.pt").exists()


BN_EVAL = """
import torch
MODEL = torch.nn.BatchNorm1d(3)
def loader():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, generator=g) * 2 + 5 for _ in range(4)]
@torch.no_grad()
def evaluate(state, recompute_bn):
    MODEL.load_state_dict(state)
    recompute_bn(MODEL)
    return {"val_mean": float(MODEL.running_mean.double().sum()), "val_weight": float(MODEL.weight.double().sum())}
"""


def test_bn_loader_recomputes_statistics_on_averaged_cells_only(tmp_path, capsys):
    import lawa_cli

    run = tmp_path / "run"
    run.mkdir()
    for e in range(1, 5):
        bn = torch.nn.BatchNorm1d(3)
        with torch.no_grad():
            bn.weight.fill_(float(e))
            bn.running_mean.fill_(float(e))
        torch.save(bn.state_dict(), run / f"checkpoint{e}.pt")
    (tmp_path / "bn_eval.py").write_text(BN_EVAL)
    out = tmp_path / "results.csv"
    code = lawa_cli.main(["sweep", "--dir", str(run), "--eval", f"{tmp_path / 'bn_eval.py'}:evaluate",
                          "--bn-loader", f"{tmp_path / 'bn_eval.py'}:loader", "--bn-batches", "2", "--ks", "2",
                          "--out", str(out)])
    assert code == 0
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, generator=g) * 2 + 5 for _ in range(2)]  # the first 2 of the loader's 4
    data_mean = float(torch.cat(batches).double().mean(0).sum())
    df = lu.read_results(out)
    for row in df.itertuples():
        if row.metric == "mean":  # baseline: the checkpoint's own statistics; averaged: recomputed over the batches
            want = 3.0 * row.epoch if row.method == "baseline" else data_mean
            assert row.value == pytest.approx(want, rel=1e-5)
        else:
            assert row.value == pytest.approx(3.0 * (row.epoch - (row.k - 1) / 2), rel=1e-6)
    assert set(zip(df["method"], df["k"], strict=True)) == {("baseline", 1), ("lawa", 2)}


# ---------------------------------------------------------------- the console command, kills, ranks

EVAL_FILE = '''
import os, signal, torch
torch.set_num_threads(1)  # the same threads in every process: equal values
CALLS = 0
def evaluate(state, cell):
    global CALLS
    CALLS += 1
    kill_at = int(os.environ.get("KILL_AT", "0"))
    if kill_at and CALLS == kill_at and os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", "0"):
        os.kill(os.getpid(), signal.SIGKILL)
    return {"val_sum": float(sum(t.double().sum() for t in state.values() if t.is_floating_point())),
            "val_end": float(cell.end)}
'''

SWEEP = ["sweep", "--method", "uni,ema,swa", "--ks", "2,3", "--decays", "0.5", "--swa-starts", "2",
         "--optimizer", "sgd", "--seed", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], *, ok: bool = True, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group, killed whole if it outlives TIMEOUT."""
    full_env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {TIMEOUT} s: {' '.join(cmd)}\n{stdout[-2000:]}\n{stderr[-2000:]}")
    if ok:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def lawa(*args: str, ok: bool = True, **env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "lawa_cli", *args], ok=ok, **env)


def torchrun(*args: str, ok: bool = True, **env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "lawa_cli", *args],
               ok=ok, **env)


def slurm(*args: str) -> None:
    """Two ranks as ``srun --ntasks 2`` starts them: SLURM's variables and MASTER_ADDR/MASTER_PORT, no torchrun."""
    port = str(free_port())
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "SLURM_NTASKS": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    procs = [subprocess.Popen([sys.executable, "-m", "lawa_cli", *args], env={**env, "SLURM_PROCID": str(r),
                              "SLURM_LOCALID": str(r)}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"SLURM-style ranks timed out after {TIMEOUT} s")
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]


def cells(path: Path) -> pd.DataFrame:
    df = lu.read_results(path)
    return df.sort_values(["method", "epoch", "k", "split", "metric"]).reset_index(drop=True)


def assert_once_and_equal(path: Path, reference: pd.DataFrame) -> None:
    got = cells(path)
    assert not got.duplicated(["method", "k", "epoch", "split", "metric"]).any()
    pd.testing.assert_frame_equal(got, reference)  # bit-equal values, every cell


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One run, its evaluation file, and the uninterrupted single-process sweep of it through ``lawa sweep``."""
    root = tmp_path_factory.mktemp("cli")
    write_run(root / "run")
    (root / "my_eval.py").write_text(EVAL_FILE)
    out = root / "reference.csv"
    done = lawa(*SWEEP, "--dir", str(root / "run"), "--eval", f"{root / 'my_eval.py'}:evaluate", "--out", str(out))
    return root, out, done


def test_lawa_sweep_console_command_with_an_eval_file(cli_run, capsys):
    root, out, done = cli_run
    df = cells(out)
    # baseline 8 + lawa (7 + 6) + ema 8 + swa (s=2: E=2..8) 7
    assert df.groupby(["method", "epoch", "k"]).ngroups == 8 + 13 + 8 + 7
    for row in df[df["metric"] == "sum"].itertuples():
        label = "lawa" if row.method == "swa" else row.method
        assert row.value == pytest.approx(expected(closed_form(label, row.epoch, row.k)), rel=1e-6, abs=1e-5)
    assert "val_sum by end epoch" in done.stdout
    assert (root / "reference.args.json").is_file()
    import lawa_cli

    assert lawa_cli.main(["sweep", "--dir", str(root / "run"), "--eval", "no_such_module:fn"]) == 2
    assert capsys.readouterr().err.startswith("lawa sweep: error: --eval no_such_module:fn: cannot import")


def test_resume_after_kill_9_computes_only_the_missing_cells(cli_run, tmp_path):
    root, reference, _ = cli_run
    out = tmp_path / "results.csv"
    args = [*SWEEP, "--dir", str(root / "run"), "--eval", f"{root / 'my_eval.py'}:evaluate", "--out", str(out)]
    killed = lawa(*args, ok=False, KILL_AT="9")
    assert killed.returncode == -signal.SIGKILL
    assert lu.read_results(out).groupby(["method", "epoch", "k"]).ngroups == 8
    rerun = lawa(*args)
    assert "28 cells" in rerun.stderr  # 36 in all, 8 done before the kill
    assert_once_and_equal(out, cells(reference))


def test_two_gloo_ranks_equal_one_process_and_a_rerun_after_a_killed_rank_completes_it(cli_run, tmp_path):
    root, reference, _ = cli_run
    args = [*SWEEP, "--dir", str(root / "run"), "--eval", f"{root / 'my_eval.py'}:evaluate"]
    sharded = tmp_path / "sharded.csv"
    done = torchrun(*args, "--out", str(sharded))
    assert_once_and_equal(sharded, cells(reference))
    assert not list(tmp_path.glob("sharded.csv.part*"))
    # 36 cells; ends 1..4 hold 16 of them, 5..8 20: contiguous blocks cannot split them more evenly
    assert "(rank 0 of 2): 16 cells" in done.stderr and "(rank 1 of 2): 20 cells" in done.stderr

    out = tmp_path / "killed.csv"
    killed = torchrun(*args, "--out", str(out), ok=False, KILL_AT="5", KILL_RANK="1")
    assert killed.returncode != 0
    assert list(tmp_path.glob("killed.csv.part*"))  # the cells finished before the kill are kept
    slurm(*args, "--out", str(out))  # the rerun starts as srun would: SLURM variables, no torchrun
    assert_once_and_equal(out, cells(reference))
    assert not list(tmp_path.glob("killed.csv.part*"))


def test_a_dcp_trajectory_swept_on_two_gloo_ranks_equals_one_process(tmp_path):
    """DCP step-{N}/ directories (model and optimizer subtrees) through ``lawa sweep``: the ranks read their
    windows with DCP's reader under a live process group and end cleanly; every cell once, the same values."""
    import torch.distributed.checkpoint as dcp

    for e in range(1, N + 1):
        dcp.save({"model": theta(e), "optimizer": {"lr": torch.tensor(0.1)}},
                 checkpoint_id=str(tmp_path / "run" / f"step-{100 * e}"), no_dist=True)
    (tmp_path / "my_eval.py").write_text(EVAL_FILE)
    args = ["sweep", "--method", "uni,ema,swa", "--ks", "2,3", "--decays", "0.5", "--swa-starts", "200",
            "--dir", str(tmp_path / "run"), "--eval", f"{tmp_path / 'my_eval.py'}:evaluate"]
    lawa(*args, "--out", str(tmp_path / "one.csv"))
    torchrun(*args, "--out", str(tmp_path / "two.csv"))
    one = cells(tmp_path / "one.csv")
    assert set(one["unit"]) == {"step"} and one.groupby(["method", "epoch", "k"]).ngroups == 8 + 13 + 8 + 7
    sums = one[(one["metric"] == "sum") & (one["method"] == "lawa")]
    for row in sums.itertuples():  # epoch column: steps; checkpoint i is step 100 i
        want = expected(closed_form("lawa", row.epoch // 100, row.k))
        assert row.value == pytest.approx(want, rel=1e-6, abs=1e-5)
    assert_once_and_equal(tmp_path / "two.csv", one)
