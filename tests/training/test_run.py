from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from clinfuse.cli import main as cli_main
from clinfuse.datasets.datamodule import config_from_dict, make_loader
from clinfuse.datasets.samples import load_samples
from clinfuse.evaluation.metrics import auroc
from clinfuse.simulation.simulator import SimConfig, simulate_cohort
from clinfuse.training.artifact import load_artifact
from clinfuse.training.predict import collect_predictions
from clinfuse.training.provenance import file_sha256


def test_run_directory_records_config_provenance_logs_and_checkpoints(tiny_run, tiny_cohort):
    run_dir, summary = tiny_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["fusion"]["name"] == "attention"
    assert config["data"]["image_size"] == 32
    prov = json.loads((run_dir / "provenance.json").read_text())
    hashes = prov["cohort_files_sha256"]
    assert hashes["events.parquet"] == file_sha256(tiny_cohort / "events.parquet")
    assert "oracle.parquet" in hashes and prov["packages"]["torch"].startswith("2.")
    metrics = pl.read_csv(run_dir / "logs" / "metrics.csv")
    assert metrics["val_auroc"].drop_nulls().len() == summary["epochs"]
    assert list((run_dir / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert "state_dict" in ckpt


def test_artifact_reloads_and_reproduces_predictions(tiny_run, tiny_cohort):
    run_dir, summary = tiny_run
    art = load_artifact(run_dir / "model")
    assert art.model_id == file_sha256(run_dir / "model" / "model.safetensors")
    assert art.temperature > 0 and 0 < art.train_prevalence < 1
    samples = load_samples(tiny_cohort).filter(pl.col("split") == "held_out")
    cfg = config_from_dict(art.data_config)
    first = collect_predictions(art.model, make_loader(tiny_cohort, samples, art.spec, cfg))
    again = load_artifact(run_dir / "model")
    second = collect_predictions(again.model, make_loader(tiny_cohort, samples, again.spec, cfg))
    np.testing.assert_array_equal(first["logit"], second["logit"])
    assert len(first["logit"]) == samples.height
    assert np.isfinite(first["logit"]).all()


def test_evaluate_writes_metrics_and_report(tiny_run, tiny_cohort, tmp_path, capsys):
    run_dir, _ = tiny_run
    out = tmp_path / "eval"
    code = cli_main(["evaluate", str(run_dir), "--cohort", str(tiny_cohort), "--out", str(out),
                     "--bootstrap", "50", "--split", "all"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out  # the summary line names both baselines
    assert "gradient-boosting baseline" in printed and "confound-matched baseline" in printed
    m = json.loads((out / "metrics.json").read_text())
    for key in ("auroc", "auprc", "accuracy", "precision", "recall", "specificity", "f1",
                "g_mean", "brier", "ece", "oracle_auroc", "per_site"):  # fmt: skip
        assert key in m, key
    lo, hi = m["auroc_ci"]
    assert lo <= m["auroc"] <= hi
    art = load_artifact(run_dir / "model")
    for confound in ("site", "ancestry"):
        audit = m["audit"][confound]
        assert 0.0 <= audit["probe_accuracy"] <= 1.0
        assert 0.0 < audit["majority_rate"] <= 1.0
        by = audit["by_modality"]  # the probes on each modality's own embedding
        assert set(by) == set(art.model.modalities)
        for p in by.values():
            assert 0 < p["n"] <= audit["n"] and 0.0 <= p["mlp_probe_accuracy"] <= 1.0
    assert m["oracle_auroc"] > 0.7  # the simulator's true risk is informative
    # Selected groups are those whose first-layer weights the proximal step left non-zero.
    genomics = m["genomics"]
    sgl = load_artifact(run_dir / "model").model.encoders["genomics"]
    nonzero = [g for g, n in zip(sgl.group_names, sgl.group_norms().tolist(), strict=True) if n > 0]
    assert genomics["selected_groups"] == nonzero
    truth = pl.read_parquet(tiny_cohort / "oracle_groups.parquet").filter(pl.col("causal"))
    assert genomics["causal_groups"] == truth["group"].to_list()
    html = (out / "report.html").read_text()
    for png in ("roc.png", "pr.png", "calibration.png", "gradcam_0.png"):
        assert (out / png).is_file() and png in html
    assert "Where the confound enters" in html
    # The gradient-boosting baseline, fit on the run's training split, on the same samples.
    base = m["baseline"]
    assert base["model"] == "gbdt_features"
    assert base["modalities"] == art.model.modalities
    image_width = art.model.encoders["image"].num_features  # the frozen backbone's features
    assert base["n_features"] == 6 * art.spec.n_channels + art.spec.n_markers + image_width
    assert base["delta"] == pytest.approx(m["auroc"] - base["auroc"], abs=1e-12)
    lo, hi = base["delta_ci"]
    assert lo <= base["delta"] <= hi
    assert "Against a gradient-boosting baseline" in html
    # The same baseline given the default's confound treatment: two more columns (site,
    # ancestry), the same samples.
    matched = m["baseline_matched"]
    assert matched["model"] == "gbdt_confound_matched"
    assert matched["n_features"] == base["n_features"] + 2
    assert matched["delta"] == pytest.approx(m["auroc"] - matched["auroc"], abs=1e-12)
    assert "confound treatment" in html
    # Per-sample predictions beside metrics.json, in the evaluated samples' order.
    preds = pl.read_parquet(out / "predictions.parquet")
    assert preds.columns == [
        "subject_id", "prediction_time", "split", "label", "risk", "logit", "baseline_logit",
        "baseline_matched_logit",
    ]  # fmt: skip
    assert preds.height == m["n"]
    from clinfuse.evaluation.metrics import auroc

    assert auroc(preds["label"].to_numpy(), preds["risk"].to_numpy()) == pytest.approx(m["auroc"])
    bl = auroc(preds["label"].to_numpy(), preds["baseline_logit"].to_numpy())
    assert bl == pytest.approx(base["auroc"])
    bl = auroc(preds["label"].to_numpy(), preds["baseline_matched_logit"].to_numpy())
    assert bl == pytest.approx(matched["auroc"])


def test_cli_train_applies_overrides_and_resolves_config(tiny_cohort, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", "--config", "configs/demo.yaml", "--cohort", str(tiny_cohort),
            "--run-dir", str(run_dir), "model.fusion.name=gated", "model.fusion.cfg={}",
            "optim.max_epochs=1", "optim.progress_bar=false", "data.image_size=32",
            "model.encoders={gru_d: {hidden: 8, embed_dim: 8}, sgl_mlp: {embed_dim: 8}}"]  # fmt: skip
    assert cli_main(args) == 0
    best = json.loads((run_dir / "summary.json").read_text())["best_val_auroc"]
    assert f"best validation AUROC {best:.3f}; artifact in {run_dir / 'model'}" in (
        capsys.readouterr().out
    )
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["fusion"]["name"] == "gated"
    assert set(config["model"]["encoders"]) == {"gru_d", "sgl_mlp"}
    art = load_artifact(run_dir / "model")
    assert set(art.model.encoders) == {"timeseries", "genomics"}


def test_unknown_config_key_is_named(tiny_cohort, tmp_path, capsys):
    code = cli_main(["train", "--cohort", str(tiny_cohort), "--run-dir", str(tmp_path / "r"),
                     "optim.learning_rate=1"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "clinfuse train: error: unknown config key(s) ['learning_rate'] in optim" in err
    assert "Traceback" not in err


def test_same_seed_same_metrics(tiny_cohort, tiny_config, tmp_path):
    from clinfuse.training.run import train

    cfg = tiny_config(tiny_cohort, "optim.max_epochs=1")
    a = train(cfg, tmp_path / "a")
    b = train(cfg, tmp_path / "b")
    assert a["best_val_auroc"] == b["best_val_auroc"]
    assert a["model_id"] == b["model_id"]  # bit-identical weights


def test_training_refuses_a_broken_cohort_naming_file_and_column(
    tiny_cohort, tiny_config, tmp_path
):
    import shutil

    from clinfuse.training.run import train

    broken = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, broken)
    labels = pl.read_parquet(broken / "labels.parquet")
    labels.with_columns(pl.col("prediction_time").cast(pl.String)).write_parquet(
        broken / "labels.parquet"
    )
    with pytest.raises(ValueError, match=r"labels\.parquet.*prediction_time"):
        train(tiny_config(broken), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_infinite_values_do_not_reach_normalization(tiny_cohort, tiny_config, tmp_path):
    import shutil

    from clinfuse.datasets.datamodule import CohortDataModule

    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    events = pl.read_parquet(cohort / "events.parquet")
    events = events.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(float("inf")).otherwise(pl.col("numeric_value"))
        .cast(pl.Float32).alias("numeric_value")
    )  # fmt: skip
    events.write_parquet(cohort / "events.parquet")
    cfg = tiny_config(cohort)
    dm = CohortDataModule(cohort, cfg.data)
    dm.setup("fit")
    assert np.isfinite(dm.spec.channel_mean).all() and np.isfinite(dm.spec.channel_std).all()


def test_a_zeroed_genotype_layer_is_reported_not_silent(tiny_run):
    from clinfuse.training.run import unused_modality_warnings

    run_dir, summary = tiny_run
    assert summary["warnings"] == []  # the tiny run keeps its genotype groups
    model = load_artifact(run_dir / "model").model
    with torch.no_grad():
        model.encoders["genomics"].first.weight.zero_()
    (message,) = unused_modality_warnings(model)
    assert message.startswith("genomics: the sparse-group-lasso penalty zeroed every group")
    # Groups chosen on the lambda path (select: path): the message points at the path.
    model.encoders["genomics"].cfg.select = "path"
    model.encoders["genomics"].cfg.path_rule = "1se"
    (message,) = unused_modality_warnings(model)
    assert message.startswith("genomics: the genotype lambda path kept no marker group")
    assert "tuning loss" in message
    # The stability rule (the preset's) gives its own reason.
    model.encoders["genomics"].cfg.path_rule = "stability"
    (message,) = unused_modality_warnings(model)
    assert "half-samples" in message and "select=fixed" in message


def test_a_null_encoder_override_trains_without_that_modality(tiny_cohort, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "--config", "configs/demo.yaml", "--cohort", str(tiny_cohort),
            "--run-dir", str(run_dir), "model.encoders.timm_image=null",
            "model.encoders.sgl_mlp=null", "optim.max_epochs=1", "optim.progress_bar=false",
            "data.image_size=32", "model.encoders.gru_d={hidden: 8, embed_dim: 8}"]  # fmt: skip
    assert cli_main(args) == 0
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert set(config["model"]["encoders"]) == {"gru_d"}
    assert load_artifact(run_dir / "model").model.modalities == ["timeseries"]


# The main-effect path (path_interaction=none): at 2,000 subjects the lowest tuning loss
# keeps two genes, and so does the stability rule; the tiny cohort's path keeps none (its
# first strength is far best on the tuning split). With the preset's gene x environment
# twins, the vitals/labs risk score is a covariate of every fit, and on this cohort's 300
# tuning subjects the lowest tuning loss is then the empty model's.
@pytest.mark.parametrize(
    ("n_subjects", "rule"),
    [(2000, "min"), pytest.param(2000, "stability", marks=pytest.mark.slow), (120, "1se")],
)
def test_genes_chosen_on_the_path_are_the_ones_the_saved_model_reads(n_subjects, rule, tmp_path):
    cohort = tmp_path / "cohort"
    simulate_cohort(cohort, SimConfig(n_subjects=n_subjects, image_size=32, seed=3, progress=False))
    run_dir = tmp_path / "run"
    args = ["train", "--config", "configs/demo.yaml", "--cohort", str(cohort),
            "--run-dir", str(run_dir), "model.encoders.timm_image=null",
            "model.encoders.gru_d=null", "model.encoders.sgl_mlp.select=path",
            "model.encoders.sgl_mlp.lambda_=0.0", "model.encoders.sgl_mlp.path_pcs=2",
            f"model.encoders.sgl_mlp.path_rule={rule}",
            "model.encoders.sgl_mlp.path_interaction=none",
            "model.encoders.sgl_mlp.path_max_false=2.0",
            "data.genotype_pcs=2", "model.adversary.enabled=false", "model.aux_weight=0.0",
            "optim.max_epochs=1", "optim.progress_bar=false"]  # fmt: skip
    assert cli_main(args) == 0
    path = json.loads((run_dir / "genotype_path.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    chosen = config["model"]["encoders"]["sgl_mlp"]["keep_groups"]
    assert chosen == list(path["groups"])
    assert len(path["lambdas"]) == len(path["tuning_loss"]) > 1
    assert (len(chosen) > 0) == (n_subjects == 2000)
    assert (path["stability"] is not None) == (rule == "stability")
    encoder = load_artifact(run_dir / "model").model.encoders["genomics"]
    assert sorted(encoder.selected_groups()) == sorted(chosen)


def test_logged_validation_metrics_are_those_of_the_whole_tuning_split(tiny_run, tiny_cohort):
    # val_auroc picks the best checkpoint and stops early; val_loss is reported beside
    # it: both are computed once over the tuning split's rows (under data-parallel
    # training, over every worker's rows gathered, each once), not averaged per batch.
    from clinfuse.training.checkpoints import load_checkpoint
    from clinfuse.training.module import RiskModule

    run_dir, _ = tiny_run
    ckpt = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    module = RiskModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    art = load_artifact(run_dir / "model")
    samples = load_samples(tiny_cohort).filter(pl.col("split") == "tuning")
    cfg = config_from_dict(art.data_config)
    pred = collect_predictions(module.model, make_loader(tiny_cohort, samples, art.spec, cfg))
    logit, label = torch.as_tensor(pred["logit"]), torch.as_tensor(pred["label"]).float()
    metrics = pl.read_csv(run_dir / "logs" / "metrics.csv").drop_nulls("val_auroc")
    (logged,) = metrics.filter(pl.col("epoch") == ckpt["epoch"]).iter_rows(named=True)
    expected_loss = float(module._risk_loss(logit, label))
    assert logged["val_loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert logged["val_auroc"] == pytest.approx(auroc(pred["label"], pred["logit"]), abs=1e-6)


def test_last_checkpoint_is_the_last_epoch_not_a_copy_of_the_best(tiny_run):
    # --resume continues from last.ckpt: it must hold the last epoch trained, also when
    # that epoch did not improve the monitored metric.
    from clinfuse.training.checkpoints import load_checkpoint

    run_dir, summary = tiny_run
    metrics = pl.read_csv(run_dir / "logs" / "metrics.csv").drop_nulls("val_auroc")
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    best = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    assert last["epoch"] == summary["epochs"] - 1 == metrics["epoch"].max()
    best_epoch = metrics.filter(pl.col("val_auroc") == pl.col("val_auroc").max())["epoch"][0]
    assert best["epoch"] == best_epoch
    if best_epoch != last["epoch"]:  # then other weights too
        weights = last["state_dict"]
        assert any(not torch.equal(weights[k], best["state_dict"][k]) for k in weights)


def test_summary_times_the_epochs_apart_from_the_run_around_them(tiny_run):
    run_dir, summary = tiny_run
    assert summary["fit_seconds"] > 0
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["fit_seconds"] == summary["fit_seconds"]


def test_ema_weights_are_validated_checkpointed_and_exported(tiny_cohort, tiny_config, tmp_path):
    from clinfuse.errors import InputError
    from clinfuse.training.checkpoints import load_checkpoint
    from clinfuse.training.config import load_run_config
    from clinfuse.training.module import RiskModule
    from clinfuse.training.run import train

    run_dir = tmp_path / "run"
    train(tiny_config(tiny_cohort, "optim.ema_decay=0.5"), run_dir)
    best = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    average, current = best["state_dict"], best["current_model_state"]
    assert any(not torch.equal(average[k], current[k]) for k in average)  # averaged, not a copy
    # The logged validation AUROC of the chosen epoch is the average's.
    module = RiskModule(**best["hyper_parameters"])
    module.load_state_dict(average)
    samples = load_samples(tiny_cohort).filter(pl.col("split") == "tuning")
    art = load_artifact(run_dir / "model")
    loader = make_loader(tiny_cohort, samples, art.spec, config_from_dict(art.data_config))
    pred = collect_predictions(module.model, loader)
    metrics = pl.read_csv(run_dir / "logs" / "metrics.csv").drop_nulls("val_auroc")
    (logged,) = metrics.filter(pl.col("epoch") == best["epoch"]).iter_rows(named=True)
    assert logged["val_auroc"] == pytest.approx(auroc(pred["label"], pred["logit"]), abs=1e-6)
    # The exported model is the average.
    exported = art.model.state_dict()
    for name, value in exported.items():
        torch.testing.assert_close(value, average[f"model.{name}"], msg=name)
    with pytest.raises(InputError, match="ema_decay"):
        load_run_config(None, ["optim.ema_decay=1.0"])


def test_a_gene_environment_term_trains_and_is_exported(tiny_cohort, tiny_config, tmp_path):
    from clinfuse.training.checkpoints import load_checkpoint
    from clinfuse.training.run import train

    run_dir = tmp_path / "run"
    extra = (
        "model.gene_environment=timeseries",
        "model.gene_environment_lr=20",
        "model.encoders.sgl_mlp.interaction_groups=[GENE01]",  # as the path would write
    )
    train(tiny_config(tiny_cohort, *extra), run_dir)
    art = load_artifact(run_dir / "model")
    gxe = art.model.gxe
    assert gxe is not None and art.model.gene_environment == "timeseries"
    assert gxe.modifier.in_features > 0  # GENE01's markers
    assert gxe.modifier.weight.abs().sum() > 0  # moved off its zero start
    assert int(gxe.env_seen) > 0 and float(gxe.env_var) > 0  # moments of the training batches
    best = load_checkpoint(run_dir / "checkpoints" / "best.ckpt")["state_dict"]
    for name, value in art.model.gxe.state_dict().items():
        torch.testing.assert_close(value, best[f"model.gxe.{name}"], msg=name)
    samples = load_samples(tiny_cohort).filter(pl.col("split") == "held_out")
    cfg = config_from_dict(art.data_config)
    pred = collect_predictions(art.model, make_loader(tiny_cohort, samples, art.spec, cfg))
    assert np.isfinite(pred["logit"]).all() and len(pred["logit"]) == samples.height
