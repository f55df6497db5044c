"""A run with ComBat harmonization of the image features (timm_image.harmonize)."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from clinfuse.datasets.datamodule import config_from_dict, make_loader
from clinfuse.datasets.samples import load_samples
from clinfuse.encoders.harmonize import combat_affine
from clinfuse.training.artifact import load_artifact


def test_run_fits_combat_on_the_training_films_and_the_artifact_keeps_it(
    tiny_cohort, tiny_config, tmp_path
):
    from clinfuse.training.run import train

    run_dir = tmp_path / "run"
    cfg = tiny_config(tiny_cohort, "model.encoders.timm_image.harmonize=combat")
    summary = train(cfg, run_dir)
    art = load_artifact(run_dir / "model")
    enc = art.model.encoders["image"]
    assert bool(enc.harm_fitted)
    # The saved map is ComBat on the training split's frozen features, outcome as covariate.
    samples = load_samples(tiny_cohort).filter(pl.col("split") == "train")
    loader = make_loader(tiny_cohort, samples, art.spec, config_from_dict(art.data_config))
    feats, sites, labels = [], [], []
    with torch.no_grad():
        for batch in loader:
            present, pooled, _ = enc._batch_features(batch, want_tokens=False)
            feats.append(pooled[present].numpy())
            sites.append(batch["confounds"]["site"][present].numpy())
            labels.append(batch["label"][present].numpy())
    site = np.concatenate(sites)
    scale, shift, _ = combat_affine(
        np.concatenate(feats), site, np.concatenate(labels), len(art.spec.sites)
    )
    torch.testing.assert_close(enc.harm_scale, torch.as_tensor(scale, dtype=torch.float32))
    torch.testing.assert_close(enc.harm_shift, torch.as_tensor(shift, dtype=torch.float32))
    assert summary["harmonization"]["sites"] == sorted(np.unique(site).tolist())
    assert summary["harmonization"]["n"] == len(site)


def test_data_parallel_workers_load_the_map_the_driver_fitted_on_the_whole_split(
    tiny_cohort, tiny_config, tmp_path
):
    # The Ray path: the driver fits ComBat once over every training film and each
    # worker, which reads only its share, loads those maps before its first epoch.
    from clinfuse.datasets.datamodule import CohortDataModule
    from clinfuse.training.distributed import (
        HARMONIZATION_FILE,
        _fit_harmonization_on_driver,
        load_harmonization,
    )
    from clinfuse.training.module import RiskModule
    from clinfuse.training.run import fit_image_harmonization, prepare_run

    run = tmp_path / "run"
    cfg = tiny_config(tiny_cohort, "model.encoders.timm_image.harmonize=combat")
    prepare_run(cfg, run)
    dm = CohortDataModule(cfg.cohort, cfg.data, run_dir=run)
    dm.setup("fit")
    driver = RiskModule.create(cfg.model, dm.spec, cfg.optim, cfg.seed)
    info = _fit_harmonization_on_driver(run, driver, lambda: dm, resume=False)
    assert (run / HARMONIZATION_FILE).is_file() and info["harmonization"]["n"] > 0

    worker = RiskModule.create(cfg.model, dm.spec, cfg.optim, cfg.seed)
    assert not bool(worker.model.encoders["image"].harm_fitted)
    load_harmonization(worker, run)
    local = RiskModule.create(cfg.model, dm.spec, cfg.optim, cfg.seed)
    assert fit_image_harmonization(local, dm)["harmonization"] == info["harmonization"]
    for key in ("harm_scale", "harm_shift"):
        torch.testing.assert_close(
            getattr(worker.model.encoders["image"], key),
            getattr(local.model.encoders["image"], key),
        )
    assert bool(worker.model.encoders["image"].harm_fitted)
    # Resumed: the file is kept, not refitted.
    stamp = (run / HARMONIZATION_FILE).stat().st_mtime_ns
    fresh = RiskModule.create(cfg.model, dm.spec, cfg.optim, cfg.seed)
    assert _fit_harmonization_on_driver(run, fresh, lambda: dm, resume=True) == info
    assert (run / HARMONIZATION_FILE).stat().st_mtime_ns == stamp
    # Without harmonize (the preset has it on), nothing is fitted, written or loaded.
    plain = tiny_config(tiny_cohort, "model.encoders.timm_image.harmonize=none")
    unharmonized = RiskModule.create(plain.model, dm.spec, plain.optim, plain.seed)
    assert _fit_harmonization_on_driver(tmp_path / "plain", unharmonized, lambda: dm, False) == {}


def test_a_worker_refuses_a_damaged_map_by_its_path(tiny_cohort, tiny_config, tmp_path):
    import pytest
    from safetensors.torch import save_file

    from clinfuse.datasets.datamodule import CohortDataModule
    from clinfuse.errors import InputError
    from clinfuse.training.distributed import HARMONIZATION_FILE, load_harmonization
    from clinfuse.training.module import RiskModule

    cfg = tiny_config(tiny_cohort, "model.encoders.timm_image.harmonize=combat")
    dm = CohortDataModule(cfg.cohort, cfg.data)
    dm.setup("fit")
    module = RiskModule.create(cfg.model, dm.spec, cfg.optim, cfg.seed)
    path = tmp_path / HARMONIZATION_FILE
    with pytest.raises(InputError, match="harmonization.safetensors: the driver's ComBat maps"):
        load_harmonization(module, tmp_path)  # missing
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="cannot be read"):
        load_harmonization(module, tmp_path)
    enc = module.model.encoders["image"]
    bad_shift = torch.zeros_like(enc.harm_shift)
    bad_shift[0, 0] = float("nan")
    save_file({"harm_scale": enc.harm_scale.clone(), "harm_shift": bad_shift}, str(path))
    with pytest.raises(InputError, match="harm_shift must be finite"):
        load_harmonization(module, tmp_path)
    save_file({"harm_scale": enc.harm_scale[:, :3].clone(), "harm_shift": bad_shift}, str(path))
    with pytest.raises(InputError, match="harm_scale must be finite with shape"):
        load_harmonization(module, tmp_path)
    assert not bool(enc.harm_fitted)


def test_a_single_scanner_cohort_trains_the_default_with_its_films_as_they_are(
    tiny_cohort, tiny_config, tmp_path
):
    # One hospital, one scanner: the default preset's ComBat has nothing to harmonize.
    # The run trains, says so naming the site, and the saved map is the identity.
    import shutil

    import pytest

    from clinfuse.training.run import train

    cohort = shutil.copytree(tiny_cohort, tmp_path / "cohort")
    subjects = pl.read_parquet(cohort / "subjects.parquet")
    subjects.with_columns(site=pl.lit("only")).write_parquet(cohort / "subjects.parquet")
    images = pl.read_parquet(cohort / "images.parquet")
    images.with_columns(site=pl.lit("only")).write_parquet(cohort / "images.parquet")
    cfg = tiny_config(cohort, "model.encoders.timm_image.harmonize=combat")
    with pytest.warns(UserWarning, match=r"nothing to harmonize.*\['only'\]"):
        summary = train(cfg, tmp_path / "run")
    assert summary["harmonization"]["sites"] == []
    assert summary["harmonization"]["unharmonized_site_names"] == ["only"]
    enc = load_artifact(tmp_path / "run" / "model").model.encoders["image"]
    torch.testing.assert_close(enc.harm_scale, torch.ones_like(enc.harm_scale))
    torch.testing.assert_close(enc.harm_shift, torch.zeros_like(enc.harm_shift))


def test_principal_axes_are_fitted_with_the_maps_kept_in_the_artifact_and_sent_to_workers(
    tiny_cohort, tiny_config, tmp_path
):
    from clinfuse.datasets.datamodule import CohortDataModule
    from clinfuse.training.distributed import _fit_harmonization_on_driver, load_harmonization
    from clinfuse.training.module import RiskModule
    from clinfuse.training.run import prepare_run, train

    overrides = ("model.encoders.timm_image.harmonize=combat",
                 "model.encoders.timm_image.principal_axes=4")  # fmt: skip
    cfg = tiny_config(tiny_cohort, *overrides)
    summary = train(cfg, tmp_path / "run")
    assert summary["harmonization"]["principal_axes"] == 4
    assert 0.0 < summary["harmonization"]["variance_kept"] <= 1.0
    enc = load_artifact(tmp_path / "run" / "model").model.encoders["image"]
    assert enc.proj.in_features == 4 and bool(enc.harm_fitted)
    torch.testing.assert_close(enc.harm_axes @ enc.harm_axes.T, torch.eye(4), atol=1e-5, rtol=0)

    # The Ray path: the worker gets the driver's axes with its maps.
    run = tmp_path / "ray"
    cfg = tiny_config(tiny_cohort, *overrides)
    prepare_run(cfg, run)
    dm = CohortDataModule(cfg.cohort, cfg.data, run_dir=run)
    dm.setup("fit")
    driver = RiskModule.create(cfg.model, dm.spec, cfg.optim, cfg.seed)
    _fit_harmonization_on_driver(run, driver, lambda: dm, resume=False)
    worker = RiskModule.create(cfg.model, dm.spec, cfg.optim, cfg.seed)
    load_harmonization(worker, run)
    for key in ("harm_scale", "harm_shift", "harm_axes"):
        torch.testing.assert_close(
            getattr(worker.model.encoders["image"], key),
            getattr(driver.model.encoders["image"], key),
        )
