from __future__ import annotations

import pytest
import torch

from clinfuse.datasets.spec import DataSpec
from clinfuse.encoders import create_encoder
from clinfuse.encoders.pathway_gnn import PathwayGNNEncoder, build_pathway_graph

# 4 groups of 3 markers; marker rs1 also sits in G2 (so G0 and G2 share a marker)
GROUP_OF = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
EXTRA = [("rs1", "G2")]
CROSSTALK = [("G1", "G3")]


def _spec(mean: list[float] | None = None, markers: list[str] | None = None) -> DataSpec:
    m = len(GROUP_OF)
    return DataSpec(
        markers=markers or [f"rs{i}" for i in range(m)],
        marker_groups=list(GROUP_OF),
        groups=[f"G{g}" for g in range(4)],
        marker_mean=mean or [0.2 + 0.1 * i for i in range(m)],
    )


def _batch(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (b, len(GROUP_OF)), generator=gen).float()
    mask = (torch.rand(x.shape, generator=gen) > 0.2).float()
    return {"genotype": x * mask, "genotype_mask": mask, "genotype_present": torch.ones(b).bool()}


def _encoder(spec: DataSpec | None = None, **kw) -> PathwayGNNEncoder:
    torch.manual_seed(0)
    cfg = {"hidden": 8, "embed_dim": 6, "group_layers": 2, "dropout": 0.0, **kw}
    return create_encoder(
        "pathway_gnn", spec=spec or _spec(), memberships=EXTRA, group_edges=CROSSTALK, **cfg
    )


def test_graph_edges_from_spec_memberships_and_user_pairs() -> None:
    graph = build_pathway_graph(_spec(), memberships=EXTRA, group_edges=CROSSTALK)
    m2g = set(map(tuple, graph.marker_to_group.T.tolist()))
    assert m2g == {(i, g) for i, g in enumerate(GROUP_OF)} | {(1, 2)}
    g2g = set(map(tuple, graph.group_edges.T.tolist()))
    # shared marker rs1 links G0-G2, the user links G1-G3, plus self-loops
    assert g2g == {(0, 2), (2, 0), (1, 3), (3, 1)} | {(g, g) for g in range(4)}


def test_unknown_names_in_graph_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="'rsX'"):
        build_pathway_graph(_spec(), memberships=[("rsX", "G0")])
    with pytest.raises(ValueError, match="'G9'"):
        build_pathway_graph(_spec(), group_edges=[("G0", "G9")])


def test_shape_and_every_parameter_gets_gradient() -> None:
    enc = _encoder()
    emb, present = enc(_batch())
    assert emb.shape == (3, 6) and present.tolist() == [True] * 3
    emb.pow(2).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batched_forward_equals_one_subject_at_a_time() -> None:
    enc = _encoder().eval()
    batch = _batch(b=3)
    emb, _ = enc(batch)
    for i in range(3):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        torch.testing.assert_close(enc(one)[0], emb[i : i + 1], rtol=1e-5, atol=1e-6)


def test_missing_and_absent_subjects_are_finite() -> None:
    enc = _encoder()
    batch = _batch()
    batch["genotype"][1:] = 0.0
    batch["genotype_mask"][1:] = 0.0
    batch["genotype_present"][2] = False
    emb, present = enc(batch)
    assert torch.isfinite(emb).all() and present.tolist() == [True, True, False]


def test_attention_weights_are_a_distribution_over_groups() -> None:
    attn = _encoder().group_attention(_batch())
    assert attn.shape == (3, 4)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3))


def _permuted(enc: PathwayGNNEncoder, perm: list[int]) -> PathwayGNNEncoder:
    """The same model on a spec whose markers are reordered by ``perm``."""
    spec = _spec()
    new_spec = _spec(
        mean=[spec.marker_mean[i] for i in perm], markers=[spec.markers[i] for i in perm]
    )
    assert [GROUP_OF[i] for i in perm] == GROUP_OF  # a permutation inside groups
    other = _encoder(new_spec)
    state = dict(enc.state_dict())
    for key in ("marker_gain", "marker_bias", "marker_mean", "marker_scale"):
        state[key] = state[key][perm]  # everything per marker moves with its marker
    learned = {k: v for k, v in state.items() if k not in ("marker_to_group", "group_edges")}
    other.load_state_dict(learned, strict=False)  # the graph comes from the new spec
    return other.eval()


def test_permuting_markers_inside_a_group_with_their_features_keeps_output() -> None:
    enc = _encoder().eval()
    batch = _batch()
    perm = [2, 1, 0, 5, 3, 4, 6, 8, 7, 11, 9, 10]  # rs1 stays put (it has an extra group)
    other = _permuted(enc, perm)
    permuted = {k: v[:, perm] if v.ndim == 2 else v for k, v in batch.items()}
    torch.testing.assert_close(other(permuted)[0], enc(batch)[0], rtol=1e-5, atol=1e-6)


def test_moving_a_dosage_to_another_group_changes_output() -> None:
    # the control for the test above: the graph, not the order, makes it invariant
    enc = _encoder().eval()
    batch = _batch()
    swapped = {k: v.clone() for k, v in batch.items()}
    for key in ("genotype", "genotype_mask"):
        swapped[key][:, [0, 10]] = batch[key][:, [10, 0]]
    assert not torch.allclose(enc(swapped)[0], enc(batch)[0], atol=1e-4)


def test_wrong_marker_count_is_named() -> None:
    batch = _batch()
    batch["genotype"] = batch["genotype"][:, :5]
    with pytest.raises(ValueError, match=r"\(B, 12\)"):
        _encoder()(batch)


def test_checkpoint_with_the_old_gate_bias_loads_to_the_same_outputs() -> None:
    enc = _encoder().eval()
    state = dict(enc.state_dict())
    state["gate.bias"] = torch.tensor([3.0])  # what an older checkpoint carries
    other = _encoder().eval()
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    other.load_state_dict(state)
    batch = _batch()
    torch.testing.assert_close(other(batch)[0], enc(batch)[0])
