"""``simulate --format meds`` and the MEDS path give the cohort layout's model and scores."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from sklearn.metrics import roc_auc_score

import clinfuse
from clinfuse.datasets.meds import MedsSource


def test_simulate_meds_writes_a_meds_root_labels_and_sidecars(sim_meds):
    root, labels, sidecars = sim_meds.path, sim_meds.labels, sim_meds.sidecars
    assert {p.name for p in (root / "metadata").iterdir()} == {
        "codes.parquet", "dataset.json", "subject_splits.parquet",
    }  # fmt: skip
    assert sorted(p.parent.name for p in (root / "data").rglob("*.parquet")) == [
        "held_out", "train", "tuning",
    ]  # fmt: skip
    assert (labels / "labels.parquet").is_file()
    assert {"images.parquet", "genotypes.parquet", "markers.parquet"} <= {
        p.name for p in sidecars.iterdir()
    }
    # The cohort tables now live in the MEDS root: none is left in the sidecars.
    assert not any((sidecars / f"{n}.parquet").exists() for n in ("events", "labels", "subjects"))
    clinfuse.Cohort.open(sim_meds.path, labels=labels, sidecars=sidecars)  # raises if invalid


def test_site_and_ancestry_come_from_static_events(sim_meds, sim_cohort):
    source = sim_meds.source()
    assert isinstance(source, MedsSource)
    from_meds = source.scan_subjects().collect().sort("subject_id")
    truth = pl.read_parquet(sim_cohort / "subjects.parquet").sort("subject_id")
    for column in ("site", "ancestry", "sex", "age"):
        assert from_meds[column].to_list() == truth[column].to_list(), column


def test_training_through_meds_matches_the_cohort_layout(
    meds_run, cohort_run, sim_meds, sim_cohort
):
    """Same seed, same subjects: the same risks, so the same held-out AUROC (1e-6)."""
    scores = {}
    for name, run, cohort in (("meds", meds_run, sim_meds), ("cohort", cohort_run, sim_cohort)):
        risks = clinfuse.score(run, cohort, progress=False).sort("subject_id", "prediction_time")
        scores[name] = risks
    torch.testing.assert_close(
        scores["meds"]["risk"].to_torch(), scores["cohort"]["risk"].to_torch(), rtol=0, atol=1e-6
    )
    splits = pl.read_parquet(sim_cohort / "subject_splits.parquet")
    labels = pl.read_parquet(sim_cohort / "labels.parquet")
    aurocs = []
    for risks in scores.values():
        held = risks.join(splits, on="subject_id").filter(pl.col("split") == "held_out")
        held = held.join(labels, on=["subject_id", "prediction_time"])
        aurocs.append(roc_auc_score(held["boolean_value"].to_numpy(), held["risk"].to_numpy()))
    assert 0.0 < aurocs[0] < 1.0
    assert abs(aurocs[0] - aurocs[1]) <= 1e-6
    np.testing.assert_allclose(
        meds_run.summary["best_val_auroc"], cohort_run.summary["best_val_auroc"], atol=1e-6
    )
