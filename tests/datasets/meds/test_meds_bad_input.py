"""Bad MEDS input: every problem named with file, column and row; one-line CLI errors;
nothing half-written."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clinfuse.cli import main as cli_main
from clinfuse.datasets.meds import open_cohort
from clinfuse.datasets.validate import validate_cohort

TASK = "task_labels/boolean_value_task"


@pytest.fixture
def sample(simple_static_MEDS_dataset_with_task, tmp_path) -> Path:
    """A private copy of the static sample, free to break."""
    return Path(shutil.copytree(simple_static_MEDS_dataset_with_task, tmp_path / "sample"))


def _problems(report, check):
    return [p for p in report if p.check == check]


def test_schema_violations_name_file_column_and_row(sample):
    shard = sample / "data/train/1.parquet"
    table = pq.read_table(shard)
    codes = table["code"].to_pylist()
    codes[3] = None
    table = table.set_column(table.schema.get_field_index("code"), "code", pa.array(codes))
    pq.write_table(table.set_column(0, "subject_id", table["subject_id"].cast(pa.string())), shard)
    labels = sample / TASK / "extra.parquet"
    pl.DataFrame({
        "subject_id": [239684], "prediction_time": [datetime(2010, 5, 11, 18)],
        "boolean_value": [True], "note": ["x"],
    }).write_parquet(labels)  # fmt: skip
    report = validate_cohort(open_cohort(sample, sample / TASK))
    assert not report.ok
    schema_errors = {(p.file, p.column) for p in _problems(report, "meds_schema")}
    assert ("data/train/1.parquet", "subject_id") in schema_errors  # a string is no int64
    assert (f"{TASK}/extra.parquet", "note") in schema_errors  # LabelSchema: no extra columns
    (null_code,) = [p for p in _problems(report, "null_value") if p.column == "code"]
    assert (null_code.file, null_code.row) == ("data/train/1.parquet", 3)


def test_label_subjects_missing_from_the_root_are_counted(sample):
    pl.DataFrame({
        "subject_id": [7, 7, 8], "prediction_time": [datetime(2010, 1, 1, h) for h in (1, 2, 3)],
        "boolean_value": [True, False, True],
    }).write_parquet(sample / TASK / "strangers.parquet")  # fmt: skip
    report = validate_cohort(open_cohort(sample, sample / TASK))
    counted = [p for p in _problems(report, "unknown_subject") if "of" in p.message]
    assert len(counted) == 1
    assert "2 of 8 label subjects (3 label rows) are not in the MEDS root" in counted[0].message


def test_train_refuses_a_broken_root_in_one_line_and_writes_no_model(sample, tmp_path, capsys):
    (sample / "metadata/subject_splits.parquet").unlink()
    pl.DataFrame({"subject_id": [239684], "split": ["validation"]}).write_parquet(
        sample / "metadata/subject_splits.parquet"
    )
    run = tmp_path / "run"
    code = cli_main([
        "train", "--config", "demo", "--cohort", str(sample), "--labels", str(sample / TASK),
        "--run-dir", str(run), "model.encoders.timm_image=null", "optim.max_epochs=1",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("clinfuse train: error: ")
    assert "metadata/subject_splits.parquet" in err[0] and "'validation'" in err[0]
    assert not (run / "model").exists() and not (run / "config.yaml").exists()


def test_a_meds_root_needs_its_labels_and_a_directory_takes_none(sample, tmp_path, capsys):
    code = cli_main(["train", "--config", "demo", "--cohort", str(sample), "--run-dir",
                     str(tmp_path / "r")])  # fmt: skip
    assert code == 2
    assert "pass --labels DIR" in capsys.readouterr().err
    folder = tmp_path / "cohort"
    folder.mkdir()
    code = cli_main(["validate", str(folder), "--labels", str(sample / TASK)])
    assert code == 2
    assert "--labels and --sidecars are for MEDS roots" in capsys.readouterr().err


def test_channels_that_select_nothing_are_an_error(sample, capsys):
    from clinfuse.datasets.meds import MedsOptions

    source = open_cohort(sample, sample / TASK, options=MedsOptions(channels=["LAB//"]))
    (problem,) = _problems(validate_cohort(source), "no_channel")
    assert problem.severity == "error" and "['LAB//']" in problem.message
