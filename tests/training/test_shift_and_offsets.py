"""``evaluate --shifted`` (the AUROC drop on a second cohort) and runs with profiled
confound offsets (``model.confound_offsets``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clinfuse.cli import main
from clinfuse.evaluation.evaluate import evaluate


@pytest.fixture(scope="module")
def flipped_cohort(tiny_cohort, tmp_path_factory) -> Path:
    """The tiny cohort with every label flipped: any model ranks it backwards."""
    out = Path(shutil.copytree(tiny_cohort, tmp_path_factory.mktemp("flip") / "cohort"))
    labels = pl.read_parquet(out / "labels.parquet")
    labels.with_columns(~pl.col("boolean_value")).write_parquet(out / "labels.parquet")
    return out


def test_shifted_cohort_equal_to_the_evaluated_one_drops_nothing(
    tiny_run, tiny_cohort, tmp_path
) -> None:
    run_dir, _ = tiny_run
    m = evaluate(
        run_dir, tiny_cohort, tmp_path, "all", 50, gradcam_images=0, baseline=False,
        shifted=tiny_cohort,
    )  # fmt: skip
    shift = m["shift"]
    assert shift["n"] == m["n"]
    assert shift["auroc"] == pytest.approx(m["auroc"], abs=1e-9)
    assert shift["drop"] == pytest.approx(0.0, abs=1e-9)
    assert set(shift["per_site"]) == set(m["per_site"])
    assert "On a shifted cohort" in (tmp_path / "report.html").read_text()


def test_flipped_labels_drop_by_twice_the_margin_over_chance(
    tiny_run, tiny_cohort, flipped_cohort, tmp_path, capsys
) -> None:
    run_dir, _ = tiny_run
    code = main([
        "evaluate", str(run_dir), "--cohort", str(tiny_cohort), "--split", "all",
        "--shifted", str(flipped_cohort), "--out", str(tmp_path), "--bootstrap", "50",
        "--no-baseline",
    ])  # fmt: skip
    assert code == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["shift"]["auroc"] == pytest.approx(1.0 - m["auroc"], abs=1e-9)
    assert m["shift"]["drop"] == pytest.approx(2 * m["auroc"] - 1.0, abs=1e-9)
    low, high = m["shift"]["drop_ci"]
    assert low <= m["shift"]["drop"] <= high
    assert "shifted cohort AUROC" in capsys.readouterr().out


def test_offsets_are_profiled_in_training_and_left_out_of_predictions(
    tiny_cohort, tiny_config, tmp_path
) -> None:
    from clinfuse.training.artifact import load_artifact
    from clinfuse.training.run import train

    run_dir = tmp_path / "run"
    train(tiny_config(tiny_cohort, "model.confound_offsets=[site,ancestry]"), run_dir)
    art = load_artifact(run_dir / "model")
    offsets = art.model.confound_offsets
    assert offsets is not None
    site = offsets.offset_site.numpy()
    assert np.abs(site[:, :-1]).max() > 1e-3  # profiled from the training batches
    assert np.all(site[:, -1] == 0.0)  # unknown sites keep no offset
    from clinfuse.evaluation.evaluate import _select_samples, artifact_batches
    from clinfuse.training.predict import collect_predictions

    samples, _ = _select_samples(tiny_cohort, art, "all")
    batches = artifact_batches(tiny_cohort, samples, art, None)
    with_offsets = collect_predictions(art.model, batches)["logit"]
    art.model.confound_offsets = None
    without = collect_predictions(art.model, batches)["logit"]
    np.testing.assert_array_equal(with_offsets, without)


def test_stratified_monitor_selects_the_checkpoint_and_needs_offsets(
    tiny_cohort, tiny_config, tmp_path
) -> None:
    from clinfuse.errors import InputError
    from clinfuse.training.config import load_run_config
    from clinfuse.training.run import train

    run_dir = tmp_path / "run"
    cfg = tiny_config(
        tiny_cohort, "model.confound_offsets=[site,ancestry]", "optim.monitor=val_auroc_stratified"
    )
    train(cfg, run_dir)
    log = pl.read_csv(run_dir / "logs" / "metrics.csv")
    within = log.filter(pl.col("val_auroc_stratified").is_not_null())
    assert within.height >= 1
    assert within["val_auroc_stratified"].is_between(0.0, 1.0).all()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["monitor"] == "val_auroc_stratified"
    assert summary["best_val_auroc"] == pytest.approx(
        within["val_auroc_stratified"].max(), abs=1e-6
    )
    with pytest.raises(InputError, match="confound_offsets"):
        load_run_config(None, ["optim.monitor=val_auroc_stratified"])
