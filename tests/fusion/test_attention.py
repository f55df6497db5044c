"""Attention fusion's sequence-token regularizers: window pooling and token dropout."""

from __future__ import annotations

import math

import pytest
import torch

from clinfuse.fusion import create_fusion
from clinfuse.fusion.attention import pool_token_windows

DIMS = {"image": 6, "timeseries": 5}


def _build(**cfg):
    torch.manual_seed(0)
    return create_fusion("attention", in_dims=DIMS, token_dims={"timeseries": 5}, **cfg)


def _inputs(b: int = 3, steps: int = 12):
    g = torch.Generator().manual_seed(1)
    emb = {
        m: (torch.randn(b, d, generator=g), torch.ones(b, dtype=torch.bool))
        for m, d in DIMS.items()
    }
    mask = torch.ones(b, steps, dtype=torch.bool)
    age = torch.arange(steps, 0, -1).float().expand(b, steps)  # hours before prediction
    return emb, {"timeseries": (torch.randn(b, steps, 5, generator=g), mask, age)}


def test_windows_are_masked_means_with_the_freshest_age():
    t = torch.tensor([[[1.0], [3.0], [100.0], [5.0], [7.0]]])  # (1, 5, 1)
    mask = torch.tensor([[True, True, False, True, False]])
    age = torch.tensor([[9.0, 8.0, 1.0, 4.0, 2.0]])
    pooled, valid, a = pool_token_windows(t, mask, age, windows=2)  # windows of 3: [0,1,2], [3,4]
    torch.testing.assert_close(pooled, torch.tensor([[[2.0], [5.0]]]))  # masked 100 and 7 left out
    assert valid.tolist() == [[True, True]]
    torch.testing.assert_close(a, torch.tensor([[8.0, 4.0]]))  # masked ages 1 and 2 left out


def test_an_all_masked_window_is_invalid_with_age_zero():
    t = torch.ones(1, 4, 2)
    mask = torch.tensor([[True, True, False, False]])
    pooled, valid, age = pool_token_windows(t, mask, torch.full((1, 4), 5.0), windows=2)
    assert valid.tolist() == [[True, False]]
    assert age[0, 1] == 0.0 and torch.isfinite(pooled).all()


def test_max_tokens_caps_the_attended_sequence():
    emb, tok = _inputs(steps=12)
    fusion = _build(max_tokens=4).eval()
    assert torch.isfinite(fusion(emb, tok)).all()
    x, _, owner = fusion._tokens(emb, tok)  # keys: null + 2 pooled + 4 windows
    assert x.shape[1] == 1 + 2 + 4 and owner.count("timeseries") == 1 + 4


def test_token_dropout_masks_about_p_of_the_tokens_in_training_only():
    fusion = _build(token_dropout=0.3)
    _, tok = _inputs(b=50, steps=40)
    t, mask, age = tok["timeseries"]
    fusion.train()
    kept = fusion._regularize(t, mask, age)[1].float().mean().item()
    n = mask.numel()
    assert abs((1 - kept) - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)  # binomial SE over 2,000 tokens
    fusion.eval()
    assert fusion._regularize(t, mask, age)[1].all()


def test_eval_output_does_not_depend_on_token_dropout():
    emb, tok = _inputs()
    plain = _build().eval()
    dropped = _build(token_dropout=0.5).eval()
    dropped.load_state_dict(plain.state_dict())
    torch.testing.assert_close(dropped(emb, tok), plain(emb, tok))


@pytest.mark.parametrize("cfg", [{"max_tokens": -1}, {"token_dropout": 1.0}])
def test_bad_settings_are_refused_by_name(cfg):
    with pytest.raises(ValueError, match=next(iter(cfg))):
        _build(**cfg)


# --- pairwise_rank: low-rank cross-modal products


def _three(b: int = 4):
    g = torch.Generator().manual_seed(2)
    dims = {"genomics": 3, "image": 6, "timeseries": 5}
    emb = {
        m: (torch.randn(b, d, generator=g), torch.ones(b, dtype=torch.bool))
        for m, d in dims.items()
    }
    return dims, emb


def _pairwise_fusion(dims, rank=4):
    torch.manual_seed(0)
    return create_fusion("attention", in_dims=dims, use_tokens=False, pairwise_rank=rank)


def test_pairwise_terms_are_the_products_of_every_present_pair():
    dims, emb = _three()
    fusion = _pairwise_fusion(dims).eval()
    pw = fusion.pairwise
    z = {m: pw.factors[m](e) for m, (e, _) in emb.items()}
    want = pw.out(
        z["genomics"] * z["image"] + z["genomics"] * z["timeseries"] + z["image"] * z["timeseries"]
    )
    torch.testing.assert_close(pw(emb), want)
    # the whole output is the pooled attention plus these terms
    fusion.pairwise = None
    pooled = fusion(emb)
    fusion.pairwise = pw
    torch.testing.assert_close(fusion(emb), pooled + want)


def test_a_missing_modality_contributes_no_pairwise_term():
    dims, emb = _three()
    fusion = _pairwise_fusion(dims).eval()
    gone = dict(emb, image=(emb["image"][0], torch.tensor([False, True, False, True])))
    changed = dict(gone, image=(gone["image"][0] * 100.0 + 7.0, gone["image"][1]))
    out, out_changed = fusion(gone), fusion(changed)
    absent = ~gone["image"][1]
    # rows without an image do not see its (changed) embedding at all
    torch.testing.assert_close(out[absent], out_changed[absent])
    assert not torch.allclose(out[~absent], out_changed[~absent])
    # and with one modality left, no pair remains: the pairwise output is exactly zero
    alone = {m: (e, torch.zeros_like(p)) if m != "image" else (e, p) for m, (e, p) in emb.items()}
    assert fusion.pairwise(alone).abs().max().item() == 0.0


def test_pairwise_parameters_all_get_gradients_and_variants_match_fuse():
    dims, emb = _three()
    fusion = _pairwise_fusion(dims).train()
    fusion(emb).pow(2).sum().backward()
    for name, p in fusion.pairwise.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    fusion.eval()
    variants = [(), ("image",), ("genomics", "timeseries")]
    with torch.no_grad():
        together = fusion.forward_variants(emb, None, variants)  # (B, V, dim)
        for v, gone in enumerate(variants):
            one = {m: (e, p & (m not in gone)) for m, (e, p) in emb.items()}
            torch.testing.assert_close(together[:, v], fusion(one), rtol=1e-5, atol=1e-6)
