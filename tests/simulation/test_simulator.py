"""The cohort simulator: contract, determinism, DICOM, confounds, ground truth."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re

import numpy as np
import polars as pl
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from scipy.stats import spearmanr

from clinfuse.cli import main as cli_main
from clinfuse.datasets import schema
from clinfuse.simulation.events import LABS, VITALS
from clinfuse.simulation.images import LEFT_LUNG, RIGHT_LUNG, marker_box
from clinfuse.simulation.oracle import modality_ceilings
from clinfuse.simulation.simulator import (
    ORACLE_GROUPS_FILE,
    SimConfig,
    build_world_for,
    sample_oracle,
    sample_presence,
    simulate_cohort,
)

SIZE = 48
CFG = SimConfig(n_subjects=40, image_size=SIZE, seed=0, progress=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return simulate_cohort(tmp_path_factory.mktemp("sim") / "a", CFG)


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    return simulate_cohort(tmp_path_factory.mktemp("sim") / "twin", CFG)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    cfg = dataclasses.replace(CFG, seed=1)
    return simulate_cohort(tmp_path_factory.mktemp("sim") / "other", cfg)


def _read(cohort, name: str) -> pl.DataFrame:
    return pl.read_parquet(cohort / f"{name}.parquet")


def _display(path) -> tuple[np.ndarray, pydicom.Dataset]:
    """Pixels on a [0, 1] scale where 1 is bright (dense), whatever the photometry."""
    ds = pydicom.dcmread(path)
    top = 2**ds.BitsStored - 1
    pixels = ds.pixel_array.astype(float) / top
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = 1.0 - pixels
    return pixels, ds


def test_every_table_matches_the_contract(cohort):
    for spec in schema.TABLES:
        frame = _read(cohort, spec.name)
        for col, dtype in spec.required.items():
            assert frame.schema[col] == dtype, f"{spec.name}.{col}: {frame.schema[col]}"
        for col, dtype in spec.optional.items():
            if col in frame.columns:
                assert frame.schema[col] == dtype, f"{spec.name}.{col}: {frame.schema[col]}"
    markers = _read(cohort, "markers")["marker"].to_list()
    genotypes = _read(cohort, "genotypes")
    assert genotypes.columns == ["subject_id", *markers]
    assert {genotypes.schema[m] for m in markers} == {pl.Int8}
    assert (cohort / schema.ORACLE_FILE).is_file() and (cohort / ORACLE_GROUPS_FILE).is_file()


def test_subjects_labels_and_splits_cover_every_subject_once(cohort):
    ids = set(range(1, CFG.n_subjects + 1))
    for name in ("subjects", "labels", "subject_splits", "genotypes", "oracle"):
        frame = _read(cohort, name)
        assert frame["subject_id"].n_unique() == frame.height == CFG.n_subjects, name
        assert set(frame["subject_id"]) == ids, name
    splits = _read(cohort, "subject_splits")["split"]
    assert set(splits) <= set(schema.SPLITS)
    assert 0.5 < (splits == "train").mean() < 0.85


def test_events_hold_every_channel_with_units_and_admission(cohort):
    events = _read(cohort, "events")
    codes = set(events["code"])
    assert {ch.code for ch in VITALS + LABS} | {"ICU_ADMISSION"} <= codes
    admission = events.filter(pl.col("code") == "ICU_ADMISSION")
    assert admission.height == CFG.n_subjects
    assert admission["numeric_value"].null_count() == admission.height
    measured = events.filter(pl.col("code") != "ICU_ADMISSION")
    assert measured["numeric_value"].null_count() == 0
    assert measured["unit"].null_count() == 0
    for ch in VITALS + LABS:
        values = measured.filter(pl.col("code") == ch.code)["numeric_value"]
        assert ch.lo <= values.min() and values.max() <= ch.hi, ch.code


def test_same_seed_gives_identical_bytes(cohort, twin):
    for spec in schema.TABLES:
        a = (cohort / f"{spec.name}.parquet").read_bytes()
        b = (twin / f"{spec.name}.parquet").read_bytes()
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), spec.name
    for path in _read(cohort, "images")["path"]:
        assert (cohort / path).read_bytes() == (twin / path).read_bytes(), path


def test_another_seed_gives_another_cohort_of_the_same_world(cohort, other):
    assert not _read(cohort, "events").equals(_read(other, "events"))
    assert not _read(cohort, "oracle").equals(_read(other, "oracle"))
    assert _read(cohort, "markers").equals(_read(other, "markers"))
    first = pydicom.dcmread(cohort / _read(cohort, "images")["path"][0])
    uids = {pydicom.dcmread(other / p).SOPInstanceUID for p in _read(other, "images")["path"]}
    assert first.SOPInstanceUID not in uids


def test_every_film_is_dicom_with_site_headers_and_no_identifiers(cohort):
    images = _read(cohort, "images")
    assert images.height > CFG.n_subjects * 0.8
    seen: dict[str, str] = {}
    for row in images.iter_rows(named=True):
        ds = pydicom.dcmread(cohort / row["path"])
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.Manufacturer == row["manufacturer"] and ds.Modality == row["modality"]
        assert seen.setdefault(row["site"], ds.Manufacturer) == ds.Manufacturer
        assert ds.pixel_array.shape == (SIZE, SIZE) and ds.BitsStored in (12, 16)
        assert str(ds.PatientName) == f"ANON^{row['subject_id']}"
        assert re.fullmatch(r"PSN[0-9A-F]{12}", ds.PatientID), ds.PatientID
        assert "PatientBirthDate" not in ds and ds.PatientIdentityRemoved == "YES"
    assert len(set(seen.values())) == len(seen), "two sites share a manufacturer"


def test_monochrome1_sites_store_inverted_pixels(cohort):
    """On display, air beside the body is darker than the spine and the burned-in
    marker square is white: MONOCHROME1 films must store the opposite."""
    world = build_world_for(CFG)
    corner = {s.name: s.corner for s in world.sites}
    photometry = set()
    for row in _read(cohort, "images").iter_rows(named=True):
        ds = pydicom.dcmread(cohort / row["path"])
        raw = ds.pixel_array.astype(float) / (2**ds.BitsStored - 1)
        middle = slice(SIZE // 2 - 4, SIZE // 2 + 4)
        air, spine = raw[middle, :2].mean(), raw[middle, SIZE // 2 - 1 : SIZE // 2 + 1].mean()
        inverted = ds.PhotometricInterpretation == "MONOCHROME1"
        photometry.add(ds.PhotometricInterpretation)
        assert (air > spine) if inverted else (air < spine), (row["path"], air, spine)
        rows, cols = marker_box(SIZE, corner[row["site"]])
        edge = raw[rows, cols][0]  # the top edge of the square, white on display
        assert (edge == 0).all() if inverted else (edge == 1.0).all(), row["path"]
    assert photometry == {"MONOCHROME1", "MONOCHROME2"}


def _opacified_fraction(pixels: np.ndarray) -> float:
    """Share of the lung-field cores brighter than half the spine: the opacity extent.

    Aerated lung is dark on display; opacities bring it up to soft-tissue level. The
    spine is the film's own reference, so the measure holds across intensity curves.
    """
    axis = np.linspace(-1.0, 1.0, pixels.shape[0])
    y, x = np.meshgrid(axis, axis, indexing="ij")
    core = np.zeros_like(pixels, dtype=bool)
    for cx, cy, rx, ry in (RIGHT_LUNG, LEFT_LUNG):
        core |= ((x - cx) / (0.8 * rx)) ** 2 + ((y - cy) / (0.8 * ry)) ** 2 < 1
    mid = pixels.shape[0] // 2
    spine = pixels[mid - 4 : mid + 4, mid - 1 : mid + 1].mean()
    return float((pixels[core] > 0.5 * spine).mean())


def test_opacity_extent_follows_lung_disease(cohort):
    images = _read(cohort, "images").join(_read(cohort, "labels"), on="subject_id")
    before = images.filter(pl.col("time") <= pl.col("prediction_time"))
    oracle = _read(cohort, "oracle").select("subject_id", "lung_disease")
    before = before.join(oracle, on="subject_id")
    extent = [_opacified_fraction(_display(cohort / p)[0]) for p in before["path"]]
    rho = spearmanr(extent, before["lung_disease"]).statistic
    # Under no association rho has s.d. ~ 1/sqrt(n - 1) ~ 0.17 here; 0.7 is ~4 s.d.
    assert rho > 0.7, rho


def test_films_and_events_exist_after_prediction_time(cohort):
    labels = _read(cohort, "labels")
    images = _read(cohort, "images").join(labels, on="subject_id")
    assert (images["time"] > images["prediction_time"]).sum() > 0
    assert (images["time"] <= images["prediction_time"]).sum() > 0
    events = _read(cohort, "events").join(labels, on="subject_id")
    after = events.filter(pl.col("time") > pl.col("prediction_time"))
    assert after["subject_id"].n_unique() == CFG.n_subjects


def test_post_prediction_vitals_reveal_the_outcome(cohort):
    """After prediction_time, deteriorating subjects' heart rate rises by ~30 bpm."""
    labels = _read(cohort, "labels")
    hr = (
        _read(cohort, "events")
        .join(labels, on="subject_id")
        .filter((pl.col("code") == "VITAL//HR") & (pl.col("time") > pl.col("prediction_time")))
        .group_by("subject_id", "boolean_value")
        .agg(pl.col("numeric_value").tail(5).mean())
    )
    by_outcome = hr.group_by("boolean_value").agg(pl.col("numeric_value").mean())
    means = dict(by_outcome.iter_rows())
    assert means[True] - means[False] > 15.0, means


def test_sicker_subjects_are_charted_more_often(cohort):
    labels = _read(cohort, "labels")
    rounds = (
        _read(cohort, "events")
        .join(labels, on="subject_id")
        .filter(pl.col("code").str.starts_with("VITAL//"))
        .filter(pl.col("time") <= pl.col("prediction_time"))
        .group_by("subject_id")
        .agg(pl.col("time").n_unique().alias("rounds"), pl.col("time").min().alias("first"))
    )
    oracle = _read(cohort, "oracle").select("subject_id", "physio_severity")
    stays = rounds.join(labels, on="subject_id").join(oracle, on="subject_id")
    hours = (stays["prediction_time"] - stays["first"]).dt.total_minutes() / 60 + 1
    rho = spearmanr(stays["rounds"] / hours, stays["physio_severity"]).statistic
    assert rho > 0.5, rho


def test_labels_agree_with_true_risk(cohort):
    labels = _read(cohort, "labels").join(_read(cohort, "oracle"), on="subject_id")
    p = labels["true_risk"].to_numpy()
    y = labels["boolean_value"].to_numpy()
    tol = 4 * math.sqrt((p * (1 - p)).sum()) / p.size  # 4 s.d. of a Poisson-binomial mean
    assert abs(y.mean() - p.mean()) < tol
    assert (y == labels["outcome"].to_numpy()).all()


def test_oracle_file_matches_sample_oracle(cohort):
    assert _read(cohort, "oracle").equals(sample_oracle(CFG))


def test_genotype_calls_missing_at_the_requested_rate(cohort):
    geno = _read(cohort, "genotypes").drop("subject_id")
    calls = geno.height * geno.width
    missing = sum(geno.null_count().row(0)) / calls
    sd = math.sqrt(CFG.missing_call_rate * (1 - CFG.missing_call_rate) / calls)
    assert abs(missing - CFG.missing_call_rate) < 4 * sd
    values = set(np.unique(geno.to_numpy().astype(float)[~np.isnan(geno.to_numpy().astype(float))]))
    assert values <= {0.0, 1.0, 2.0}


def test_ancestry_groups_diverge_with_the_requested_fst():
    """Balding-Nichols: Var_k(p_k) = Fst p (1 - p); average the ratio over markers."""
    cfg = SimConfig(n_ancestries=8, n_groups=40, fst=0.08)
    panel = build_world_for(cfg).panel
    p = panel.ancestral_freq
    fst_hat = np.mean(panel.freq.var(axis=0, ddof=1) / (p * (1 - p)))
    assert 0.06 < fst_hat < 0.10, fst_hat


def test_oracle_groups_name_one_modifier_and_main_effects(cohort):
    groups = pl.read_parquet(cohort / ORACLE_GROUPS_FILE)
    assert set(groups["group"]) == set(_read(cohort, "markers")["group"])
    causal = groups.filter("causal")
    assert causal.height == CFG.n_causal_groups
    assert (causal["role"] == "modifier").sum() == 1
    assert (groups.filter(~pl.col("causal"))["effect"] == 0).all()


def test_site_prevalence_differs_and_flips_when_reversed():
    def site_risk(effect: str) -> dict[str, float]:
        o = sample_oracle(SimConfig(n_subjects=4000, seed=5, site_effect=effect))
        return dict(o.group_by("site").agg(pl.col("true_risk").mean()).iter_rows())

    normal, reversed_, none = site_risk("normal"), site_risk("reversed"), site_risk("none")
    hi, lo = max(normal, key=normal.get), min(normal, key=normal.get)
    assert normal[hi] - normal[lo] > 0.1
    assert reversed_[hi] < reversed_[lo]
    spread = max(none.values()) - min(none.values())
    assert spread < normal[hi] - normal[lo]


def test_new_site_appears_only_when_asked_and_only_in_held_out(tmp_path):
    world = build_world_for(CFG)
    newcomer = world.sites[-1].name
    plain = sample_oracle(dataclasses.replace(CFG, n_subjects=400))
    assert newcomer not in set(plain["site"])
    cfg = dataclasses.replace(CFG, n_subjects=30, new_site=True, image_size=32)
    out = simulate_cohort(tmp_path / "new", cfg)
    subjects = _read(out, "subjects").join(_read(out, "subject_splits"), on="subject_id")
    fresh = subjects.filter(pl.col("site") == newcomer)
    assert fresh.height > 0 and set(fresh["split"]) == {"held_out"}
    scanners = dict(_read(out, "images").select("site", "manufacturer").unique().iter_rows())
    for site in world.sites:
        assert scanners.get(site.name, site.manufacturer) == site.manufacturer


def test_fusion_ceiling_beats_every_single_modality():
    ceilings = modality_ceilings(sample_oracle(SimConfig(n_subjects=6000, seed=2)))
    assert 0.85 <= ceilings["oracle"] <= 0.93, ceilings
    for single in ("image", "timeseries", "genomics", "site"):
        assert ceilings[single] < ceilings["oracle"] - 0.1, (single, ceilings)
    assert ceilings["fused_interaction"] > ceilings["fused_additive"], ceilings


def test_cli_writes_a_cohort_with_the_given_options(tmp_path):
    out = tmp_path / "cli"
    argv = ["simulate", "--out", str(out), "--subjects", "8", "--image-size", "32"]
    argv += ["--site-effect", "reversed", "--seed", "4", "--no-progress"]
    assert cli_main(argv) == 0
    assert _read(out, "labels").height == 8
    assert "site_effect: reversed" in (out / "simulation.yaml").read_text()


def test_bad_config_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="site_effect"):
        SimConfig(site_effect="upside-down")
    with pytest.raises(ValueError, match="n_sites"):
        build_world_for(SimConfig(n_sites=0))


def _film_and_genotype_flags(root) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per subject (oracle order): has any film, has a genotypes row, true risk."""
    oracle = pl.read_parquet(root / "oracle.parquet")
    ids = oracle["subject_id"]
    filmed = ids.is_in(_read(root, "images")["subject_id"].implode()).to_numpy()
    typed = ids.is_in(_read(root, "genotypes")["subject_id"].implode()).to_numpy()
    return filmed, typed, oracle["true_risk"].to_numpy()


def test_modality_missingness_shares_and_informative_films(tmp_path):
    n = 400
    common = {"n_subjects": n, "image_size": 32, "seed": 2, "progress": False}
    random_root = simulate_cohort(
        tmp_path / "random", SimConfig(image_missing=0.5, genotype_missing=0.9, **common)
    )
    filmed, typed, _ = _film_and_genotype_flags(random_root)
    # binomial s.d. of a share at n = 400 is at most 0.025: 4 s.d. of room
    assert abs((~filmed).mean() - 0.5) < 0.1
    assert abs((~typed).mean() - 0.9) < 0.1
    informative = simulate_cohort(
        tmp_path / "informative",
        SimConfig(image_missing=0.5, image_missing_mode="informative", **common),
    )
    filmed, typed, risk = _film_and_genotype_flags(informative)
    assert abs((~filmed).mean() - 0.5) < 0.1 and typed.all()
    # films are ordered for sicker patients
    assert risk[filmed].mean() > risk[~filmed].mean() + 0.1


def test_no_film_probability_has_the_requested_mean_and_falls_with_risk():
    from clinfuse.simulation.simulator import no_film_probability

    logit = np.random.default_rng(0).normal(-1.0, 2.0, 5000)
    p = no_film_probability(logit, 0.75, "informative")
    assert p.mean() == pytest.approx(0.75, abs=1e-6)
    order = np.argsort(logit)
    assert np.all(np.diff(p[order]) <= 0)  # monotone: sicker, more often filmed
    np.testing.assert_allclose(no_film_probability(logit, 0.25, "random"), 0.25)


def test_unknown_missing_mode_is_named():
    with pytest.raises(ValueError, match="image_missing_mode='sometimes'"):
        SimConfig(image_missing_mode="sometimes")


def test_ancestry_effect_links_ancestry_to_outcome_and_flips_when_reversed():
    by = {}
    for effect in ("normal", "reversed", "none"):
        o = sample_oracle(SimConfig(n_subjects=6000, seed=5, ancestry_effect=effect))
        rate = o.group_by("ancestry").agg(pl.col("outcome").mean()).sort("ancestry")
        by[effect] = (o, dict(zip(rate["ancestry"], rate["outcome"], strict=True)))
    first, last = sorted(by["none"][1])[0], sorted(by["none"][1])[-1]
    normal, reversed_, none = (by[e][1] for e in ("normal", "reversed", "none"))
    # 0.8 logits either way: far beyond the sampling error of ~2,000 subjects per group
    assert normal[last] - normal[first] > none[last] - none[first] + 0.1
    assert reversed_[last] - reversed_[first] < none[last] - none[first] - 0.1
    # the genetic signal itself does not move: same dosages, same scores, same carriers
    for effect in ("normal", "reversed"):
        o = by[effect][0]
        for col in ("genetic_score", "modifier_carrier", "physio_severity"):
            assert o[col].equals(by["none"][0][col]), (effect, col)
    np.testing.assert_array_equal(by["none"][0]["ancestry_term"].to_numpy(), 0.0)


def test_sample_presence_matches_what_the_cohort_writes(tmp_path):
    # Informative film missingness and untyped subjects: the flags computed without
    # writing are the films and genotype rows the written cohort holds.
    cfg = dataclasses.replace(
        CFG, image_missing=0.5, image_missing_mode="informative", genotype_missing=0.5
    )
    cohort = simulate_cohort(tmp_path / "m", cfg)
    presence = sample_presence(cfg)
    films = _read(cohort, "images").join(_read(cohort, "labels"), on="subject_id")
    filmed = set(films.filter(pl.col("time") <= pl.col("prediction_time"))["subject_id"])
    typed = set(_read(cohort, "genotypes")["subject_id"])
    assert presence["subject_id"].to_list() == _read(cohort, "oracle")["subject_id"].to_list()
    assert set(presence.filter("filmed")["subject_id"]) == filmed
    assert set(presence.filter("genotyped")["subject_id"]) == typed
    assert presence.select("subject_id", "split").equals(_read(cohort, "subject_splits"))
    assert 0 < len(filmed) < cfg.n_subjects and 0 < len(typed) < cfg.n_subjects
