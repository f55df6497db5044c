"""``clinfuse labels --aces``: the real es-aces (in .venv-aces, ``make aces``) on the
meds-testing-helpers sample."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from clinfuse.cli import main as cli_main

ACES_CLI = Path(__file__).resolve().parents[3] / ".venv-aces" / "bin" / "aces-cli"
pytestmark = pytest.mark.skipif(not ACES_CLI.is_file(), reason="run `make aces` first")

TASK = """\
predicates:
  admission:
    code: {regex: "^ADMISSION//.*"}
  discharge:
    code: DISCHARGE
trigger: admission
windows:
  input:
    start: null
    end: trigger + 30m
    start_inclusive: True
    end_inclusive: True
    index_timestamp: end
  target:
    start: input.end
    end: start + 1h
    start_inclusive: False
    end_inclusive: True
    label: discharge
"""


def _labels(args: list[str]) -> int:
    return cli_main(["labels", *args, "--aces-cli", str(ACES_CLI)])


def test_aces_labels_are_the_task_computed_by_hand(simple_static_MEDS_dataset_with_task, tmp_path):
    root = simple_static_MEDS_dataset_with_task
    task = tmp_path / "task.yaml"
    task.write_text(TASK)
    out = tmp_path / "labels"
    assert _labels(["--aces", str(task), "--cohort", str(root), "--out", str(out)]) == 0
    got = pl.read_parquet(out / "**/*.parquet").sort("subject_id")
    data = pl.read_parquet(root / "data/**/*.parquet")
    admit = data.filter(pl.col("code").str.starts_with("ADMISSION//")).select(
        "subject_id", (pl.col("time") + timedelta(minutes=30)).alias("prediction_time")
    )
    discharge = data.filter(pl.col("code") == "DISCHARGE").select("subject_id", "time")
    want = (
        admit.join(discharge, on="subject_id")
        .select(
            "subject_id",
            "prediction_time",
            (pl.col("time") <= pl.col("prediction_time") + timedelta(hours=1)).alias(
                "boolean_value"
            ),
        )
        .sort("subject_id")
    )
    assert got.select(want.columns).equals(want)
    assert cli_main(["validate", str(root), "--labels", str(out)]) == 0


def test_a_bad_task_fails_in_one_line_and_writes_nothing(
    simple_static_MEDS_dataset_with_task, tmp_path, capsys
):
    task = tmp_path / "task.yaml"
    task.write_text(TASK.replace("trigger: admission", "trigger: no_such_predicate"))
    out = tmp_path / "labels"
    code = _labels(["--aces", str(task), "--cohort", str(simple_static_MEDS_dataset_with_task),
                    "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ACES failed" in err[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".labels-")]


def test_the_documented_task_config_loads_in_aces(tmp_path):
    """docs/meds.md's in-ICU mortality task parses with ACES's own config loader."""
    import re
    import subprocess

    doc = (Path(__file__).resolve().parents[3] / "docs" / "meds.md").read_text()
    (block,) = re.findall(r"^```yaml\n(.*?)^```", doc, re.DOTALL | re.MULTILINE)
    path = tmp_path / "icu_mortality_24h.yaml"
    path.write_text(block)
    code = (
        "from aces.config import TaskExtractorConfig; import sys; "
        "c = TaskExtractorConfig.load(sys.argv[1]); "
        "print(c.trigger.predicate, c.label_window, c.index_timestamp_window)"
    )
    python = ACES_CLI.parent / "python"
    done = subprocess.run([str(python), "-c", code, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["icu_admission", "target", "input"]
