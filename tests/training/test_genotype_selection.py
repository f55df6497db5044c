"""The vitals/labs environment of the gene x environment path, and its run record."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from clinfuse.cli import main as cli_main
from clinfuse.datasets.datamodule import CohortDataModule, DataConfig
from clinfuse.simulation.simulator import SimConfig, simulate_cohort
from clinfuse.training.genotype_selection import timeseries_environment


@pytest.fixture(scope="module")
def cohort_400(tmp_path_factory):
    out = tmp_path_factory.mktemp("gxe") / "cohort"
    return simulate_cohort(out, SimConfig(n_subjects=400, image_size=32, seed=3, progress=False))


def test_the_environment_is_the_physiology_the_vitals_carry_not_the_lungs(cohort_400) -> None:
    dm = CohortDataModule(cohort_400, DataConfig(image_size=32))
    dm.setup("fit")
    train, tuning, info = timeseries_environment(dm)
    oracle = pl.read_parquet(cohort_400 / "oracle.parquet")
    truth = {
        split: dm.split_samples(split)
        .select("subject_id")
        .join(oracle, on="subject_id", how="left")
        for split in ("train", "tuning")
    }
    assert train.shape == (truth["train"].height,) and tuning.shape == (truth["tuning"].height,)
    # Measured on this cohort: 0.68 and 0.77 with the simulator's physiological
    # severity, 0.03 with the lung disease only the films show.
    for split, score in (("train", train), ("tuning", tuning)):
        physio = np.corrcoef(score.numpy(), truth[split]["physio_severity"].to_numpy())[0, 1]
        assert physio > 0.5, split
    lung = np.corrcoef(train.numpy(), truth["train"]["lung_disease"].to_numpy())[0, 1]
    assert abs(lung) < 0.2
    assert info["source"] == "timeseries" and info["folds"] == 5
    assert 0.55 < info["train_auroc"] < 0.9


def test_a_cohort_without_vitals_channels_is_refused_by_name(cohort_400) -> None:
    dm = CohortDataModule(cohort_400, DataConfig(image_size=32))
    dm.setup("fit")
    dm.spec.channels = []
    with pytest.raises(ValueError, match="path_interaction=timeseries.*no vitals/labs channel"):
        timeseries_environment(dm)


def test_a_run_with_the_gene_x_environment_path_records_it(cohort_400, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = ["train", "--config", "configs/demo.yaml", "--cohort", str(cohort_400),
            "--run-dir", str(run_dir), "model.encoders.timm_image=null",
            "model.encoders.gru_d=null", "model.encoders.sgl_mlp.select=path",
            "model.encoders.sgl_mlp.path_rule=1se", "model.encoders.sgl_mlp.path_pcs=2",
            "model.encoders.sgl_mlp.path_interaction=timeseries", "data.genotype_pcs=2",
            "model.adversary.enabled=false", "optim.max_epochs=1",
            "optim.progress_bar=false"]  # fmt: skip
    assert cli_main(args) == 0
    path = json.loads((run_dir / "genotype_path.json").read_text())
    assert path["interaction"] is True
    assert path["environment"]["source"] == "timeseries"
    # Every strength is a set of genes and interaction twins; the chosen genes are
    # the ones the encoder reads.
    assert len(path["group_norms"][0]) == 2 * 20
    assert set(path["interaction_groups"]) <= set(path["groups"])
