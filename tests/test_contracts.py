"""Registry-driven contract tests: every registered encoder and fusion strategy.

New encoders and strategies are picked up from the registries; give an encoder a
tiny configuration in ``TINY_CONFIGS`` when its defaults are too large for CI.
For each: forward + backward on a tiny batch (B=4, 4 channels, 12 markers in 3
groups, 32 px), the documented shapes, no NaN, a gradient on every trainable
parameter and none on frozen ones, and finite outputs when a modality is
missing for every sample.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from clinfuse.datasets.batch import PRESENT_KEY
from clinfuse.encoders import create_encoder, list_encoders
from clinfuse.fusion import create_fusion, list_fusions
from clinfuse.fusion.adversary import AdversaryConfig
from clinfuse.fusion.model import FusionModel, has_tokens, token_dim

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "timm_image": {
        "model_name": "test_efficientnet",
        "weights": "none",
        "transfer": "full",
        "embed_dim": 8,
        "drop_rate": 0.0,
    },
    "gru_d": {"hidden": 8, "embed_dim": 8},
    "tft": {"hours": 8, "hidden": 8, "var_dim": 4, "heads": 2, "embed_dim": 8, "dropout": 0.0},
    "sgl_mlp": {"hidden": [8], "embed_dim": 8, "dropout": 0.0},
}


def _encoder(name: str, spec) -> Any:
    torch.manual_seed(0)
    return create_encoder(name, spec=spec, **TINY_CONFIGS.get(name, {}))


def _gradient_problems(module: torch.nn.Module) -> list[str]:
    problems = []
    for n, p in module.named_parameters():
        if p.requires_grad and p.grad is None:
            problems.append(f"{n}: trainable but no gradient")
        elif p.requires_grad and not torch.isfinite(p.grad).all():
            problems.append(f"{n}: non-finite gradient")
        elif not p.requires_grad and p.grad is not None:
            problems.append(f"{n}: frozen but has a gradient")
    return problems


def _check_tokens(enc, batch) -> torch.Tensor:
    tokens, mask, age = enc.forward_tokens(batch)
    b, t = mask.shape
    assert tokens.shape == (b, t, token_dim(enc)) and age.shape == (b, t)
    assert mask.dtype == torch.bool
    assert torch.isfinite(tokens).all() and torch.isfinite(age).all() and (age >= 0).all()
    present = batch[PRESENT_KEY[enc.modality]]
    assert not mask[~present].any(), "an absent modality must not expose valid tokens"
    return (tokens * mask.unsqueeze(-1)).pow(2).mean()


@pytest.mark.parametrize("name", list_encoders())
def test_encoder_contract(name: str, tiny_spec, tiny_batch) -> None:
    enc = _encoder(name, tiny_spec).train()
    assert enc.modality in PRESENT_KEY and enc.embed_dim > 0
    emb, present = enc(tiny_batch)
    assert emb.shape == (4, enc.embed_dim)
    assert present.dtype == torch.bool
    assert torch.equal(present, tiny_batch[PRESENT_KEY[enc.modality]])
    assert torch.isfinite(emb).all()
    loss = emb.pow(2).mean()
    if has_tokens(enc):
        loss = loss + _check_tokens(enc, tiny_batch)
    loss.backward()
    assert _gradient_problems(enc) == []


@pytest.mark.parametrize("name", list_encoders())
def test_encoder_with_modality_missing_for_all(
    name: str, tiny_spec, tiny_batch, mask_modality
) -> None:
    enc = _encoder(name, tiny_spec)
    batch = mask_modality(tiny_batch, enc.modality)
    for mode in (True, False):
        enc.train(mode)
        emb, present = enc(batch)
        assert torch.isfinite(emb).all() and not present.any()
        if has_tokens(enc):
            _check_tokens(enc, batch)


def _fusion_model(name: str, encoders: dict, spec) -> FusionModel:
    torch.manual_seed(0)
    fusion = create_fusion(
        name,
        in_dims={m: e.embed_dim for m, e in encoders.items()},
        token_dims={m: token_dim(e) for m, e in encoders.items() if has_tokens(e)},
    )
    assert fusion.out_dim > 0
    adversary = AdversaryConfig(enabled=True, on_modalities=True)
    return FusionModel(encoders, fusion, spec, adversary, modality_dropout=0.25, aux_weight=0.5)


def _forward_backward(model: FusionModel, batch: dict) -> dict:
    model.set_progress(0.5)
    out = model(batch)
    assert out["logit"].shape == (4,)
    assert out["fused"].shape == (4, model.fusion.out_dim)
    assert torch.isfinite(out["logit"]).all() and torch.isfinite(out["fused"]).all()
    risk = torch.nn.functional.binary_cross_entropy_with_logits(out["logit"], batch["label"])
    adv, _ = model.adversary_loss(out, batch)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    aux = model.aux_loss(out, batch["label"], bce)
    (risk + adv + aux + model.regularization_loss()).backward()
    return out


def _check_missing(model: FusionModel, batch: dict, mask_modality) -> None:
    model.eval()
    with torch.no_grad():
        everything_missing = batch
        for m in model.modalities:
            assert torch.isfinite(model(mask_modality(batch, m))["logit"]).all(), m
            everything_missing = mask_modality(everything_missing, m)
        assert torch.isfinite(model(everything_missing)["logit"]).all()


@pytest.mark.parametrize("name", list_fusions())
def test_fusion_contract(
    name: str, tiny_spec, tiny_batch, toy_encoder_factory, mask_modality
) -> None:
    model = _fusion_model(name, toy_encoder_factory(tiny_spec), tiny_spec).train()
    _forward_backward(model, tiny_batch)
    assert _gradient_problems(model) == []
    _check_missing(model, tiny_batch, mask_modality)


def _real_encoders(spec) -> dict:
    """The first registered encoder of each modality."""
    chosen: dict = {}
    for name in list_encoders():
        enc = _encoder(name, spec)
        chosen.setdefault(enc.modality, enc)
    return chosen


@pytest.mark.parametrize("name", list_fusions())
def test_fusion_over_registered_encoders(name: str, tiny_spec, tiny_batch, mask_modality) -> None:
    encoders = _real_encoders(tiny_spec)
    if not encoders:
        pytest.skip("no encoder is registered")
    model = _fusion_model(name, encoders, tiny_spec).train()
    _forward_backward(model, tiny_batch)
    assert _gradient_problems(model) == []
    _check_missing(model, tiny_batch, mask_modality)
