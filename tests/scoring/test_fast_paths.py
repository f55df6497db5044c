"""The scoring fast paths give the numbers of the plain paths they replace."""

from __future__ import annotations

import pytest
import torch

from clinfuse.fusion import create_fusion

DIMS = {"genomics": 7, "image": 6, "timeseries": 5}
B, T = 6, 5


def _inputs(seed: int = 0) -> tuple[dict, dict]:
    """Sample 1 lacks the image, 2 the time series, 3 the genotypes, 4 everything."""
    g = torch.Generator().manual_seed(seed)
    missing = {"image": [1, 4], "timeseries": [2, 4], "genomics": [3, 4]}
    emb = {}
    for m, d in DIMS.items():
        present = torch.ones(B, dtype=torch.bool)
        present[missing[m]] = False
        emb[m] = (torch.randn(B, d, generator=g), present)
    length = torch.tensor([3, 5, 0, 2, 0, 4])
    mask = torch.arange(T).unsqueeze(0) < length.unsqueeze(1)  # (B, T)
    age = torch.rand(B, T, generator=g) * 24 * mask  # (B, T)
    return emb, {"timeseries": (torch.randn(B, T, 5, generator=g), mask, age)}


@pytest.mark.parametrize(("self_layers", "queries"), [(0, 1), (1, 1), (0, 3)])
def test_attention_variants_equal_one_fuse_per_left_out_modality(
    self_layers: int, queries: int
) -> None:
    torch.manual_seed(0)
    fusion = create_fusion(
        "attention", in_dims=DIMS, token_dims={"timeseries": 5}, dim=8, heads=2,
        self_layers=self_layers, queries=queries,
    ).eval()  # fmt: skip
    emb, tok = _inputs()
    variants = [(), ["image"], ["timeseries"], ["genomics"], ["image", "genomics"]]
    with torch.no_grad():
        got = fusion.forward_variants(emb, tok, variants)  # (B, V, dim)
        views = {k: v.clone() for k, v in fusion.last_attention.items()}
        for v, gone in enumerate(variants):
            kept = {m: (e, p & (m not in gone)) for m, (e, p) in emb.items()}
            t, mask, age = tok["timeseries"]
            kept_tok = {"timeseries": (t, mask & ("timeseries" not in gone), age)}
            expected = fusion(kept, kept_tok)  # (B, dim)
            if v == 0:  # the full variant runs exactly as forward
                assert torch.equal(got[:, 0], expected)
                full_views = fusion.last_attention
            # float32 attention with other matrix shapes: rounding only (~1e-7 relative).
            torch.testing.assert_close(got[:, v], expected, rtol=1e-5, atol=1e-6)
    for k, v in full_views.items():
        assert torch.equal(views[k], v)


@pytest.mark.parametrize("fusion_name", ["attention", "gated", "late", "early"])
def test_model_fuse_variants_match_fuse_with_absent(artifact, fusion_name: str) -> None:
    from clinfuse.fusion.model import FusionModel, has_tokens, token_dim

    encoders = dict(artifact.model.encoders)
    torch.manual_seed(0)
    fusion = create_fusion(
        fusion_name,
        in_dims={m: e.embed_dim for m, e in encoders.items()},
        token_dims={m: token_dim(e) for m, e in encoders.items() if has_tokens(e)},
    )
    model = FusionModel(encoders, fusion, artifact.spec).eval()
    emb = {m: (torch.randn(B, e.embed_dim), torch.rand(B) > 0.3) for m, e in encoders.items()}
    tok = {}
    if fusion.uses_tokens:
        for m, e in encoders.items():
            if has_tokens(e):
                mask = torch.rand(B, T) > 0.3
                tok[m] = (torch.randn(B, T, token_dim(e)), mask, torch.rand(B, T) * 48)
    variants = [(), *[[m] for m in model.modalities]]
    with torch.no_grad():
        runs = model.fuse_variants(emb, tok, variants)
        for v, gone in enumerate(variants):
            ref = model.fuse(emb, tok, absent=gone)
            torch.testing.assert_close(runs["logit"][:, v], ref["logit"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(runs["fused"][:, v], ref["fused"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="absent modalities"):
        model.fuse_variants(emb, tok, [(), ["xray"]])
