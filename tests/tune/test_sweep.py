"""Sweeps: the conditional space, per-trial configs, a real local-Ray sweep, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import polars as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from clinfuse.config import from_dict
from clinfuse.datasets.datamodule import DataConfig, build_batch_tensors
from clinfuse.evaluation.metrics import auroc
from clinfuse.fusion.model import build_model
from clinfuse.simulation.simulator import SimConfig, simulate_cohort
from clinfuse.training.artifact import load_artifact
from clinfuse.training.config import RunConfig
from clinfuse.training.module import RiskModule
from clinfuse.training.run import build_trainer
from clinfuse.tune.space import apply_sampled, define_by_run, get_space, sample_config
from clinfuse.tune.sweep import (
    PLOT_FILE,
    RESULTS_FILE,
    SweepOptions,
    choose_sweep_genotype_groups,
    prepare_data,
    run_sweep,
    sweep_base_config,
)
from clinfuse.tune.trainable import (
    EpochMetricsCarry,
    datamodule_for,
    trial_config,
)

STRATEGIES = {"early", "late", "gated", "attention"}

TINY_BASE = {
    "seed": 0,
    "data": {"batch_size": 32, "image_size": 32, "max_steps": 16},
    "model": {
        "encoders": {
            "timm_image": {"model_name": "efficientnet_lite0", "embed_dim": 8},
            "gru_d": {"hidden": 8, "embed_dim": 8},
            "sgl_mlp": {"hidden": [8], "embed_dim": 8},
        },
        "fusion": {"name": "attention", "cfg": {"dim": 16, "heads": 2}},
    },
    "optim": {"max_epochs": 2, "patience": 2, "progress_bar": False, "accelerator": "cpu"},
}


def _optuna_configs(space_name: str, n: int) -> list[dict]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(sample_config(get_space(space_name), trial))
        study.tell(trial, 0.5)
    return out


# ------------------------------------------------------------------- space (no Ray)


def test_each_strategy_gets_only_its_own_parameters() -> None:
    configs = _optuna_configs("default", 60)
    seen = {c["model.fusion.name"] for c in configs}
    assert seen == STRATEGIES
    own = {"early": {"hidden", "out_dim", "dropout"}, "late": {"weighting", "hidden", "dropout"}}
    own |= {"gated": {"gate", "dim", "dropout"}}
    own |= {"attention": {"dim", "heads", "use_tokens", "self_layers", "dropout"}}
    for sampled in configs:
        cfg = trial_config(TINY_BASE, sampled)
        name = cfg.model.fusion.name
        # The preset's attention arguments (heads) never leak into another strategy.
        assert set(cfg.model.fusion.cfg) == own[name], (name, cfg.model.fusion.cfg)
        adversary_keys = [k for k in sampled if k.startswith("model.adversary.lambda_max")]
        assert bool(adversary_keys) == cfg.model.adversary.enabled
        assert 1e-4 <= cfg.optim.lr <= 3e-3


def test_sampled_configs_build_models(tiny_spec, batch_factory) -> None:
    # One config per strategy from the tiny space builds and runs a real model.
    by_strategy = {c["model.fusion.name"]: c for c in _optuna_configs("tiny", 40)}
    assert set(by_strategy) == STRATEGIES
    batch_size = 4
    batch = batch_factory(tiny_spec, batch_size)
    for sampled in by_strategy.values():
        cfg = trial_config(TINY_BASE, sampled)
        model = build_model(cfg.model, tiny_spec).eval()
        with torch.no_grad():
            logit = model(batch)["logit"]
        assert logit.shape == (batch_size,) and torch.isfinite(logit).all()


def test_space_paths_of_absent_encoders_are_dropped() -> None:
    base = {"model": {"encoders": {"gru_d": {}}}}
    out = apply_sampled(base, {"model.encoders.timm_image.transfer": "bn", "optim.lr": 0.01})
    assert out == {"model": {"encoders": {"gru_d": {}}}, "optim": {"lr": 0.01}}


def test_space_rejects_a_path_owned_twice() -> None:
    space = {"optim.lr": 1e-3, "model.fusion.name": {"late": {"optim.lr": 2e-3}}}
    with pytest.raises(ValueError, match="optim.lr"):
        define_by_run(space)


# -------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tune") / "cohort"
    cfg = SimConfig(
        n_subjects=100, image_size=32, n_groups=5, markers_per_group=4, n_causal_groups=2,
        progress=False,
    )  # fmt: skip
    return simulate_cohort(out, cfg)


def _base_config(cohort: Path) -> RunConfig:
    return from_dict(RunConfig, {**TINY_BASE, "cohort": str(cohort)})


def test_trial_may_not_change_prepared_data(cohort: Path, tmp_path: Path) -> None:
    base = sweep_base_config(_base_config(cohort), tmp_path)
    dm = prepare_data(base, tmp_path)
    ok = datamodule_for(dm, DataConfig(**{**base["data"], "batch_size": 8}))
    assert ok.cfg.batch_size == 8 and dm.cfg.batch_size == 32  # the shared one is untouched
    with pytest.raises(ValueError, match="data.image_size"):
        datamodule_for(dm, DataConfig(**{**base["data"], "image_size": 64}))


def test_trials_read_the_genes_chosen_once_on_the_driver(cohort: Path, tmp_path: Path) -> None:
    base = sweep_base_config(_base_config(cohort), tmp_path)
    base["model"]["encoders"]["sgl_mlp"].update(select="path", lambda_=0.0, path_pcs=0)
    dm = prepare_data(base, tmp_path)
    assert choose_sweep_genotype_groups(base, dm, tmp_path)
    path = json.loads((tmp_path / "genotype_path.json").read_text())
    chosen = base["model"]["encoders"]["sgl_mlp"]["keep_groups"]
    assert chosen == path["groups"]
    assert not choose_sweep_genotype_groups(base, dm, tmp_path)  # a resumed base keeps them
    cfg = trial_config(base, {"model.encoders.sgl_mlp.lambda_": 1e-3})
    encoder = RiskModule.create(cfg.model, dm.spec, cfg.optim).model.encoders["genomics"]
    assert sorted(encoder.selected_groups()) == sorted(chosen)


class _Killed(Exception):
    pass


class _SaveThenDie(Callback):
    """Checkpoints where Tune does (``on_validation_end``) and dies after epoch 1."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)
            raise _Killed


def _fit(cfg: RunConfig, dm, run: Path, callbacks: list, ckpt: Path | None = None):
    module = RiskModule.create(cfg.model, dm.spec, cfg.optim)
    trainer, _ = build_trainer(cfg, run, callbacks)
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    return trainer


def test_trial_resumes_from_a_validation_end_checkpoint(cohort: Path, tmp_path: Path) -> None:
    base = sweep_base_config(_base_config(cohort), tmp_path)
    base["optim"]["max_epochs"] = 3
    cfg = trial_config(base, {"model.fusion.name": "late"})
    dm = prepare_data(base, tmp_path)
    ckpt = tmp_path / "epoch0.ckpt"
    with pytest.raises(_Killed):
        _fit(cfg, dm, tmp_path / "a", [EpochMetricsCarry(), _SaveThenDie(ckpt)])
    # EarlyStopping finishes the interrupted epoch from the carried val_auroc.
    trainer = _fit(cfg, dm, tmp_path / "b", [EpochMetricsCarry()], ckpt)
    assert trainer.current_epoch == 3
    assert "val_auroc" in trainer.callback_metrics


# ---------------------------------------------------------------------------- Ray


@pytest.fixture
def ray_local(monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    yield
    ray.shutdown()


def _cache_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every cached feature file with its inode and mtime (a re-write changes both)."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.glob("*/*.safetensors")}


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_sweep_shares_features_and_exports_a_scoring_artifact(
    cohort: Path, tmp_path: Path, ray_local, monkeypatch
) -> None:
    out = tmp_path / "sweep"
    opts = SweepOptions(space="tiny", num_samples=4, max_concurrent=2, num_cpus=2)
    snapshots = []
    import clinfuse.tune.sweep as sweep_module

    real_warm = sweep_module.warm_embedding_cache

    def warm_then_snapshot(base, dm):
        n = real_warm(base, dm)
        snapshots.append(_cache_snapshot(out / "cache" / "embeddings"))
        return n

    monkeypatch.setattr(sweep_module, "warm_embedding_cache", warm_then_snapshot)
    table = run_sweep(_base_config(cohort), out, opts)

    saved = pl.read_parquet(out / RESULTS_FILE)
    assert saved.height == 4 and saved["trial_id"].n_unique() == 4
    assert set(saved["strategy"]) <= STRATEGIES
    assert (saved["status"] != "error").all() and (saved["epochs"] >= 1).all()
    assert saved.equals(table)
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The CNN ran once per image before the Tuner; no trial ran it or wrote the cache.
    warm = snapshots[0]
    assert len(warm) > 0
    assert _cache_snapshot(out / "cache" / "embeddings") == warm
    assert (saved["cnn_images"] == 0).all()

    # The exported best model loads and reproduces its trial's best val AUROC.
    artifact = load_artifact(out / "best" / "model")
    dm = prepare_data(yaml.safe_load((out / "base_config.yaml").read_text()), tmp_path)
    tuning = dm.split_samples("tuning")
    data_cfg = DataConfig(**{**artifact.data_config, "cache_dir": None})
    batch = build_batch_tensors(cohort, tuning, artifact.spec, data_cfg)
    with torch.no_grad():
        logit = artifact.model(batch)["logit"].numpy()
    assert logit.shape == (tuning.height,) and np.isfinite(logit).all()
    best = saved["best_val_auroc"].max()
    # AUROC moves in steps of 1/(positives * negatives) >= 1/50**2 here, so any other
    # checkpoint or a rank flip shows; Lightning logged it as float32 (error < 6e-8).
    assert auroc(tuning["label"].to_numpy(), logit) == pytest.approx(best, abs=1e-6)

    from clinfuse.cli import main

    assert main(["score", str(out / "best" / "model"), "--cohort", str(cohort),
                 "--out", str(tmp_path / "scores"), "--no-progress"]) == 0  # fmt: skip
    scores = pl.read_parquet(tmp_path / "scores" / "*.parquet")
    assert scores.height == 100 and scores["error"].is_null().all()
    assert (scores["model_id"] == artifact.model_id).all()


def _first_result_saved(experiment: Path) -> bool:
    """A trial reported and Tune's experiment snapshot already records it.

    Tune writes the snapshot right after each checkpointed result, without an atomic
    rename; killing inside that write tears the file (``restore_tuner`` refuses it).
    """
    states = sorted(experiment.glob("experiment_state-*.json"))
    try:
        return bool(states) and "val_auroc" in json.dumps(json.loads(states[-1].read_text()))
    except ValueError:
        return False


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "clinfuse.cli", "tune", *args]


@pytest.mark.ray
@pytest.mark.slow
def test_killed_sweep_resumes_with_every_trial_once(cohort: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_BASE))
    out = tmp_path / "sweep"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    args = ["--config", str(config), "--cohort", str(cohort), "--out", str(out),
            "--space", "tiny", "--num-samples", "4", "--max-concurrent", "2", "--num-cpus", "2"]  # fmt: skip
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(
        _cli(args), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    experiment = out / "ray" / "sweep"
    deadline = time.monotonic() + 300
    while (
        not _first_result_saved(experiment) and proc.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    assert not (out / RESULTS_FILE).exists()

    resumed = subprocess.run(
        _cli(["--out", str(out), "--num-cpus", "2", "--resume"]),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
        start_new_session=True,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    table = pl.read_parquet(out / RESULTS_FILE)
    assert table.height == 4 and table["trial_id"].n_unique() == 4
    assert (table["status"] != "error").all()
    trial_dirs = [p for p in experiment.iterdir() if p.is_dir() and p.name.startswith("train_fn")]
    assert len(trial_dirs) == 4
    assert (out / "best" / "model" / "artifact.json").is_file()


def test_asha_waits_until_the_adversary_ramp_is_over():
    from clinfuse.tune.sweep import asha_grace_period

    ramped = {"model": {"adversary": {"ramp_epochs": 2.5}}, "optim": {}}
    # Epochs 0-2 are ramp epochs (selection starts at epoch 3 = the 4th reported iteration).
    assert asha_grace_period(1, ramped, max_epochs=10) == 4
    assert asha_grace_period(6, ramped, max_epochs=10) == 6  # a longer request stands
    assert asha_grace_period(1, ramped, max_epochs=3) == 3  # never past max_t
    later = {"model": {"adversary": {}}, "optim": {"select_from_epoch": 2}}
    assert asha_grace_period(1, later, max_epochs=10) == 3
    plain = {"model": {"adversary": {"ramp_epochs": None}}, "optim": {"select_from_epoch": 0}}
    assert asha_grace_period(1, plain, max_epochs=10) == 1
