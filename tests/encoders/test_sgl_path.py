"""The data-chosen genotype penalty: path, lambda_max, the rule, ancestry, the kept groups."""

from __future__ import annotations

import pytest
import torch

from clinfuse.datasets.spec import DataSpec
from clinfuse.encoders import create_encoder
from clinfuse.encoders.genomics import _group_norms, sparse_group_prox
from clinfuse.encoders.sgl_path import choose, lambda_max, regularization_path


@pytest.fixture(scope="module")
def planted(two_populations) -> tuple[DataSpec, dict, dict]:
    return two_populations(n=3000, seed=0)


def test_path_keeps_the_planted_causal_groups_and_not_the_ancestry_only_one(planted) -> None:
    spec, data, truth = planted
    path = regularization_path(spec, data["train"], data["tuning"], ancestry_pcs=2)
    assert path.groups == truth["causal"]
    # The path runs from every group at zero to past the causal groups.
    assert path.n_selected[0] == 0 and path.n_selected[-1] > len(truth["causal"])
    assert path.lambdas == sorted(path.lambdas, reverse=True)


def test_the_path_does_not_depend_on_the_thread_count(tmp_path) -> None:
    # On this simulator cohort the all-zero fit at lambda_max let a group in at 1e-17
    # with two threads and not with one (tuning loss 0.541 vs 0.530 at the first
    # strength), which changed the genes chosen from one machine to the next.
    from clinfuse.datasets.datamodule import CohortDataModule, DataConfig
    from clinfuse.simulation.simulator import SimConfig, simulate_cohort

    cohort = simulate_cohort(
        tmp_path / "c", SimConfig(n_subjects=2000, image_size=32, seed=3, progress=False)
    )
    dm = CohortDataModule(cohort, DataConfig(genotype_pcs=2, image_size=32))
    dm.setup("fit")
    train, tuning = dm.datasets["train"].tensors, dm.datasets["tuning"].tensors
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(regularization_path(dm.spec, train, tuning, ancestry_pcs=2))
    finally:
        torch.set_num_threads(before)
    assert runs[0].n_selected[0] == runs[1].n_selected[0] == 0
    assert runs[0].selected == runs[1].selected and runs[0].chosen == runs[1].chosen
    torch.testing.assert_close(
        torch.tensor(runs[0].tuning_loss), torch.tensor(runs[1].tuning_loss), rtol=1e-6, atol=1e-9
    )


def test_without_ancestry_adjustment_the_ancestry_only_group_is_picked(planted) -> None:
    # The adjustment is what keeps G04 out: unadjusted, ancestry's effect on the
    # outcome reaches the model only through the dosages that differ by population.
    spec, data, truth = planted
    path = regularization_path(spec, data["train"], data["tuning"], ancestry_pcs=0)
    assert truth["ancestral"] in path.groups


def test_lambda_max_is_the_edge_of_the_all_zero_solution() -> None:
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(12, generator=gen, dtype=torch.float64)
    groups = torch.arange(12) // 3
    sizes = torch.full((4,), 3.0, dtype=torch.float64)
    top = lambda_max(grad, groups, sizes, alpha=0.5)

    def kept(lam: float) -> int:  # groups the prox step keeps from zero at step 1
        w = sparse_group_prox(-grad[None], groups, sizes, lam * 0.5, lam * 0.5)
        return int((_group_norms(w, groups, 4) > 0).sum())

    assert kept(top * 1.001) == 0
    assert kept(top * 0.999) == 1


def test_choose_rules_on_hand_made_losses() -> None:
    # Strength 2 has the lowest mean; strength 1 is worse by 0.01 per subject with no
    # spread (a difference far beyond its standard error, 0); strength 0 is worse by
    # +-0.02 alternating, mean 0: within one standard error of the best.
    base = torch.linspace(0.3, 0.7, 100, dtype=torch.float64)
    noise = 0.02 * torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(50)
    losses = torch.stack([base + noise + 1e-4, base + 0.01, base])
    assert choose(losses, "min") == 2
    assert choose(losses, "1se") == 0
    with pytest.raises(ValueError, match="rule='best'"):
        choose(losses, "best")


def test_keep_groups_zeroes_the_rest_and_keeps_them_zero_under_training(two_populations) -> None:
    spec, data, _ = two_populations(n=200, seed=1)
    enc = create_encoder("sgl_mlp", spec=spec, hidden=(8,), embed_dim=4, lambda_=0.0,
                         keep_groups=["G01", "G07"])  # fmt: skip
    assert enc.selected_groups() == ["G01", "G07"]
    opt = torch.optim.AdamW(enc.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        enc(data["train"])[0].pow(2).mean().backward()
        opt.step()
        enc.after_optimizer_step(0.1)
    assert enc.selected_groups() == ["G01", "G07"]
    with pytest.raises(ValueError, match="'GENE99'"):
        create_encoder("sgl_mlp", spec=spec, keep_groups=["GENE99"])


@pytest.mark.parametrize("rule", ["1se", "stability"])
def test_a_modifier_gene_is_kept_only_when_the_path_sees_its_environment(modifier_genes, rule):
    spec, data, env, truth = modifier_genes(n=3000, seed=0)
    plain = regularization_path(spec, data["train"], data["tuning"], rule=rule)
    gxe = regularization_path(
        spec, data["train"], data["tuning"], rule=rule, environment=(env["train"], env["tuning"])
    )
    # Without the environment the modifier has no marginal association to find (over
    # seeds 0-5 its stability frequency was 0.00-0.66 without, 1.00 with it).
    assert truth["main"] in plain.groups and truth["modifier"] not in plain.groups
    assert not plain.interaction
    assert gxe.groups == [truth["main"], truth["modifier"]] and gxe.interaction
    # The modifier is kept by its interaction twin, the main-effect gene by itself.
    assert gxe.interaction_groups == [truth["modifier"]]
    assert len(gxe.group_norms[0]) == 2 * spec.n_groups


def test_an_environment_score_that_does_not_fit_its_batch_is_named(modifier_genes) -> None:
    spec, data, env, _ = modifier_genes(n=400, seed=1)
    short = (env["train"][:-1], env["tuning"])
    with pytest.raises(ValueError, match="train environment score"):
        regularization_path(spec, data["train"], data["tuning"], environment=short)
    bad = env["tuning"].clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="tuning environment score"):
        regularization_path(spec, data["train"], data["tuning"], environment=(env["train"], bad))
