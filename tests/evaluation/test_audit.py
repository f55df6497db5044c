from __future__ import annotations

import numpy as np
import pytest

from clinfuse.evaluation.audit import genetic_signal, probe_confound, run_audit


def test_probe_finds_site_encoded_in_embeddings():
    rng = np.random.default_rng(0)
    site = rng.integers(0, 3, 600)
    z = rng.normal(size=(600, 8))
    z[:, 0] += 3.0 * site  # site written plainly into one dimension
    res = probe_confound(z, site, ["A", "B", "C"])
    assert res["probe_accuracy"] > 0.9
    assert res["majority_rate"] < 0.4
    assert res["classes"] == ["A", "B", "C"]


def test_probe_at_majority_rate_when_embeddings_carry_no_site():
    rng = np.random.default_rng(1)
    site = (rng.uniform(size=900) < 0.7).astype(int)  # imbalanced: majority 0.7
    z = rng.normal(size=(900, 8))
    res = probe_confound(z, site)
    # A probe that learned nothing predicts the majority class: accuracy ~ majority
    # rate and balanced accuracy ~ chance (0.5), within CV noise (~3 SE).
    assert res["probe_accuracy"] == pytest.approx(res["majority_rate"], abs=0.05)
    assert res["probe_balanced_accuracy"] == pytest.approx(0.5, abs=0.06)


def test_unknown_codes_ignored_and_single_class_is_nan():
    z = np.zeros((10, 2))
    res = probe_confound(z, np.array([0] * 8 + [-1] * 2))
    assert res["n"] == 8 and np.isnan(res["probe_accuracy"])


def test_leave_one_site_out_transfers_shared_signal():
    rng = np.random.default_rng(2)
    site = rng.integers(0, 3, 1500)
    y = rng.integers(0, 2, 1500)
    z = rng.normal(size=(1500, 4))
    z[:, 1] += 2.0 * y  # outcome signal shared by every site
    res = run_audit(z, y, {"site": site}, {"site": ["s0", "s1", "s2"]})
    assert set(res["leave_one_site_out_auroc"]) == {"s0", "s1", "s2"}
    assert min(res["leave_one_site_out_auroc"].values()) > 0.85


def test_singleton_class_is_left_out_of_the_probe_not_the_rates():
    rng = np.random.default_rng(3)
    site = np.array([0] * 50 + [1] * 49 + [2])
    z = rng.normal(size=(100, 3))
    z[:, 0] += 4.0 * (site == 1)
    res = probe_confound(z, site)
    assert res["excluded_rare_classes"] == 1
    assert res["majority_rate"] == 0.5
    assert res["probe_accuracy"] > 0.9


def test_mlp_probe_reads_a_site_code_the_linear_probe_cannot():
    # Site 1 sits on a ring (|z0| = 2), site 0 at its centre: symmetric in z0, so no
    # linear direction separates them and the logistic probe stays at the majority
    # rate (0.5, within 3 SE = 3 * sqrt(0.25 / 800) = 0.053); an MLP reads it.
    rng = np.random.default_rng(4)
    site = np.repeat([0, 1], 400)
    sign = rng.choice([-1.0, 1.0], 800)
    z = rng.normal(scale=0.3, size=(800, 3))
    z[:, 0] += 2.0 * sign * site
    res = probe_confound(z, site)
    assert res["probe_accuracy"] == pytest.approx(0.5, abs=0.053)
    assert res["mlp_probe_accuracy"] > 0.95


def test_gbt_probe_reads_a_site_hidden_in_a_threshold_interaction():
    # Site 1 is where two features are BOTH above 0 (an AND of two thresholds, a
    # quarter of the patients); trees read it exactly.
    rng = np.random.default_rng(6)
    z = rng.normal(size=(1200, 6))
    site = ((z[:, 0] > 0) & (z[:, 1] > 0)).astype(int)  # a quarter of the patients
    res = probe_confound(z, site)
    assert res["majority_rate"] == pytest.approx(0.75, abs=0.04)
    assert res["gbt_probe_accuracy"] > 0.95
    # On pure noise it reports no leak: never above the majority rate (trees fitted to
    # noise fall below it, which is no evidence of a confound either).
    noise = probe_confound(rng.normal(size=(900, 6)), (rng.uniform(size=900) < 0.7).astype(int))
    assert noise["gbt_probe_accuracy"] <= noise["majority_rate"] + 0.03


def test_risk_factor_floor_matches_the_bayes_accuracy_of_the_factors():
    # Two equally common sites; one risk factor is shifted by d = 1.5 at site 1, so
    # the best any probe can do from the factors is Phi(d / 2) = 0.7734. The
    # embedding adds pure noise dimensions. 3 SE at n = 2000: 0.028.
    rng = np.random.default_rng(5)
    n, d = 2000, 1.5
    site = rng.integers(0, 2, n)
    factors = np.column_stack([d * site + rng.normal(size=n), rng.normal(size=n)])
    z = np.column_stack([factors, rng.normal(size=(n, 4))])
    factors[:10] = np.nan  # subjects the oracle does not list
    res = probe_confound(z, site, risk_factors=factors)
    assert res["risk_factor_n"] == n - 10
    assert res["risk_factor_probe_accuracy"] == pytest.approx(0.7734, abs=0.028)
    assert res["risk_factor_mlp_probe_accuracy"] == pytest.approx(0.7734, abs=0.028)
    # The representation carries exactly the factor: it reads the site no better.
    assert res["probe_accuracy"] == pytest.approx(res["risk_factor_probe_accuracy"], abs=0.03)


def test_run_audit_passes_the_floor_to_every_confound():
    rng = np.random.default_rng(6)
    site, anc = rng.integers(0, 3, 300), rng.integers(0, 2, 300)
    z, y = rng.normal(size=(300, 4)), rng.integers(0, 2, 300)
    res = run_audit(z, y, {"site": site, "ancestry": anc}, {}, risk_factors=z[:, :2])
    assert "risk_factor_probe_accuracy" in res["site"]
    assert "risk_factor_mlp_probe_accuracy" in res["ancestry"]
    assert "risk_factor_gbt_probe_accuracy" in res["ancestry"]


def test_by_modality_names_the_embedding_that_carries_the_site():
    rng = np.random.default_rng(5)
    n = 600
    site = rng.integers(0, 3, n)
    image = rng.normal(size=(n, 6))
    image[:, 0] += 4.0 * site  # the scanner shows in the image embedding only
    genomics = rng.normal(size=(n, 6))
    has_image = rng.uniform(size=n) < 0.8
    image[~has_image] = 0.0  # absent films: zero embeddings, left out of that probe
    res = run_audit(
        rng.normal(size=(n, 4)),
        rng.integers(0, 2, n),
        {"site": site},
        {"site": ["s0", "s1", "s2"]},
        modality_embeddings={
            "image": (image, has_image),
            "genomics": (genomics, np.ones(n, dtype=bool)),
        },
    )
    by = res["site"]["by_modality"]
    assert by["image"]["n"] == int(has_image.sum()) and by["genomics"]["n"] == n
    assert by["image"]["probe_accuracy"] > 0.9
    # No site in the genotype embedding: both probes within CV noise of the majority rate.
    for key in ("probe_accuracy", "mlp_probe_accuracy", "gbt_probe_accuracy"):
        assert by["genomics"][key] < by["genomics"]["majority_rate"] + 0.06


def test_probes_run_on_a_small_held_out_split():
    # 18 patients, the rarest class with 3: every probe must still give an accuracy
    # (an internal early-stopping split inside a fold once left a class out and raised).
    rng = np.random.default_rng(7)
    site = np.array([0] * 9 + [1] * 6 + [2] * 3)
    res = probe_confound(rng.normal(size=(18, 4)), site)
    for key in ("probe_accuracy", "mlp_probe_accuracy", "gbt_probe_accuracy"):
        assert 0.0 <= res[key] <= 1.0, key


SIGNAL_KEYS = ("carrier_auroc", "genetic_score_r2", "outcome_auroc")


def _planted_genetics(seed: int, n: int = 800):
    """Carriers (a third), a genetic score and an outcome driven by both, as the simulator."""
    rng = np.random.default_rng(seed)
    carrier = (rng.uniform(size=n) < 1 / 3).astype(float)
    score = rng.normal(size=n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(1.5 * score + 1.5 * carrier - 1)))).astype(int)
    return rng, carrier, score, y


def test_genetic_signal_reads_a_planted_carrier_and_not_noise():
    rng, carrier, score, y = _planted_genetics(8)
    n = len(y)
    present = rng.uniform(size=n) < 0.8
    carries = rng.normal(size=(n, 6))
    carries[:, 0] += 3.0 * carrier  # the carrier written plainly into one dimension
    carries[:, 1] += 2.0 * score
    carries[~present] = 0.0  # no genotypes: zero embedding, left out
    noise = rng.normal(size=(n, 6))
    score_missing = score.copy()
    score_missing[:5] = np.nan  # subjects the oracle does not list
    res = genetic_signal(carries, present, noise, y, score_missing, carrier, seed=0)
    assert res["n"] == int(present[5:].sum())
    # Carrier shift d = 3 in unit noise: Bayes AUROC Phi(3 / sqrt 2) = 0.983.
    assert res["carrier_auroc"] > 0.9
    # Score var 4 in unit noise: R^2 4/5 = 0.8 at best.
    assert res["genetic_score_r2"] == pytest.approx(0.8, abs=0.06)
    assert res["outcome_auroc"] > 0.7
    # The fused representation here is pure noise: nothing to read (AUROC s.e. ~0.02).
    assert res["fused_carrier_auroc"] < 0.65
    assert res["fused_genetic_score_r2"] < 0.02
    assert res["fused_outcome_auroc"] < 0.65


def test_genetic_signal_same_answer_for_the_same_seed_and_nan_for_one_class():
    rng, carrier, score, y = _planted_genetics(9, n=300)
    z = np.column_stack([carrier + rng.normal(size=300), rng.normal(size=300)])
    present = np.ones(300, dtype=bool)
    first = genetic_signal(z, present, z, y, score, carrier, seed=3)
    assert first == genetic_signal(z, present, z, y, score, carrier, seed=3)
    flat = genetic_signal(z, present, z, y, score, np.zeros(300), seed=3)
    assert np.isnan(flat["carrier_auroc"]) and np.isnan(flat["fused_carrier_auroc"])
    assert flat["outcome_auroc"] == first["outcome_auroc"]


def test_genetic_signal_refuses_a_non_binary_carrier():
    z = np.zeros((4, 2))
    with pytest.raises(ValueError, match="carrier status must be 0/1"):
        genetic_signal(z, np.ones(4, bool), z, np.array([0, 1, 0, 1]), np.zeros(4), np.arange(4))


def test_genetic_signal_needs_an_oracle_and_a_genotype_encoder():
    from clinfuse.evaluation.evaluate import RISK_FACTORS, _genetic_signal

    z, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    pred = {"fused": z, "embedding_image": z, "present_image": np.ones(4, bool)}
    factors = np.zeros((4, len(RISK_FACTORS)))
    assert _genetic_signal(pred, y, factors, seed=0) is None  # no genotype encoder
    pred.update(embedding_genomics=z, present_genomics=np.ones(4, bool))
    assert _genetic_signal(pred, y, None, seed=0) is None  # no oracle


@pytest.mark.slow
def test_evaluate_writes_the_genetic_signal(evaluated_run):
    out, metrics = evaluated_run
    signal = metrics["audit"]["genetic_signal"]
    assert 0 < signal["n"] <= metrics["n"]
    for prefix in ("", "fused_"):
        for key in ("carrier_auroc", "outcome_auroc"):
            assert 0.0 <= signal[prefix + key] <= 1.0, prefix + key
        assert signal[prefix + "genetic_score_r2"] <= 1.0
    html = (out / "report.html").read_text()
    assert "Genetic signal kept" in html
    assert f"carrier AUROC {signal['carrier_auroc']:.3f}" in html


def _case_mix_cohort(seed: int, n: int = 800):
    """Two sites differing in case mix: a risk factor shifted by 1.5 at site 1."""
    rng = np.random.default_rng(seed)
    site = rng.integers(0, 2, n)
    factors = np.column_stack([1.5 * site + rng.normal(size=n), rng.normal(size=n)])
    return rng, site, factors


def test_verdict_passes_a_representation_that_reads_the_site_only_through_the_risk():
    # The embedding is the risk factors plus noise: its probes read the site at about
    # 0.77, far above the majority rate, but no better than the risk factors do.
    rng, site, factors = _case_mix_cohort(7)
    z = np.column_stack([factors, rng.normal(size=(len(site), 4))])
    res = run_audit(z, rng.integers(0, 2, len(site)), {"site": site}, {}, risk_factors=factors)
    assert res["site"]["probe_accuracy"] > res["site"]["majority_rate"] + 0.15
    assert res["verdict"] == {"passed": True, "above": [], "checked": 3}


def test_verdict_names_every_probe_and_embedding_that_reads_the_site_beyond_the_risk():
    rng, site, factors = _case_mix_cohort(8)
    n = len(site)
    scanner = rng.normal(size=(n, 4))
    scanner[:, 0] += 3.0 * site  # the scanner itself shows in the image embedding
    fused = np.column_stack([factors, scanner[:, :1]])
    res = run_audit(
        fused,
        rng.integers(0, 2, n),
        {"site": site},
        {},
        risk_factors=factors,
        modality_embeddings={
            "image": (scanner, np.ones(n, dtype=bool)),
            "timeseries": (rng.normal(size=(n, 4)), np.ones(n, dtype=bool)),
        },
    )
    verdict = res["verdict"]
    assert not verdict["passed"] and verdict["checked"] == 9
    flagged = {(a["representation"], a["probe"]) for a in verdict["above"]}
    kinds = ("logistic", "MLP", "trees")
    assert {("fused", k) for k in kinds} <= flagged
    assert {("image", k) for k in kinds} <= flagged
    assert not any(where == "timeseries" for where, _ in flagged)
    for a in verdict["above"]:
        assert a["accuracy"] > a["limit"] > a["floor"] >= res["site"]["majority_rate"]


def test_probe_limit_is_the_floor_plus_two_binomial_standard_errors():
    from clinfuse.evaluation.audit import probe_limit

    assert probe_limit(0.5, float("nan"), 400) == pytest.approx((0.5, 0.55))
    floor, limit = probe_limit(0.4, 0.6, 600)
    assert floor == 0.6 and limit == pytest.approx(0.6 + 2 * (0.24 / 600) ** 0.5)


def test_report_and_summary_line_say_which_probes_are_above_their_floor():
    from clinfuse.evaluation.report import _audit
    from clinfuse.training.commands import _summary_line

    rng, site, factors = _case_mix_cohort(9)
    n = len(site)
    scanner = rng.normal(size=(n, 3))
    scanner[:, 0] += 3.0 * site
    audit = run_audit(
        factors, rng.integers(0, 2, n), {"site": site}, {}, risk_factors=factors,
        modality_embeddings={"image": (scanner, np.ones(n, dtype=bool))},
    )  # fmt: skip
    html = _audit(audit)
    assert "3 of 6 probes read the confound above it" in html
    assert "site from image (trees)" in html and "site from fused" not in html
    line = _summary_line({"auroc": 0.8, "audit": audit})
    assert "audit: 3 of 6 probes above floor + 2 s.e. (site from image" in line
    clean = run_audit(factors, rng.integers(0, 2, n), {"site": site}, {}, risk_factors=factors)
    assert "audit: all 3 probes within floor + 2 s.e." in _summary_line(
        {"auroc": 0.8, "audit": clean}
    )


def test_no_confound_no_verdict():
    rng = np.random.default_rng(10)
    assert "verdict" not in run_audit(rng.normal(size=(50, 3)), rng.integers(0, 2, 50), {}, {})


def _ancestry_in_the_genes(seed: int = 11, n: int = 800):
    """Two populations whose causal markers differ in frequency; the scalar risk factor
    (the genetic score of a balanced set of markers) does not say the population."""
    rng = np.random.default_rng(seed)
    anc = rng.integers(0, 2, n)
    freq = np.where(anc[:, None] == 1, 0.65, 0.25)  # (N, 1) -> every marker drifts
    markers = rng.binomial(2, np.repeat(freq, 6, axis=1)).astype(float)  # (N, 6)
    factor = rng.normal(size=(n, 1))  # a risk factor with no population in it
    return anc, markers, factor


def test_a_model_reading_the_causal_genes_is_held_to_what_the_genes_say_of_ancestry():
    anc, markers, factor = _ancestry_in_the_genes()
    z = np.hstack([markers, factor]) + np.random.default_rng(1).normal(0, 0.1, (len(anc), 7))
    y = np.random.default_rng(2).integers(0, 2, len(anc))
    scalar = run_audit(z, y, {"ancestry": anc}, {}, risk_factors=factor)
    genes = run_audit(z, y, {"ancestry": anc}, {}, risk_factors=factor, risk_markers=markers)
    # The scalar factor gives the population away at the majority rate; the genes at
    # far more, and the representation reads no more than they do.
    assert scalar["ancestry"]["risk_factor_probe_accuracy"] < 0.6
    assert genes["ancestry"]["risk_marker_probe_accuracy"] > 0.75
    assert not scalar["verdict"]["passed"]
    assert genes["verdict"]["passed"], genes["verdict"]["above"]


def test_the_genes_floor_does_not_excuse_ancestry_read_from_elsewhere():
    anc, markers, factor = _ancestry_in_the_genes()
    z = np.hstack([markers, factor, anc[:, None] * 3.0])  # the population itself, too
    y = np.random.default_rng(3).integers(0, 2, len(anc))
    res = run_audit(z, y, {"ancestry": anc}, {}, risk_factors=factor, risk_markers=markers)
    assert not res["verdict"]["passed"]
    assert {a["probe"] for a in res["verdict"]["above"]} >= {"logistic"}
