"""The gene x environment term: zero at the start, zero without either modality, learns a
planted modifier, and refuses configurations it cannot serve."""

from __future__ import annotations

import pytest
import torch

from clinfuse.config import from_dict
from clinfuse.fusion import create_fusion
from clinfuse.fusion.adversary import AdversaryConfig
from clinfuse.fusion.gene_environment import GeneEnvironment
from clinfuse.fusion.model import FusionModel, ModelConfig, build_model, has_tokens, token_dim


def _model(encoders, spec, gxe="timeseries", aux_weight=0.5, fusion="attention", **kw):
    # The toy genotype encoder has no dosage read: these tests use the embedding input.
    kw.setdefault("gene_environment_input", "embedding")
    torch.manual_seed(0)
    fus = create_fusion(
        fusion,
        in_dims={m: e.embed_dim for m, e in encoders.items()},
        token_dims={m: token_dim(e) for m, e in encoders.items() if has_tokens(e)},
    )
    return FusionModel(encoders, fus, spec, aux_weight=aux_weight, gene_environment=gxe, **kw)


def _perturb(model: FusionModel) -> None:
    """Moves the modifier off its zero start (as training does)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.gxe.modifier.weight.copy_(torch.randn(model.gxe.modifier.weight.shape, generator=g))
        model.gxe.modifier.bias.fill_(0.7)
        model.gxe.env_mean.fill_(0.2)
        model.gxe.env_var.fill_(2.0)


def test_the_term_starts_at_zero(tiny_spec, tiny_batch, toy_encoder_factory) -> None:
    torch.manual_seed(0)
    with_term = _model(toy_encoder_factory(tiny_spec), tiny_spec).eval()
    torch.manual_seed(0)
    without = _model(toy_encoder_factory(tiny_spec), tiny_spec, gxe=None).eval()
    state = {k: v for k, v in with_term.state_dict().items() if not k.startswith("gxe.")}
    without.load_state_dict(state)
    torch.testing.assert_close(with_term(tiny_batch)["logit"], without(tiny_batch)["logit"])


def _expected_term(model: FusionModel, gene: torch.Tensor, embeddings) -> torch.Tensor:
    """The term by its formula, with ``_perturb``'s moments (mean 0.2, variance 2)."""
    here = embeddings["genomics"][1] & embeddings["timeseries"][1]
    env = model.aux_heads["timeseries"](embeddings["timeseries"][0]).squeeze(-1)
    return torch.where(here, model.gxe.modifier(gene).squeeze(-1) * (env - 0.2) / 2.0**0.5, 0.0)


def _logit_without_term(model: FusionModel, emb, tokens) -> torch.Tensor:
    """The fused logit with the modifier at zero (then put back by ``_perturb``)."""
    with torch.no_grad():
        model.gxe.modifier.weight.zero_()
        model.gxe.modifier.bias.zero_()
    logit = model.fuse(emb, tokens)["logit"]
    _perturb(model)
    return logit


def test_the_term_is_the_modifier_times_the_standardized_environment(
    tiny_spec, tiny_batch, toy_encoders
) -> None:
    model = _model(toy_encoders, tiny_spec).eval()
    _perturb(model)
    emb, tokens = model.encode(tiny_batch)
    out = model.fuse(emb, tokens)
    want = _expected_term(model, emb["genomics"][0], emb)  # embedding input
    torch.testing.assert_close(out["logit"] - _logit_without_term(model, emb, tokens), want)
    torch.testing.assert_close(model.gene_environment_term(out["embeddings"]), want)
    here = emb["genomics"][1] & emb["timeseries"][1]
    assert (want != 0).sum() == int(here.sum())  # some samples carry a term


@pytest.mark.parametrize("gone", ["genomics", "timeseries"])
def test_a_missing_modality_leaves_no_term(
    tiny_spec, tiny_batch, toy_encoders, mask_modality, gone
) -> None:
    model = _model(toy_encoders, tiny_spec).eval()
    _perturb(model)
    batch = mask_modality(tiny_batch, gone)
    out = model(batch)
    torch.testing.assert_close(model.gene_environment_term(out["embeddings"]), torch.zeros(4))
    # and leaving the modality out by argument is the same as its absence in the data
    full = model(tiny_batch, absent=[gone])
    torch.testing.assert_close(full["logit"], out["logit"])


def test_variants_equal_one_fuse_each(tiny_spec, tiny_batch, toy_encoders) -> None:
    model = _model(toy_encoders, tiny_spec).eval()
    _perturb(model)
    emb, tokens = model.encode(tiny_batch)
    variants = [(), ["genomics"], ["timeseries"], ["image"]]
    runs = model.fuse_variants(emb, tokens, variants)
    for j, gone in enumerate(variants):
        one = model.fuse(emb, tokens, absent=gone)["logit"]
        torch.testing.assert_close(runs["logit"][:, j], one)


def test_gradients_reach_the_modifier_and_the_genotype_encoder_not_the_environment(
    tiny_spec, tiny_batch, toy_encoders
) -> None:
    model = _model(toy_encoders, tiny_spec).train()
    _perturb(model)
    out = model(tiny_batch)
    term = model.gene_environment_term(out["embeddings"])
    # a weighted sum: the plain sum's bias gradient is the sum of the batch-standardized
    # environment, zero by construction
    (term * torch.arange(1.0, 5.0)).sum().backward()
    assert model.gxe.modifier.weight.grad.abs().sum() > 0
    assert model.gxe.modifier.bias.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.encoders["genomics"].parameters())  # fmt: skip
    # the environment is the auxiliary head's own estimate: the term cannot move it
    assert all(p.grad is None for p in model.aux_heads["timeseries"].parameters())


def test_running_moments_follow_the_training_environment() -> None:
    torch.manual_seed(0)
    gxe = GeneEnvironment(3).train()
    both = torch.ones(512, dtype=torch.bool)
    for _ in range(200):
        env = 2.0 + 3.0 * torch.randn(512)
        gxe(torch.randn(512, 3), env, both)
    assert gxe.env_mean.item() == pytest.approx(2.0, abs=0.15)
    assert gxe.env_var.sqrt().item() == pytest.approx(3.0, abs=0.15)
    # samples the term does not apply to do not enter the moments
    gxe.env_seen.zero_()
    both[:256] = False
    env = torch.cat([torch.full((256,), 100.0), torch.zeros(256)])
    gxe(torch.randn(512, 3), env, both)
    assert gxe.env_mean.item() == pytest.approx(0.0, abs=1e-6)


def test_the_term_learns_a_planted_modifier() -> None:
    # The simulator's interaction: the environment's effect is 2.5 times larger in
    # carriers. The gene embedding holds the carrier flag and two noise columns.
    g = torch.Generator().manual_seed(0)
    n = 6000
    carrier = (torch.rand(n, generator=g) < 0.35).float()
    gene = torch.stack([carrier, torch.randn(n, generator=g), torch.randn(n, generator=g)], 1)
    env = torch.randn(n, generator=g)
    y = torch.bernoulli(torch.sigmoid(env * (1 + 1.5 * carrier)), generator=g)
    torch.manual_seed(0)
    gxe = GeneEnvironment(3).train()
    opt = torch.optim.Adam(gxe.parameters(), lr=0.05)
    both = torch.ones(n, dtype=torch.bool)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    for _ in range(300):
        opt.zero_grad()
        bce(env + gxe(gene, env, both), y).backward()
        opt.step()
    w = gxe.modifier.weight.detach().flatten()
    # truth: 1.5 per unit of carrier on the environment's scale (sd 1), noise 0
    assert w[0].item() == pytest.approx(1.5, abs=0.4)
    assert w[1:].abs().max().item() < 0.15


def test_configurations_it_cannot_serve_are_refused(tiny_spec, toy_encoder_factory) -> None:
    with pytest.raises(ValueError, match="aux_weight"):
        _model(toy_encoder_factory(tiny_spec), tiny_spec, aux_weight=0.0)
    with pytest.raises(ValueError, match="another modality"):
        _model(toy_encoder_factory(tiny_spec), tiny_spec, gxe="genomics")
    with pytest.raises(ValueError, match="another modality"):
        _model(toy_encoder_factory(tiny_spec), tiny_spec, gxe="vitals")
    erase = AdversaryConfig(erase=["site"])
    with pytest.raises(ValueError, match="erase"):
        _model(toy_encoder_factory(tiny_spec), tiny_spec, fusion="early", adversary=erase)


@pytest.mark.parametrize("gone", ["genomics", "timeseries"])
def test_a_model_without_either_encoder_has_no_term_and_says_so(
    tiny_spec, tiny_batch, toy_encoder_factory, gone
) -> None:
    # model.encoders.sgl_mlp=null on the default preset must still train
    encoders = {k: v for k, v in toy_encoder_factory(tiny_spec).items() if k != gone}
    model = _model(encoders, tiny_spec).eval()
    assert model.gxe is None and gone in model.gxe_note
    assert model(tiny_batch)["logit"].shape == (4,)


def _real_config(**kw) -> ModelConfig:
    genes = {"embed_dim": 8, "hidden": [8], "interaction_groups": ["g1"]}
    genes.update(kw.pop("genes", {}))
    return ModelConfig(
        encoders={"gru_d": {"hidden": 8, "embed_dim": 8}, "sgl_mlp": genes},
        fusion={"name": "early", "cfg": {}},
        aux_weight=0.5,
        gene_environment="timeseries",
        **kw,
    )


def test_the_modifier_reads_the_interaction_genes_dosages(tiny_spec, tiny_batch) -> None:
    torch.manual_seed(0)
    model = _build(_real_config(), tiny_spec).eval()
    genes = model.encoders["genomics"]
    assert model.gxe.modifier.in_features == 4  # g1's four markers
    x = genes.interaction_inputs(tiny_batch)
    torch.testing.assert_close(x, genes.inputs(tiny_batch)[:, 4:8])
    emb, tokens = model.encode(tiny_batch)
    _perturb(model)
    out = model.fuse(emb, tokens)
    want = _expected_term(model, x, emb)
    torch.testing.assert_close(out["logit"] - _logit_without_term(model, emb, tokens), want)
    torch.testing.assert_close(model.gene_environment_term(out["embeddings"], x), want)
    # a dosage outside g1 does not reach the term
    other = dict(tiny_batch, genotype=tiny_batch["genotype"].clone())
    other["genotype"][:, 0] = 2 - other["genotype"][:, 0]
    torch.testing.assert_close(genes.interaction_inputs(other), x)
    with pytest.raises(ValueError, match="tokens"):
        model.fuse(emb, {})


def _build(cfg: ModelConfig, spec):
    return build_model(from_dict(ModelConfig, cfg.__dict__), spec)


def test_build_model_reads_the_setting(tiny_spec) -> None:
    model = _build(_real_config(), tiny_spec)
    assert isinstance(model.gxe, GeneEnvironment)
    embedding = _real_config(gene_environment_input="embedding")
    assert _build(embedding, tiny_spec).gxe.modifier.in_features == 8
    assert build_model(ModelConfig(aux_weight=0.5), tiny_spec).gxe is None
    # without the path's choice the term reads no gene (its bias alone), and says so
    no_path = _build(_real_config(genes={"interaction_groups": None}), tiny_spec)
    assert no_path.gxe.modifier.in_features == 0 and "path_interaction" in no_path.gxe_note
    from clinfuse.training.run import unused_modality_warnings

    assert no_path.gxe_note in unused_modality_warnings(no_path)  # the run's summary says it
    assert _build(_real_config(), tiny_spec).gxe_note is None
    with pytest.raises(ValueError, match="interaction_groups names 'GENE99'"):
        _build(_real_config(genes={"interaction_groups": ["GENE99"]}), tiny_spec)
    with pytest.raises(ValueError, match="'dosages' or 'embedding'"):
        _build(_real_config(gene_environment_input="snps"), tiny_spec)
    # the nonlinear read reads the same four dosages, and trains in the term's group
    nonlinear = _build(_real_config(gene_environment_hidden=3), tiny_spec)
    assert nonlinear.gxe.nonlinear[0].in_features == 4
    assert nonlinear.gxe.nonlinear[0].out_features == 3
    (group,) = [
        g
        for g in nonlinear.param_groups(1e-3, 1e-4)
        if any(p is nonlinear.gxe.modifier.weight for p in g["params"])
    ]
    assert {id(p) for p in group["params"]} == {id(p) for p in nonlinear.gxe.parameters()}
    assert _build(_real_config(), tiny_spec).gxe.nonlinear is None
    with pytest.raises(ValueError, match="gene_environment_hidden"):
        _build(_real_config(gene_environment_hidden=-1), tiny_spec)


def test_the_term_has_its_own_learning_rate(tiny_spec, toy_encoders) -> None:
    model = _model(toy_encoders, tiny_spec, gene_environment_lr=20.0)
    groups = model.param_groups(1e-3, 1e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(id(p) for p in trainable)  # each parameter once
    (gxe,) = [g for g in groups if any(p is model.gxe.modifier.weight for p in g["params"])]
    assert gxe["lr"] == pytest.approx(2e-2)
    assert {id(p) for p in gxe["params"]} == {id(p) for p in model.gxe.parameters()}
    with pytest.raises(ValueError, match="gene_environment_lr"):
        _model(toy_encoders, tiny_spec, gene_environment_lr=0.0)


def _threshold_carriers(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Six standardized 'dosages' and the simulator's kind of carrier: a step (score >
    0.5) in the direction of their sum."""
    g = torch.Generator().manual_seed(seed)
    dosages = torch.randn(n, 6, generator=g)
    carrier = (dosages.sum(1) / 6**0.5 > 0.5).float()
    return dosages, carrier


def _fit(gxe: GeneEnvironment, dosages, carrier, seed: int) -> GeneEnvironment:
    g = torch.Generator().manual_seed(seed + 1)
    env = torch.randn(len(carrier), generator=g)
    y = torch.bernoulli(torch.sigmoid(env * (1 + 1.5 * carrier)), generator=g)
    opt = torch.optim.Adam(gxe.parameters(), lr=0.05)
    both = torch.ones(len(carrier), dtype=torch.bool)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    gxe.train()
    for _ in range(400):
        opt.zero_grad()
        bce(env + gxe(dosages, env, both), y).backward()
        opt.step()
    return gxe.eval()


def test_the_nonlinear_read_starts_at_zero_and_follows_a_threshold_carrier() -> None:
    dosages, carrier = _threshold_carriers(20000, seed=0)
    torch.manual_seed(0)
    both = torch.ones(len(carrier), dtype=torch.bool)
    fresh = GeneEnvironment(6, hidden=8)
    torch.testing.assert_close(fresh(dosages, torch.randn(len(carrier)), both), torch.zeros(20000))
    torch.manual_seed(0)
    linear = _fit(GeneEnvironment(6), dosages, carrier, seed=0)
    torch.manual_seed(0)
    nonlinear = _fit(GeneEnvironment(6, hidden=8), dosages, carrier, seed=0)
    # On fresh subjects: how far each read is from the planted modifier (1.5 x carrier).
    test, test_carrier = _threshold_carriers(5000, seed=7)
    with torch.no_grad():
        err = {
            name: (gxe.modifier_score(test) - 1.5 * test_carrier).pow(2).mean().item()
            for name, gxe in (("linear", linear), ("nonlinear", nonlinear))
        }
    # a linear read of a step keeps about 40% of its variance as error (r ~ 0.76)
    assert err["nonlinear"] < 0.6 * err["linear"], err
    with pytest.raises(ValueError, match="hidden"):
        GeneEnvironment(6, hidden=-1)
