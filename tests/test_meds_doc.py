"""docs/meds.md runs as written: its ```python and ```bash blocks, in order, in an empty
folder, on the static sample dataset of meds-testing-helpers."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from clinfuse.cli import main as cli_main

DOC = Path(__file__).resolve().parents[1] / "docs" / "meds.md"
_BLOCK = re.compile(r"^```(python|bash)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def blocks(text: str) -> list[tuple[str, str]]:
    return _BLOCK.findall(text)


def commands(block: str) -> list[list[str]]:
    """The command lines of a bash block, ``\\`` continuations joined."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip()]


def _run(words: list[str]) -> None:
    if words[0] == "clinfuse":
        code = cli_main(words[1:])
    else:  # another package's command, installed beside clinfuse
        program = Path(sys.executable).parent / words[0]
        code = subprocess.run([str(program), *words[1:]], check=False, timeout=300).returncode
    assert code == 0, f"{' '.join(words)} exited {code}"


def test_the_page_has_the_walk_through():
    kinds = [kind for kind, _ in blocks(DOC.read_text())]
    # write the sample; validate, train, evaluate, score, meds-evaluation; Python
    assert kinds == ["python", "bash", "bash", "bash", "bash", "bash", "python"]


def test_meds_page_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "meds_doc"}
    for number, (kind, block) in enumerate(blocks(DOC.read_text()), start=1):
        try:
            if kind == "python":
                exec(compile(block, f"{DOC.name} block {number}", "exec"), namespace)
            else:
                for words in commands(block):
                    _run(words)
        except Exception as err:
            pytest.fail(f"{DOC.name} block {number} failed: {type(err).__name__}: {err}")
    # What the page promises, checked on what it built.
    labels = pl.concat(
        [pl.read_parquet(p) for p in Path("sample/task_labels/boolean_value_task").glob("*")]
    )
    predictions = pl.read_parquet("scores/meds_predictions/predictions.parquet")
    assert predictions.columns == [
        "subject_id", "prediction_time", "boolean_value", "predicted_boolean_value",
        "predicted_boolean_probability",
    ]  # fmt: skip
    assert predictions.height == labels.height == 21
    theirs = json.loads(Path("scores/meds_evaluation.json").read_text())
    auroc = theirs["samples_equally_weighted"]["roc_auc_score"]
    y, p = predictions["boolean_value"], predictions["predicted_boolean_probability"]
    assert auroc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    metrics = json.loads(Path("runs/meds/evaluation/metrics.json").read_text())
    assert metrics["n"] == 21 and 0.0 <= metrics["auroc"] <= 1.0
    spec = Path("runs/meds/data_spec.yaml").read_text()
    assert "- HR" in spec and "- TEMP" in spec
