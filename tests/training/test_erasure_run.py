from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from clinfuse.datasets.datamodule import config_from_dict, make_loader
from clinfuse.datasets.samples import load_samples
from clinfuse.evaluation.evaluate import evaluate
from clinfuse.fusion.erasure import one_hot_concept
from clinfuse.training.artifact import load_artifact
from clinfuse.training.predict import collect_predictions


@pytest.fixture(scope="module")
def erased_run(tiny_cohort, tiny_config, tmp_path_factory):
    from clinfuse.training.run import train

    run_dir = tmp_path_factory.mktemp("erased") / "run"
    cfg = tiny_config(tiny_cohort, "model.adversary.erase=[site,ancestry]")
    return run_dir, train(cfg, run_dir)


def _train_predictions(art, cohort):
    samples = load_samples(cohort).filter(pl.col("split") == "train")
    loader = make_loader(cohort, samples, art.spec, config_from_dict(art.data_config))
    return collect_predictions(art.model, loader)


def test_artifact_erases_site_and_ancestry_from_the_train_representation(erased_run, tiny_cohort):
    run_dir, summary = erased_run
    art = load_artifact(run_dir / "model")
    assert bool(art.model.eraser.fitted)
    pred = _train_predictions(art, tiny_cohort)
    classes = {"site": len(art.spec.sites), "ancestry": len(art.spec.ancestries)}
    codes = {c: pred[c] for c in classes}
    concept, known = one_hot_concept(codes, classes)
    present = [k for k in classes if len(np.unique(codes[k][known])) > 1]
    # Each confound with c classes present adds c - 1 erased directions.
    assert summary["erasure"]["rank"] == sum(len(np.unique(codes[k][known])) - 1 for k in present)
    z = pred["fused"][known].astype(np.float64)
    c = concept[known]
    cov = (z - z.mean(0)).T @ (c - c.mean(0)) / len(z)  # (D, K): zero after LEACE
    scale = z.std(0).max() * c.std(0).max()
    assert np.abs(cov).max() < 1e-4 * scale  # float32 rounding of the saved buffers
    ckpt = torch.load(run_dir / "checkpoints" / "erased.ckpt", weights_only=True)
    saved = ckpt["state_dict"]["model.eraser.projection"]
    torch.testing.assert_close(saved, art.model.eraser.projection)


def test_evaluate_audits_the_erased_representation(erased_run, tiny_cohort, tmp_path):
    run_dir, summary = erased_run
    m = evaluate(run_dir, tiny_cohort, tmp_path / "eval", "all", n_bootstrap=20, gradcam_images=0)
    for name in ("site", "ancestry"):
        audit = m["audit"][name]
        for key in ("probe_accuracy", "mlp_probe_accuracy", "risk_factor_probe_accuracy"):
            assert 0.0 <= audit[key] <= 1.0, (name, key)
    assert np.isfinite(m["auroc"])
    assert 0.0 <= summary["erasure"]["tuning_auroc_after"] <= 1.0
    assert "risk-factor floor" in (tmp_path / "eval" / "report.html").read_text()


def test_scoring_path_goes_through_the_eraser(erased_run, tiny_cohort):
    # Scoring fuses through ``fuse_variants`` (one token build for the leave-one-out
    # variants); it must give what ``fuse`` (training, evaluate) gives.
    run_dir, _ = erased_run
    art = load_artifact(run_dir / "model")
    samples = load_samples(tiny_cohort).head(16)
    batch = next(
        iter(make_loader(tiny_cohort, samples, art.spec, config_from_dict(art.data_config)))
    )
    with torch.no_grad():
        embeddings, tokens = art.model.encode(batch)
        plain = art.model.fuse(embeddings, tokens)
        variants = art.model.fuse_variants(embeddings, tokens, [(), ["image"]])
    torch.testing.assert_close(variants["logit"][:, 0], plain["logit"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(variants["fused"][:, 0], plain["fused"], atol=1e-5, rtol=1e-5)
    unerased = art.model.fusion(*_kept(art.model, embeddings, tokens))
    assert not torch.allclose(unerased, plain["fused"], atol=1e-4)  # the eraser acted


def _kept(model, embeddings, tokens):
    return embeddings, tokens if model.fusion.uses_tokens else None


def test_reported_tuning_auroc_after_erasure_is_the_exported_models(erased_run, tiny_cohort):
    from clinfuse.evaluation.metrics import auroc

    run_dir, summary = erased_run
    art = load_artifact(run_dir / "model")
    samples = load_samples(tiny_cohort).filter(pl.col("split") == "tuning")
    loader = make_loader(tiny_cohort, samples, art.spec, config_from_dict(art.data_config))
    pred = collect_predictions(art.model, loader)
    expected = auroc(pred["label"], pred["logit"])
    assert summary["erasure"]["tuning_auroc_after"] == pytest.approx(expected, abs=1e-6)
