"""docs/python-api.md runs as written: its ```python blocks, in order, in an empty folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    return _BLOCK.findall(text)


def test_the_page_has_code_to_run():
    blocks = python_blocks(DOC.read_text())
    # simulate, open, train, load, drop a modality, evaluate, score
    assert len(blocks) == 7
    assert all("clinfuse." in block for block in blocks)


def test_python_api_page_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "python_api_doc"}
    for number, block in enumerate(python_blocks(DOC.read_text()), start=1):
        try:
            exec(compile(block, f"{DOC.name} block {number}", "exec"), namespace)
        except Exception as err:
            pytest.fail(f"{DOC.name} block {number} failed: {type(err).__name__}: {err}")
    import clinfuse

    # What the page promises, checked on what it built.
    assert isinstance(namespace["cohort"], clinfuse.Cohort)
    assert namespace["run"].path == Path("runs/x")
    assert (tmp_path / "runs/x/model/artifact.json").is_file()
    no_images = yaml.safe_load((namespace["no_images"].path / "config.yaml").read_text())
    assert set(no_images["model"]["encoders"]) == {"gru_d", "sgl_mlp"}
    report, scores = namespace["report"], namespace["scores"]
    assert report.html.is_file()
    assert 0.0 <= report.metrics["auroc"] <= 1.0
    predictions = report.predictions
    assert predictions.height == 120  # split="all": one label row per subject
    assert predictions["risk"].is_between(0, 1).all()
    # score covers every label row, with the same calibrated risks as evaluate
    joined = predictions.join(scores, on=["subject_id", "prediction_time"], suffix="_score")
    assert joined.height == scores.height == 120
    assert (joined["risk"] - joined["risk_score"]).abs().max() < 1e-5
