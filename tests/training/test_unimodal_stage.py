"""Two-stage training in one run: ``optim.unimodal_epochs`` and ``encoder_lr_after_unimodal``."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from clinfuse.config import to_dict
from clinfuse.datasets.datamodule import CohortDataModule
from clinfuse.errors import InputError
from clinfuse.training.checkpoints import load_checkpoint
from clinfuse.training.config import load_run_config
from clinfuse.training.module import RiskModule
from clinfuse.training.run import fit_image_harmonization, prepare_run, selection_start, train

GXE = (
    "model.gene_environment=timeseries",
    "model.encoders.sgl_mlp.interaction_groups=[GENE01]",  # as the path would write
)


def test_the_unimodal_epochs_train_encoders_and_their_heads_only(
    tiny_cohort, tiny_config, tmp_path
):
    torch.manual_seed(0)
    cfg = tiny_config(tiny_cohort, "optim.max_epochs=3", "optim.unimodal_epochs=2", *GXE)
    run = tmp_path / "run"
    dm = CohortDataModule(prepare_run(cfg, run), cfg.data, run_dir=run)
    dm.setup("fit")
    module = RiskModule.create(cfg.model, dm.spec, cfg.optim, cfg.seed)
    fit_image_harmonization(module, dm)  # the demo preset's ComBat maps, as train() fits them
    before = {k: v.detach().clone() for k, v in module.model.named_parameters()}
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)  # epoch 0 of 2 unimodal epochs
    after = dict(module.model.named_parameters())
    moved = {k for k in before if not torch.equal(before[k], after[k].detach())}
    for modality in module.model.encoders:
        assert any(k.startswith(f"encoders.{modality}.") for k in moved), modality
    assert any(k.startswith("aux_heads.") for k in moved)
    # The fused side got no loss: untouched, not merely small steps.
    fused_side = [k for k in before if not k.startswith(("encoders.", "aux_heads."))]
    assert any(k.startswith("gxe.") for k in fused_side) and any("fusion" in k for k in fused_side)
    assert not moved & set(fused_side), sorted(moved & set(fused_side))


def test_selection_and_the_encoder_rates_follow_the_stages(tiny_cohort, tiny_config, tmp_path):
    rates = {}
    for factor in (1.0, 0.1):
        run = tmp_path / f"run_{factor}"
        cfg = tiny_config(
            tiny_cohort, "optim.max_epochs=3", "optim.patience=0", "optim.unimodal_epochs=2",
            f"optim.encoder_lr_after_unimodal={factor}",
        )  # fmt: skip
        assert selection_start(cfg) == 2
        summary = train(cfg, run)
        assert summary["epochs"] == 3  # patience 0 counts from the first full-loss epoch only
        best = load_checkpoint(run / "checkpoints" / "best.ckpt")
        assert best["epoch"] == 2  # the only epoch whose fused logit was trained
        module = RiskModule(**best["hyper_parameters"])
        encoder_ids = {id(p) for p in module.model.encoders.parameters()}
        groups = module.model.param_groups(1.0, 0.0)
        is_encoder = [all(id(p) in encoder_ids for p in g["params"]) for g in groups]
        saved = [g["lr"] for g in best["optimizer_states"][0]["param_groups"]]
        assert len(saved) == len(groups) and any(is_encoder) and not all(is_encoder)
        rates[factor] = (saved, is_encoder)
    (plain, is_encoder), (lowered, _) = rates[1.0], rates[0.1]
    for enc, a, b in zip(is_encoder, plain, lowered, strict=True):
        assert b == pytest.approx(a * (0.1 if enc else 1.0), rel=1e-6)


def test_unimodal_settings_are_checked(tiny_cohort, tiny_config, tmp_path):
    with pytest.raises(InputError, match="model.aux_weight > 0"):
        load_run_config(None, ["optim.unimodal_epochs=2", "model.aux_weight=0"])
    with pytest.raises(InputError, match="unimodal_epochs must be >= 0"):
        load_run_config(None, ["optim.unimodal_epochs=-1"])
    with pytest.raises(InputError, match="encoder_lr_after_unimodal must be > 0"):
        load_run_config(None, ["optim.encoder_lr_after_unimodal=0"])
    cfg = tiny_config(tiny_cohort, "optim.max_epochs=2", "optim.unimodal_epochs=2")
    with pytest.raises(ValueError, match=r"optim.unimodal_epochs=2\): no epoch"):
        train(cfg, tmp_path / "run")
    assert to_dict(load_run_config(None, []).optim)["unimodal_epochs"] == 0  # off by default
