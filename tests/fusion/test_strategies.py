"""Fusion strategies on hand-made embeddings: masking, weights, ages, finiteness."""

from __future__ import annotations

import pytest
import torch

from clinfuse.fusion import create_fusion, list_fusions
from clinfuse.fusion.attention import AttentionFusion
from clinfuse.fusion.gated import GatedFusion, masked_softmax
from clinfuse.fusion.late import LateFusion

DIMS = {"image": 6, "timeseries": 5, "genomics": 7}
B = 4


def _embeddings(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Sample 1 lacks the image, 2 the time series, 3 the genotypes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, d in sorted(DIMS.items()):
        present = torch.ones(B, dtype=torch.bool)
        present[{"image": 1, "timeseries": 2, "genomics": 3}[m]] = False
        out[m] = (torch.randn(B, d, generator=g), present)
    return out


def _tokens(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    length = torch.tensor([3, 5, 0, 2])  # sample 2 has no time series
    mask = torch.arange(5).unsqueeze(0) < length.unsqueeze(1)  # (B, T)
    age = torch.rand(B, 5, generator=g) * 24 * mask
    return {"timeseries": (torch.randn(B, 5, 5, generator=g), mask, age)}


def _build(name: str, **cfg):
    torch.manual_seed(0)
    token_dims = {"timeseries": 5} if name == "attention" else None
    return create_fusion(name, in_dims=DIMS, token_dims=token_dims, **cfg).eval()


def _run(fusion, embeddings, tokens=None):
    return fusion(embeddings, tokens if fusion.uses_tokens else None)


@pytest.mark.parametrize("name", list_fusions())
def test_absent_modality_content_does_not_reach_the_output(name: str) -> None:
    fusion = _build(name)
    emb, tok = _embeddings(), _tokens()
    out = _run(fusion, emb, tok)
    assert out.shape == (B, fusion.out_dim)
    scrambled = {m: (e.clone(), p) for m, (e, p) in emb.items()}
    for e, p in scrambled.values():
        e[~p] = 1e6  # garbage where the modality is absent
    t, mask, age = tok["timeseries"]
    tok2 = {"timeseries": (t.masked_fill(~mask.unsqueeze(-1), 1e6), mask, age)}
    torch.testing.assert_close(_run(fusion, scrambled, tok2), out)


@pytest.mark.parametrize("name", list_fusions())
def test_rows_are_independent(name: str) -> None:
    fusion = _build(name)
    emb, tok = _embeddings(), _tokens()
    perm = torch.tensor([2, 0, 3, 1])
    out = _run(fusion, emb, tok)
    emb_p = {m: (e[perm], p[perm]) for m, (e, p) in emb.items()}
    tok_p = {m: tuple(x[perm] for x in v) for m, v in tok.items()}
    torch.testing.assert_close(_run(fusion, emb_p, tok_p), out[perm])


@pytest.mark.parametrize("name", list_fusions())
def test_all_missing_is_finite(name: str) -> None:
    fusion = _build(name)
    emb = {
        m: (torch.full_like(e, float("nan")), torch.zeros_like(p))
        for m, (e, p) in _embeddings().items()
    }
    t, mask, age = _tokens()["timeseries"]
    out = _run(fusion, emb, {"timeseries": (t, torch.zeros_like(mask), age)})
    assert torch.isfinite(out).all()
    # nothing is known, so every sample gets the same output
    torch.testing.assert_close(out, out[:1].expand_as(out))


def test_masked_softmax_renormalizes_and_zeroes() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    w = masked_softmax(scores, mask)
    e1, e3 = torch.exp(torch.tensor(1.0)), torch.exp(torch.tensor(3.0))
    torch.testing.assert_close(
        w[0], torch.stack([e1 / (e1 + e3), torch.tensor(0.0), e3 / (e1 + e3)])
    )
    assert torch.equal(w[1], torch.zeros(3))


def test_late_mean_averages_present_modality_logits() -> None:
    fusion = _build("late", weighting="mean")
    emb = _embeddings()
    out = fusion(emb)
    assert fusion.produces_logit and out.shape == (B, 1)
    logits = torch.stack([fusion.last_modality_logits[m] for m in fusion.modalities], 1)
    present = torch.stack([emb[m][1] for m in fusion.modalities], 1).float()
    expected = (logits * present).sum(1) / present.sum(1)
    torch.testing.assert_close(out[:, 0], expected)


def test_late_learned_weights_are_softmax_renormalized_over_present() -> None:
    fusion = _build("late", weighting="learned")
    with torch.no_grad():
        fusion.weight_logits.copy_(
            torch.log(torch.tensor([1.0, 2.0, 5.0]))
        )  # softmax: 1/8, 2/8, 5/8
    present = torch.tensor([[True, True, True], [True, False, True], [False, False, False]])
    w = fusion.modality_weights(present)
    torch.testing.assert_close(w[0], torch.tensor([1 / 8, 2 / 8, 5 / 8]))
    torch.testing.assert_close(w[1], torch.tensor([1 / 6, 0.0, 5 / 6]))
    assert torch.equal(w[2], torch.zeros(3))
    assert fusion.weight_logits.requires_grad
    assert not _build("late", weighting="mean").weight_logits.requires_grad


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_gates_are_zero_for_absent_and_normalized(gate: str) -> None:
    fusion: GatedFusion = _build("gated", gate=gate)
    emb = _embeddings()
    fusion(emb)
    gates = torch.stack([fusion.last_gates[m] for m in fusion.modalities], 1)  # (B, M)
    present = torch.stack([emb[m][1] for m in fusion.modalities], 1)
    assert torch.equal(gates[~present], torch.zeros(int((~present).sum())))
    assert (gates[present] > 0).all() and (gates[present] < 1).all()
    if gate == "softmax":
        torch.testing.assert_close(gates.sum(1), torch.ones(B))


@pytest.mark.parametrize("queries", [1, 3])
def test_attention_weights_cover_present_tokens_only(queries: int) -> None:
    fusion: AttentionFusion = _build("attention", queries=queries)
    emb, tok = _embeddings(), _tokens()
    fusion(emb, tok)
    attn = fusion.last_attention
    total = sum(attn.values())
    torch.testing.assert_close(total, torch.ones(B))  # softmax over all tokens incl. null
    for m, (_, present) in emb.items():
        assert torch.equal(attn[m][~present], torch.zeros(int((~present).sum())))
        assert (attn[m][present] > 0).all()
    assert (attn["null"] > 0).all()


def test_attention_reads_token_age() -> None:
    fusion = _build("attention")
    emb, tok = _embeddings(), _tokens()
    t, mask, age = tok["timeseries"]
    fresh = fusion(emb, tok)
    stale = fusion(emb, {"timeseries": (t, mask, age + 72.0)})
    changed = (fresh - stale).abs().amax(dim=1)
    ts_present = emb["timeseries"][1]
    assert (changed[ts_present] > 1e-4).all()
    torch.testing.assert_close(fresh[~ts_present], stale[~ts_present])  # no tokens, nothing ages


def test_attention_padded_steps_are_ignored() -> None:
    fusion = _build("attention")
    emb, tok = _embeddings(), _tokens()
    t, mask, age = tok["timeseries"]
    pad = torch.zeros(B, 3, 5)
    longer = (
        torch.cat([t, pad + 7.0], 1),
        torch.cat([mask, pad[..., 0].bool()], 1),
        torch.cat([age, pad[..., 0]], 1),
    )
    torch.testing.assert_close(fusion(emb, {"timeseries": longer}), fusion(emb, tok))


def test_attention_with_several_queries_keeps_width_and_masks() -> None:
    emb, tok = _embeddings(), _tokens()
    one, three = _build("attention"), _build("attention", queries=3)
    assert one.merge is None  # one query: the single-seed PMA, no merge layer
    out = three(emb, tok)
    assert out.shape == one(emb, tok).shape == (B, three.out_dim)
    scrambled = {m: (e.masked_fill(~p.unsqueeze(1), 1e6), p) for m, (e, p) in emb.items()}
    torch.testing.assert_close(three(scrambled, tok), out)  # absent content never leaks
    with pytest.raises(ValueError, match="queries"):
        _build("attention", queries=0)


def test_attention_self_layers_and_pooled_only_modes_run() -> None:
    emb, tok = _embeddings(), _tokens()
    deep = _build("attention", self_layers=1)
    assert torch.isfinite(deep(emb, tok)).all()
    pooled = _build("attention", use_tokens=False)
    assert not pooled.uses_tokens and len(pooled.token_proj) == 0
    assert pooled(emb).shape == (B, pooled.out_dim)


@pytest.mark.parametrize(
    ("name", "cfg", "match"),
    [("gated", {"gate": "relu"}, "gate"), ("late", {"weighting": "max"}, "weighting")],
)
def test_bad_options_are_named(name: str, cfg: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_fusion(name, in_dims=DIMS, **cfg)


def test_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="attention"):
        create_fusion("nope", in_dims=DIMS)


def test_strategies_register_themselves() -> None:
    assert {"early", "late", "gated", "attention"} <= set(list_fusions())
    assert isinstance(create_fusion("late", in_dims=DIMS), LateFusion)
