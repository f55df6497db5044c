"""``clinfuse score --format meds``: predictions the ``meds-evaluation`` package reads,
with the AUROC ``clinfuse evaluate`` reports."""

from __future__ import annotations

from dataclasses import replace

import polars as pl
import pytest

from clinfuse.api import _run_data_config
from clinfuse.cli import main as cli_main
from clinfuse.evaluation.evaluate import evaluate


def test_meds_evaluation_computes_the_auroc_of_clinfuse_evaluate(meds_run, sim_meds, tmp_path):
    from meds_evaluation.evaluate import evaluate_binary_classification
    from meds_evaluation.schema import PredictionSchema

    out = tmp_path / "scores"
    code = cli_main([
        "score", str(meds_run.path), "--cohort", str(sim_meds.path),
        "--labels", str(sim_meds.labels), "--sidecars", str(sim_meds.sidecars),
        "--out", str(out), "--format", "meds", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    predictions = pl.read_parquet(out / "meds_predictions" / "predictions.parquet")
    assert predictions.columns == PredictionSchema.columns()[:3] + [
        "predicted_boolean_value", "predicted_boolean_probability",
    ]  # fmt: skip
    assert predictions.height == pl.read_parquet(sim_meds.labels).height
    theirs = evaluate_binary_classification(predictions)["samples_equally_weighted"]
    # clinfuse evaluate, without what does not change its AUROC but costs time on two
    # shared cores: Grad-CAM overlays, and the ancestry audit (ancestry is read from a
    # code the root does not have, so evaluate has no ancestry to probe). The site stays:
    # the preset's ComBat maps are per site, so the predictions depend on it.
    source = sim_meds.source(_run_data_config(meds_run))
    blind = replace(source, options=replace(source.options, ancestry="NONE//"))
    ours = evaluate(
        meds_run.path, blind, tmp_path / "eval", split="all", n_bootstrap=20,
        gradcam_images=0, baseline=False,
    )  # fmt: skip
    probed = {k for k in ours.get("audit", {}) if k != "genetic_signal"}
    assert "ancestry" not in probed, probed
    assert ours["n"] == predictions.height
    assert theirs["roc_auc_score"] == pytest.approx(ours["auroc"], abs=1e-6)


def test_format_meds_refuses_at(meds_run, sim_meds, tmp_path, capsys):
    code = cli_main([
        "score", str(meds_run.path), "--cohort", str(sim_meds.path), "--labels",
        str(sim_meds.labels), "--out", str(tmp_path / "s"), "--format", "meds",
        "--at", "2150-01-01T00:00:00",
    ])  # fmt: skip
    assert code == 2
    assert "--format meds needs label rows" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
