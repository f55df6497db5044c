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


def test_data_parallel_training_refuses_harmonization_with_a_clear_error(tiny_cohort, tiny_config):
    import pytest

    from clinfuse.errors import InputError
    from clinfuse.training.distributed import _refuse_harmonization

    _refuse_harmonization(tiny_config(tiny_cohort))  # not asked for: nothing to refuse
    cfg = tiny_config(tiny_cohort, "model.encoders.timm_image.harmonize=combat")
    with pytest.raises(InputError, match="harmonize: not available with --ray-address"):
        _refuse_harmonization(cfg)
