"""Model selection that waits for the adversary's ramp, and its validation signal."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from clinfuse.training.config import RunConfig
from clinfuse.training.module import confound_accuracy
from clinfuse.training.run import selection_start, train


def _cfg(**adversary) -> RunConfig:
    cfg = RunConfig()
    for key, value in adversary.items():
        setattr(cfg.model.adversary, key, value)
    return cfg


def test_selection_starts_after_the_ramp_only_with_an_enabled_adversary() -> None:
    assert selection_start(_cfg()) == 0
    assert selection_start(_cfg(enabled=True)) == 0  # ramp over the whole run: as before
    assert selection_start(_cfg(enabled=False, ramp_epochs=2)) == 0
    assert selection_start(_cfg(enabled=True, ramp_epochs=2)) == 2
    assert selection_start(_cfg(enabled=True, ramp_epochs=1.5)) == 2  # first full epoch
    cfg = _cfg(enabled=True, ramp_epochs=1)
    cfg.optim.select_from_epoch = 3
    assert selection_start(cfg) == 3


def test_confound_accuracy_ignores_unknown_labels() -> None:
    guess = torch.tensor([0, 1, 1, 2, 0, 1])
    target = torch.tensor([0, 1, 2, 2, -1, 1])
    accuracy, majority = confound_accuracy(guess, target)
    assert accuracy == pytest.approx(4 / 5)  # rows 0, 1, 3, 5 right; row 4 unknown
    assert majority == pytest.approx(2 / 5)  # class 1 twice among 5 known
    assert all(v != v for v in confound_accuracy(guess, torch.full((6,), -1)))  # NaN


def _best_epoch(run) -> int:
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    return int(ckpt["epoch"])


def test_best_checkpoint_and_early_stopping_wait_for_the_ramp(tiny_cohort, tiny_config, tmp_path):
    # patience 0 would stop at the first epoch without improvement; epochs 0-1 don't count.
    cfg = tiny_config(
        tiny_cohort, "optim.max_epochs=3", "optim.patience=0",
        "model.adversary.enabled=true", "model.adversary.ramp_epochs=2",
    )  # fmt: skip
    summary = train(cfg, tmp_path / "run")
    assert _best_epoch(tmp_path / "run") == 2  # the only epoch trained at full strength
    assert summary["epochs"] == 3  # ran to max_epochs: nothing stopped it during the ramp
    metrics = pl.read_csv(tmp_path / "run" / "logs" / "metrics.csv")
    lambd = metrics["adversary_lambda"].drop_nulls().to_list()
    assert lambd[-1] == pytest.approx(1.0, abs=1e-3)  # lambda_max 1.0 in the demo preset
    assert lambd[0] < 0.95  # still ramping in epoch 0 (mean over its steps)
    for name in ("site", "ancestry"):
        acc = metrics[f"val_adv_{name}_acc"].drop_nulls()
        majority = metrics[f"val_adv_{name}_majority"].drop_nulls()
        assert acc.len() == 3 and ((acc >= 0) & (acc <= 1)).all()
        assert ((majority > 0) & (majority <= 1)).all()


@pytest.mark.parametrize(
    "overrides",
    [
        ("optim.max_epochs=2", "model.adversary.enabled=true", "model.adversary.ramp_epochs=2"),
        ("optim.max_epochs=3", "optim.select_from_epoch=3"),
    ],
    ids=["ramp", "select_from_epoch"],
)
def test_a_run_that_ends_before_selection_starts_is_refused_before_training(
    tiny_cohort, tiny_config, tmp_path, overrides
):
    cfg = tiny_config(tiny_cohort, *overrides)
    with pytest.raises(ValueError, match=r"optim.max_epochs=\d ends before model selection"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any epoch ran
