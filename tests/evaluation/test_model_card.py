from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from clinfuse.evaluation.model_card import CARD_FILE, TEMPLATE, render_model_card


@pytest.mark.slow
def test_evaluate_writes_a_filled_card(evaluated_run) -> None:
    out, metrics = evaluated_run
    card = (out / CARD_FILE).read_text()
    assert f"| AUROC | {metrics['auroc']:.3f} |" in card
    lo, hi = metrics["auroc_ci"]
    assert f"{lo:.3f} to {hi:.3f}" in card
    assert metrics["model_id"] in card
    for site in metrics["per_site"]:
        assert re.search(
            rf"^\| {re.escape(site)} \| {metrics['per_site'][site]['n']} \|", card, re.M
        )
    spec_sites = json.loads((out.parent / "model" / "artifact.json").read_text())["spec"]["sites"]
    assert spec_sites and f"**Sites seen in training:** {', '.join(spec_sites)}" in card
    assert "{{" not in card and "}}" not in card
    assert "<!--" not in card
    assert "Read from each modality's embedding before fusion" in card


@pytest.mark.slow
def test_card_tables_are_well_formed(evaluated_run) -> None:
    # Every Markdown table row has as many cells as its header, or renderers drop it.
    card = (evaluated_run[0] / CARD_FILE).read_text()
    for block in re.findall(r"(?:^\|.*\|\n)+", card, re.M):
        widths = {line.count(" | ") for line in block.strip().splitlines() if "---" not in line}
        assert len(widths) == 1, block


@pytest.mark.slow
def test_card_names_the_training_cohort_hashes(evaluated_run) -> None:
    out, _ = evaluated_run
    meta = json.loads((out.parent / "model" / "artifact.json").read_text())
    card = (out / CARD_FILE).read_text()
    hashes = meta["provenance"]["cohort_files_sha256"]
    assert hashes and all(f"| {f} | `{h}` |" in card for f, h in hashes.items())
    assert meta["provenance"]["code"]["git_commit"] in card


# ------------------------------------------------- hand-made inputs, no training


def _metrics(**extra) -> dict:
    base = {
        "model_id": "ab" * 32,
        "cohort": "/data/icu",
        "split": "held_out",
        "n": 100,
        "prevalence": 0.2,
        "auroc": 0.81234,
        "auroc_ci": [0.7, 0.9],
        "per_site": {"North": {"n": 80, "prevalence": 0.2, "auroc": 0.8, "ece": 0.05}},
        "audit": {},
    }
    return {**base, **extra}


def _probe(acc: float, majority: float, n: int) -> dict:
    return {"n": n, "classes": ["A", "B"], "probe_accuracy": acc, "majority_rate": majority}


def test_missing_values_render_as_na_not_nan() -> None:
    card = render_model_card(_metrics(auroc=math.nan, auroc_ci=[math.nan, math.nan]), {}, {})
    assert "| AUROC | n/a | n/a |" in card
    assert not re.search(r"\bnan\b", card, re.I)


def test_probe_verdict_uses_two_binomial_standard_errors() -> None:
    # n = 100, majority 0.5: one standard error is sqrt(0.25 / 100) = 0.05, the margin 0.10.
    above = _metrics(audit={"site": _probe(0.62, 0.5, 100)})
    within = _metrics(audit={"site": _probe(0.58, 0.5, 100)})
    assert "- site: recoverable" in render_model_card(above, {}, {})
    assert "- site: not recovered" in render_model_card(within, {}, {})
    assert "still encodes site" in render_model_card(above, {}, {})


def test_mlp_probe_alone_can_make_a_confound_recoverable() -> None:
    # Linear probe at the majority rate after erasure, MLP probe 0.66 (margin 0.10 at n=100).
    probe = {**_probe(0.51, 0.5, 100), "mlp_probe_accuracy": 0.66}
    card = render_model_card(_metrics(audit={"site": probe}), {}, {})
    assert "- site: recoverable: the MLP probe beats the majority rate by +0.160" in card
    assert "| site | 100 | A, B | 0.510 | 0.660 | 0.500 |" in card


def test_verdict_reads_the_probe_against_the_risk_factor_floor() -> None:
    # The risk factors themselves give 0.60 away: 0.62 is no more than that (margin 0.10),
    # 0.75 is.
    at_floor = {**_probe(0.62, 0.5, 100), "risk_factor_probe_accuracy": 0.60}
    over = {**_probe(0.75, 0.5, 100), "risk_factor_probe_accuracy": 0.60}
    assert "no more than the 0.600 that the true risk factors" in render_model_card(
        _metrics(audit={"site": at_floor}), {}, {}
    )
    assert "above the 0.600 that the true risk factors give away" in render_model_card(
        _metrics(audit={"site": over}), {}, {}
    )


def test_card_names_the_modality_embeddings_that_carry_the_confound() -> None:
    by = {
        "timeseries": {
            "probe_accuracy": 0.48,
            "mlp_probe_accuracy": 0.40,
            "majority_rate": 0.5,
            "n": 100,
        },
        "image": {
            "probe_accuracy": 0.81,
            "mlp_probe_accuracy": 0.79,
            "majority_rate": 0.5,
            "n": 90,
        },
    }
    probe = {**_probe(0.62, 0.5, 100), "by_modality": by}
    card = render_model_card(_metrics(audit={"site": probe}), {}, {})
    assert (
        "Read from each modality's embedding before fusion (logistic / MLP): "
        "image 0.810 / 0.790 (majority 0.500); timeseries 0.480 / 0.400 (majority 0.500)."
    ) in card  # most readable first


def test_site_unseen_in_training_is_flagged() -> None:
    metrics = _metrics(
        per_site={"North": {"n": 50, "auroc": 0.8}, "Harbor": {"n": 50, "auroc": 0.7}}
    )
    card = render_model_card(metrics, {"spec": {"sites": ["North"]}}, {})
    assert "Harbor: site never seen in training." in card
    assert "North: site never seen" not in card


def test_pipe_in_a_site_name_does_not_break_the_table() -> None:
    card = render_model_card(_metrics(per_site={"A|B": {"n": 40, "auroc": 0.7}}), {}, {})
    assert "| A\\|B | 40 |" in card


def test_unknown_placeholder_is_refused(tmp_path: Path) -> None:
    template = tmp_path / "card.md"
    template.write_text(TEMPLATE.read_text() + "\n{{not_a_field}}\n")
    with pytest.raises(ValueError, match=r"card\.md.*not_a_field"):
        render_model_card(_metrics(), {}, {}, template=template)


def test_missing_template_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.md"):
        render_model_card(_metrics(), {}, {}, template=tmp_path / "nowhere.md")


def test_genotype_group_selection_is_reported_against_the_truth() -> None:
    genomics = {
        "selected_groups": ["G1", "G2"],
        "n_groups": 5,
        "causal_groups": ["G1"],
        "group_precision": 0.5,
        "group_recall": 1.0,
    }
    card = render_model_card(_metrics(genomics=genomics), {}, {})
    assert "(2 of 5): G1, G2." in card
    assert "precision 0.500, recall 1.000" in card


def test_a_model_that_kept_no_genotype_group_says_so() -> None:
    none_kept = _metrics(genomics={"selected_groups": [], "n_groups": 20})
    some_kept = _metrics(genomics={"selected_groups": ["GENE02"], "n_groups": 20})
    note = "kept no genotype group: genotypes do not contribute"
    assert note in render_model_card(none_kept, {}, {})
    assert note not in render_model_card(some_kept, {}, {})
