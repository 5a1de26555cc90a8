"""lawa_tidy: the tidy CSV's unit column, files written before it, done-cell filters, and no torch on import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import lawa_tidy as lt

REPO = Path(__file__).resolve().parents[1]
OLD_HEADER = "method,k,epoch,split,metric,value,wall_seconds,optimizer,seed\n"


def row(method="lawa", k=2, epoch=3, metric="loss", value=0.5, **extra):
    return {"method": method, "k": k, "epoch": epoch, "split": "val", "metric": metric, "value": value,
            "optimizer": "sgd", "seed": 0, **extra}


def test_figures_and_tidy_import_without_torch():
    code = "import lawa_tidy, plots.make_figures, plots.hours_saved, sys; assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_lawa_utils_reexports_the_same_objects():
    import lawa_utils as lu

    for name in ("LawaError", "RESULT_COLUMNS", "append_rows", "atomic_write", "done_cells", "read_results",
                 "record_run"):
        assert getattr(lu, name) is getattr(lt, name)


def test_unit_is_the_last_column_and_defaults_to_epoch(tmp_path):
    out = tmp_path / "r.csv"
    lt.append_rows(out, [row(), row(epoch=200, unit="step")])
    lines = out.read_text().splitlines()
    assert lines[0] == ",".join(lt.RESULT_COLUMNS) and lt.RESULT_COLUMNS[-1] == "unit"
    assert lines[1].endswith(",epoch") and lines[2].endswith(",step")
    df = lt.read_results(out)
    assert list(df.columns) == lt.RESULT_COLUMNS
    assert df["unit"].tolist() == ["epoch", "step"] and df["epoch"].tolist() == [3, 200]


def test_a_file_without_the_unit_column_reads_as_epochs_and_keeps_its_layout(tmp_path):
    out = tmp_path / "log.csv"
    out.write_text(OLD_HEADER + "baseline,1,1,val,loss,0.75,12.5,sgd,0\n")
    lt.append_rows(out, [row(method="baseline", k=1, epoch=2, value=0.25)])  # epochs: the old layout is kept
    assert out.read_text() == OLD_HEADER + "baseline,1,1,val,loss,0.75,12.5,sgd,0\nbaseline,1,2,val,loss,0.25,,sgd,0\n"
    df = lt.read_results(out)
    assert df["unit"].tolist() == ["epoch", "epoch"] and df["value"].tolist() == [0.75, 0.25]
    assert df["wall_seconds"].iloc[0] == 12.5 and df["wall_seconds"].isna().iloc[1]


def test_a_step_row_adds_the_unit_column_to_an_older_file(tmp_path):
    out = tmp_path / "r.csv"
    out.write_text(OLD_HEADER + "lawa,2,3,val,loss,0.5,,sgd,0\n")
    lt.append_rows(out, [row(epoch=400, unit="step")])
    assert out.read_text().splitlines() == [",".join(lt.RESULT_COLUMNS), "lawa,2,3,val,loss,0.5,,sgd,0,epoch",
                                            "lawa,2,400,val,loss,0.5,,sgd,0,step"]
    assert not list(tmp_path.glob(".r.csv.tmp*"))


def test_units_outside_the_schema_are_refused_naming_the_file(tmp_path):
    out = tmp_path / "r.csv"
    with pytest.raises(lt.LawaError, match=r"r\.csv: unit 'update' is not one of epoch, step"):
        lt.append_rows(out, [row(unit="update")])
    out.write_text(",".join(lt.RESULT_COLUMNS) + "\nlawa,2,3,val,loss,0.5,,sgd,0,hour\n")
    with pytest.raises(lt.LawaError, match=r"r\.csv: line 2: unit 'hour' is not one of epoch, step"):
        lt.read_results(out)
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(lt.LawaError, match=r"other\.csv: header 'a,b' is not the tidy schema"):
        lt.append_rows(other, [row()])


def test_done_cells_keeps_units_and_seeds_apart(tmp_path):
    out = tmp_path / "r.csv"
    lt.append_rows(out, [row(epoch=3, metric="loss"), row(epoch=3, metric="acc1"),   # complete epoch cell
                         row(epoch=4, metric="loss"),                                 # half a cell
                         row(epoch=300, metric="loss", unit="step"), row(epoch=300, metric="acc1", unit="step"),
                         row(epoch=5, metric="loss", seed=""), row(epoch=5, metric="acc1", seed="")])
    cells = ["lawa"], ["val"], ["loss", "acc1"], "sgd"
    assert lt.done_cells(out, *cells, 0) == {"lawa": {(3, 2)}}
    assert lt.done_cells(out, *cells, 0, unit="step") == {"lawa": {(300, 2)}}
    assert lt.done_cells(out, *cells, 0, unit=None) == {"lawa": {(3, 2), (300, 2)}}
    assert lt.done_cells(out, *cells, None) == {"lawa": {(5, 2)}}
    assert lt.done_cells(tmp_path / "none.csv", *cells, 0) == {"lawa": set()}


def test_record_run_appends_records_with_the_given_info(tmp_path):
    out = tmp_path / "results.csv"
    path = lt.record_run(out, {"ks": "2,4"}, info={"command": "sweep a"})
    lt.record_run(out, {"ks": "6"}, info={"command": "sweep b"})
    assert path == tmp_path / "results.args.json"
    assert json.loads(path.read_text()) == [{"command": "sweep a", "args": {"ks": "2,4"}},
                                            {"command": "sweep b", "args": {"ks": "6"}}]
    path.write_text("{}")
    with pytest.raises(lt.LawaError, match=r"results\.args\.json is not the JSON list of runs"):
        lt.record_run(out, {}, info={})
