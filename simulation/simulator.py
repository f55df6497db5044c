"""The embedded default data source: a synthetic ICU cohort with known true risk.

Public API:
    SimConfig: every knob of the simulator (dataclass; YAML/CLI friendly).
    simulate_cohort(out_dir, cfg) -> Path: writes a cohort in the contract of
        ``clinfuse.datasets.schema`` plus ``oracle.parquet``,
        ``oracle_groups.parquet`` and ``simulation.yaml`` (the resolved config).
    sample_oracle(cfg) -> pl.DataFrame: the per-subject ground truth alone
        (latent factors, true risk, outcome) without charting events or films;
        cheap enough for thousands of subjects.
    sample_presence(cfg) -> pl.DataFrame: each subject's split and which modalities
        its data will have (a film by prediction time, a genotypes row), also without
        writing anything.
    build_world_for(cfg) -> World: the population parameters of ``cfg.world_seed``.
    main(args) -> int: the ``clinfuse simulate`` command.

Generative model, per subject (site s, ancestry a):
    lung_disease L ~ N(0, 1)        -> extent of opacities on chest films
    physio_severity P ~ N(0, 1)     -> trends and charting density of vitals/labs
    genotypes ~ Balding-Nichols frequencies of ancestry a
    genetic_score G = sum of main causal group scores * effects
    carrier C = modifier-group score > 0.5 (about a third of subjects)
    logit = b0 + k * offset_s + j * offset_a + 1.5 L + 1.1 P (1 + 1.5 C) + 1.2 G
    outcome ~ Bernoulli(sigmoid(logit)), deterioration within ``horizon_hours``
with ``k`` = 1, -1 or 0 for ``site_effect`` normal, reversed or none, and ``j`` the
same for ``ancestry_effect`` (default none): a non-genetic link between ancestry and
outcome (care pathways, environment) that a model can read off the genotypes, a
shortcut a test cohort can reverse while the genetic signal stays as it is. The
carrier interaction means the lactate/creatinine trend matters 2.5 times more
in carriers, which no single modality can see. Sites differ in scanner, ancestry
mix and baseline risk, so site and ancestry are spuriously predictive.

Rule of time: events and films exist after ``prediction_time`` (the stay runs
until ``prediction_time + horizon_hours``), and after deterioration they turn
strongly abnormal, so any leak of future rows would inflate performance.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import polars as pl

from clinfuse.config import save_yaml
from clinfuse.datasets import schema
from clinfuse.errors import config_errors
from clinfuse.progress import progress
from clinfuse.simulation.events import HOUR_US, Stays, simulate_events
from clinfuse.simulation.genetics import (
    MAIN,
    MODIFIER,
    draw_dosages,
    genotypes_frame,
    group_scores,
    groups_frame,
    markers_frame,
    mask_calls,
)
from clinfuse.simulation.images import (
    AnatomyBank,
    DicomWriter,
    FilmMeta,
    pseudonym,
    render_films,
)
from clinfuse.simulation.world import World, build_world

SITE_EFFECTS = {"normal": 1.0, "reversed": -1.0, "none": 0.0}
MISSING_MODES = ("random", "informative")
ANCESTRY_SPAN = 0.8  # logit offset of the first and last ancestry group under ancestry_effect
# Informative film missingness: P(no film) = sigmoid(a - SLOPE * z), z the standardized
# true logit, a solved so the mean is the requested share.
MISSING_SLOPE = 1.5
ORACLE_GROUPS_FILE = "oracle_groups.parquet"
CONFIG_FILE = "simulation.yaml"

# Risk model (logit scale); tuned so the oracle AUROC is ~0.88 and each modality
# alone stays clearly below (see ``clinfuse.simulation.oracle``).
INTERCEPT = -2.3
LUNG_EFFECT = 1.5
PHYSIO_EFFECT = 1.1
GENETIC_EFFECT = 1.2
CARRIER_Z = 0.5
EPOCH_START_US = 5_680_281_600_000_000  # 2150-01-01: shifted, obviously synthetic dates

# Independent random streams per component, so one part can change without
# reshuffling the others.
_STREAMS = {"people": 1, "latent": 2, "genotype": 3, "times": 4, "outcome": 5}
_STREAMS |= {"events": 6, "films": 7, "split": 8, "calls": 9, "genotyped": 10}


@dataclass
class SimConfig:
    """Simulator settings.

    Attributes:
        n_subjects: number of subjects (one ICU stay and one label each).
        n_sites: number of regular hospital sites (1-9).
        seed: draws the subjects.
        world_seed: draws the population (sites, scanners, allele frequencies,
            causal groups); keep it fixed to simulate a test cohort of the same world.
        image_size: side of the square films in pixels.
        site_effect: ``normal``, ``reversed`` or ``none`` link between site and risk.
        ancestry_effect: ``normal``, ``reversed`` or ``none`` (default) link between
            ancestry and risk, outside the genotypes' causal effects: ancestry group
            ``a`` of ``A`` adds ``ANCESTRY_SPAN * (2 a / (A - 1) - 1)`` to the logit.
        new_site: add the world's held-back site; its subjects are all held_out.
        n_ancestries: number of ancestry groups.
        fst: Balding-Nichols fixation index between ancestry groups.
        n_groups: number of marker groups (genes).
        markers_per_group: markers per group.
        n_causal_groups: causal groups (one modifier, the rest main effects).
        missing_call_rate: fraction of genotype calls set to null.
        image_missing: share of subjects with no film at all.
        image_missing_mode: ``random`` (every subject equally likely to have no film)
            or ``informative`` (films are ordered for sicker patients: the chance of
            having none falls with the true risk logit, its mean still
            ``image_missing``).
        genotype_missing: share of subjects never genotyped (no genotypes row), drawn
            at random.
        horizon_hours: outcome horizon after prediction_time; charting runs until its end.
        progress: show a progress bar while writing films.
    """

    n_subjects: int = 500
    n_sites: int = 3
    seed: int = 0
    world_seed: int = 0
    image_size: int = 128
    site_effect: str = "normal"
    ancestry_effect: str = "none"
    new_site: bool = False
    n_ancestries: int = 3
    fst: float = 0.08
    n_groups: int = 20
    markers_per_group: int = 10
    n_causal_groups: int = 4
    missing_call_rate: float = 0.02
    image_missing: float = 0.15
    image_missing_mode: str = "random"
    genotype_missing: float = 0.0
    horizon_hours: float = 48.0
    progress: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (
            ("site_effect", sorted(SITE_EFFECTS)),
            ("ancestry_effect", sorted(SITE_EFFECTS)),
            ("image_missing_mode", list(MISSING_MODES)),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: expected one of {allowed}")
        _check_range("n_subjects", self.n_subjects, 1, None)
        _check_range("image_size", self.image_size, 32, 2048)
        _check_range("n_ancestries", self.n_ancestries, 1, 26)
        _check_range("fst", self.fst, 1e-4, 0.5)
        _check_range("missing_call_rate", self.missing_call_rate, 0.0, 0.5)
        _check_range("image_missing", self.image_missing, 0.0, 0.99)
        _check_range("genotype_missing", self.genotype_missing, 0.0, 0.99)
        _check_range("horizon_hours", self.horizon_hours, 1.0, 24.0 * 30)
        _check_range("markers_per_group", self.markers_per_group, 1, None)


def _check_range(name: str, value: float, lo: float | None, hi: float | None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"SimConfig.{name}={value} must lie in [{lo}, {hi if hi else 'inf'}]")


def build_world_for(cfg: SimConfig) -> World:
    """The population parameters shared by every cohort with ``cfg.world_seed``."""
    return build_world(
        cfg.world_seed,
        cfg.n_sites,
        cfg.n_ancestries,
        cfg.n_groups,
        cfg.markers_per_group,
        cfg.n_causal_groups,
        cfg.fst,
    )


@dataclass
class _Cohort:
    """Per-subject arrays (N,) plus the genotypes (N, M) of one simulated cohort."""

    subject_id: np.ndarray
    site: np.ndarray
    ancestry: np.ndarray
    sex: np.ndarray
    age: np.ndarray
    lung: np.ndarray
    physio: np.ndarray
    genetic: np.ndarray
    modifier: np.ndarray
    carrier: np.ndarray
    site_term: np.ndarray
    ancestry_term: np.ndarray
    logit: np.ndarray
    risk: np.ndarray
    outcome: np.ndarray
    admission: np.ndarray
    prediction: np.ndarray
    deterioration: np.ndarray
    dosage: np.ndarray


def _rng(cfg: SimConfig, stream: str) -> np.random.Generator:
    return np.random.default_rng([1, cfg.seed, _STREAMS[stream]])


def _draw_cohort(cfg: SimConfig, world: World) -> _Cohort:
    """Demographics, latent factors, genotypes, risk, outcome and stay timing."""
    sites = world.active_sites(cfg.new_site)
    site, ancestry, sex, age = _draw_people(_rng(cfg, "people"), cfg.n_subjects, sites)
    lung, physio = _rng(cfg, "latent").standard_normal((2, cfg.n_subjects))
    dosage = draw_dosages(_rng(cfg, "genotype"), world.panel, ancestry)
    genetic, modifier = _genetic_terms(world, dosage)
    carrier = modifier > CARRIER_Z
    offsets = np.array([s.logit_offset for s in sites])
    site_term = SITE_EFFECTS[cfg.site_effect] * offsets[site]
    span = ancestry_offsets(len(world.ancestries))
    ancestry_term = SITE_EFFECTS[cfg.ancestry_effect] * span[ancestry]
    boost = float(world.panel.effect[np.array(world.panel.role) == MODIFIER][0])
    logit = _logit(site_term + ancestry_term, lung, physio, genetic, carrier * boost)
    risk = 1.0 / (1.0 + np.exp(-logit))
    outcome = _rng(cfg, "outcome").random(cfg.n_subjects) < risk
    admission, prediction, deterioration = _draw_times(_rng(cfg, "times"), outcome, cfg)
    return _Cohort(
        np.arange(1, cfg.n_subjects + 1, dtype=np.int64),
        site, ancestry, sex, age, lung, physio, genetic, modifier, carrier,
        site_term, ancestry_term, logit, risk, outcome, admission, prediction, deterioration,
        dosage,
    )  # fmt: skip


def ancestry_offsets(n_ancestries: int) -> np.ndarray:
    """Logit offset of each ancestry group under ``ancestry_effect: normal`` (A,)."""
    if n_ancestries == 1:
        return np.zeros(1)
    return ANCESTRY_SPAN * np.linspace(-1.0, 1.0, n_ancestries)


def _draw_people(
    rng: np.random.Generator, n: int, sites: list
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Site (by site weight), ancestry (by the site's mix), sex and age."""
    weight = np.array([s.weight for s in sites])
    site = rng.choice(len(sites), size=n, p=weight / weight.sum())
    mix = np.stack([s.ancestry_mix for s in sites])[site]  # (N, A)
    ancestry = (rng.random((n, 1)) > np.cumsum(mix, axis=1)).sum(axis=1)
    ancestry = np.minimum(ancestry, mix.shape[1] - 1)
    sex = np.where(rng.random(n) < 0.5, "F", "M")
    age = np.clip(rng.normal(64.0, 15.0, n), 18.0, 95.0).round(0)
    return site, ancestry, sex, age


def _genetic_terms(world: World, dosage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Main-effect genetic score (logit units before scaling) and modifier-group score."""
    scores = group_scores(world.panel, dosage)  # (N, G)
    role = np.array(world.panel.role)
    genetic = scores[:, role == MAIN] @ world.panel.effect[role == MAIN]
    modifier = scores[:, role == MODIFIER][:, 0]
    return genetic, modifier


def _logit(
    confound_term: np.ndarray,
    lung: np.ndarray,
    physio: np.ndarray,
    genetic: np.ndarray,
    carrier_boost: np.ndarray,
) -> np.ndarray:
    """Risk logit; ``confound_term`` the site and ancestry offsets, ``carrier_boost`` the
    modifier effect for carriers (0 otherwise)."""
    physio_term = PHYSIO_EFFECT * physio * (1.0 + carrier_boost)
    return INTERCEPT + confound_term + LUNG_EFFECT * lung + physio_term + GENETIC_EFFECT * genetic


def _draw_times(
    rng: np.random.Generator, outcome: np.ndarray, cfg: SimConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Admission, prediction time (24-72 h later) and deterioration time (-1 if none), in us."""
    n = outcome.size
    minute = 60_000_000
    day_minutes = rng.integers(0, 3 * 365 * 24 * 60, size=n)
    admission = EPOCH_START_US + day_minutes * minute
    prediction = admission + rng.integers(24 * 60, 72 * 60 + 1, size=n) * minute
    delay = rng.uniform(1.0, cfg.horizon_hours, size=n)
    deterioration = np.where(outcome, prediction + (delay * 60).astype(np.int64) * minute, -1)
    return admission, prediction, deterioration


def sample_oracle(cfg: SimConfig) -> pl.DataFrame:
    """The ground truth of the cohort ``simulate_cohort(out, cfg)`` would write (same rows)."""
    world = build_world_for(cfg)
    return _oracle_frame(_draw_cohort(cfg, world), world, cfg)


def sample_presence(cfg: SimConfig) -> pl.DataFrame:
    """Split and modality presence of the cohort ``simulate_cohort(out, cfg)`` would write.

    Returns:
        ``subject_id``, ``split``, ``filmed`` (a film at or before prediction time),
        ``genotyped`` (a genotypes row), one row per subject in oracle order.
    """
    world = build_world_for(cfg)
    c = _draw_cohort(cfg, world)
    films = _plan_films(_rng(cfg, "films"), c, cfg)
    in_time = films.time_us <= c.prediction[films.subject]
    filmed = np.zeros(c.subject_id.size, dtype=bool)
    filmed[films.subject[in_time]] = True
    split = _splits_frame(c, cfg, len(world.sites) - 1)
    return split.with_columns(
        pl.Series("filmed", filmed), pl.Series("genotyped", _genotyped(cfg, c.subject_id.size))
    )


def _oracle_frame(c: _Cohort, world: World, cfg: SimConfig) -> pl.DataFrame:
    names = [s.name for s in world.active_sites(cfg.new_site)]
    det = pl.Series("deterioration_time", c.deterioration, dtype=pl.Int64)
    return pl.DataFrame(
        {
            "subject_id": pl.Series(c.subject_id, dtype=pl.Int64),
            "site": [names[i] for i in c.site],
            "ancestry": [world.ancestries[i] for i in c.ancestry],
            "lung_disease": c.lung,
            "physio_severity": c.physio,
            "genetic_score": c.genetic,
            "modifier_score": c.modifier,
            "modifier_carrier": c.carrier,
            "site_term": c.site_term,
            "ancestry_term": c.ancestry_term,
            "true_logit": c.logit,
            "true_risk": c.risk,
            "outcome": c.outcome,
            "deterioration_time": det.set(det < 0, None).cast(schema.TIME),
        }
    )


def simulate_cohort(out_dir: str | Path, cfg: SimConfig) -> Path:
    """Writes a full cohort (Parquet tables, DICOM films, oracle) into ``out_dir``.

    Returns:
        The cohort directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = build_world_for(cfg)
    c = _draw_cohort(cfg, world)
    sites = world.active_sites(cfg.new_site)
    _write(out, "subjects", _subjects_frame(c, world, sites))
    _write(out, "labels", _labels_frame(c))
    _write(out, "subject_splits", _splits_frame(c, cfg, len(world.sites) - 1))
    _write(out, "markers", markers_frame(world.panel))
    calls = mask_calls(_rng(cfg, "calls"), c.dosage, cfg.missing_call_rate)
    typed = _genotyped(cfg, c.subject_id.size)  # (N,) bool
    _write(out, "genotypes", genotypes_frame(world.panel, c.subject_id[typed], calls[typed]))
    _write(out, "events", simulate_events(_rng(cfg, "events"), _stays(c, cfg)))
    _write(out, "images", _write_films(out, c, sites, cfg))
    _oracle_frame(c, world, cfg).write_parquet(out / schema.ORACLE_FILE)
    groups_frame(world.panel).write_parquet(out / ORACLE_GROUPS_FILE)
    save_yaml(cfg, out / CONFIG_FILE)
    return out


def _genotyped(cfg: SimConfig, n: int) -> np.ndarray:
    """Which subjects have a genotype row (a share ``genotype_missing`` never genotyped)."""
    if cfg.genotype_missing <= 0:
        return np.ones(n, dtype=bool)
    return _rng(cfg, "genotyped").random(n) >= cfg.genotype_missing


def no_film_probability(logit: np.ndarray, share: float, mode: str) -> np.ndarray:
    """Each subject's chance of having no film; its mean is ``share``.

    ``informative``: ``sigmoid(a - MISSING_SLOPE * z)`` with ``z`` the standardized
    true logit, so sicker subjects are more often filmed; ``a`` is found by bisection.

    Shapes:
        logit: (N,) -> (N,)
    """
    if mode == "random" or share <= 0:
        return np.full(logit.shape, share)
    z = (logit - logit.mean()) / max(float(logit.std()), 1e-12)
    lo, hi = -30.0, 30.0
    for _ in range(100):
        a = 0.5 * (lo + hi)
        mean = float(np.mean(1.0 / (1.0 + np.exp(-(a - MISSING_SLOPE * z)))))
        lo, hi = (a, hi) if mean < share else (lo, a)
    return 1.0 / (1.0 + np.exp(-(0.5 * (lo + hi) - MISSING_SLOPE * z)))


def _write(out: Path, name: str, frame: pl.DataFrame) -> None:
    frame.write_parquet(out / f"{name}.parquet")


def _subjects_frame(c: _Cohort, world: World, sites: list) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "subject_id": pl.Series(c.subject_id, dtype=pl.Int64),
            "site": [sites[i].name for i in c.site],
            "ancestry": [world.ancestries[i] for i in c.ancestry],
            "sex": c.sex.tolist(),
            "age": pl.Series(c.age, dtype=pl.Float32),
            "scanner": [f"{sites[i].manufacturer} {sites[i].model}" for i in c.site],
        }
    )


def _labels_frame(c: _Cohort) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "subject_id": pl.Series(c.subject_id, dtype=pl.Int64),
            "prediction_time": pl.Series(c.prediction, dtype=pl.Int64).cast(schema.TIME),
            "boolean_value": pl.Series(c.outcome, dtype=pl.Boolean),
        }
    )


def _splits_frame(c: _Cohort, cfg: SimConfig, new_site_index: int) -> pl.DataFrame:
    """~70/15/15 train/tuning/held_out by subject; the new site's subjects are all held_out."""
    n = c.subject_id.size
    rank = np.empty(n, dtype=np.int64)
    rank[_rng(cfg, "split").permutation(n)] = np.arange(n)
    split = np.select([rank < 0.70 * n, rank < 0.85 * n], ["train", "tuning"], "held_out")
    if cfg.new_site:
        split = np.where(c.site == new_site_index, "held_out", split)
    return pl.DataFrame(
        {"subject_id": pl.Series(c.subject_id, dtype=pl.Int64), "split": split.tolist()}
    )


def _stays(c: _Cohort, cfg: SimConfig) -> Stays:
    end = c.prediction + int(cfg.horizon_hours * HOUR_US)
    return Stays(c.subject_id, c.admission, c.prediction, end, c.deterioration, c.physio)


@dataclass(frozen=True)
class _Films:
    """Planned films: one entry per film (F,)."""

    subject: np.ndarray  # index into the cohort arrays
    number: np.ndarray  # film index within the subject
    time_us: np.ndarray
    extent: np.ndarray


def _plan_films(rng: np.random.Generator, c: _Cohort, cfg: SimConfig) -> _Films:
    """A share ``image_missing`` of subjects has no film (``no_film_probability``); the
    others one before prediction_time plus Poisson(0.6) more anywhere in the stay (some
    after prediction_time, which must never count)."""
    n = c.subject_id.size
    none = no_film_probability(c.logit, cfg.image_missing, cfg.image_missing_mode)
    count = np.where(rng.random(n) < none, 0, 1 + rng.poisson(0.6, n))
    subject = np.repeat(np.arange(n), count)
    number = np.arange(subject.size) - np.repeat(np.cumsum(count) - count, count)
    start, pred = c.admission[subject], c.prediction[subject]
    end = pred + int(cfg.horizon_hours * HOUR_US)
    first = start + (rng.random(subject.size) * (pred - start)).astype(np.int64)
    later = start + (rng.random(subject.size) * (end - start)).astype(np.int64)
    when = np.where(number == 0, first, later) // 60_000_000 * 60_000_000
    det = c.deterioration[subject]
    worse = (det >= 0) & (when > det)
    z = LUNG_EFFECT * c.lung[subject] - 1.0 + 0.25 * rng.standard_normal(subject.size)
    extent = 0.85 / (1.0 + np.exp(-(z + 2.0 * worse)))
    return _Films(subject, number, when, extent)


def _write_films(out: Path, c: _Cohort, sites: list, cfg: SimConfig) -> pl.DataFrame:
    """Renders and writes every planned film (grouped by site), returns ``images.parquet``."""
    rng = _rng(cfg, "films")
    films = _plan_films(rng, c, cfg)
    site_of = c.site[films.subject]
    paths = [
        f"images/{c.subject_id[s]}/{k:02d}.dcm"
        for s, k in zip(films.subject, films.number, strict=True)
    ]
    bank = AnatomyBank.draw(rng, cfg.image_size)
    bar = progress(total=len(paths), unit="film", desc="films", enabled=cfg.progress,
                   min_interval=10.0)  # fmt: skip
    with bar:
        for k, profile in enumerate(sites):
            writer = DicomWriter(profile, cfg.image_size)
            for chunk in _chunks(np.nonzero(site_of == k)[0], 64):
                pixels = render_films(rng, films.extent[chunk], bank, profile)
                for j, f in enumerate(chunk):
                    writer.write(out / paths[f], pixels[j], _film_meta(c, films, f, cfg))
                bar.update(chunk.size)
    return _images_frame(c, films, paths, [sites[i] for i in site_of])


def _chunks(index: np.ndarray, size: int) -> list[np.ndarray]:
    return [index[i : i + size] for i in range(0, index.size, size)]


def _film_meta(c: _Cohort, films: _Films, f: int, cfg: SimConfig) -> FilmMeta:
    sid = int(c.subject_id[films.subject[f]])
    number = int(films.number[f])
    return FilmMeta(
        subject_id=sid,
        pseudonym=pseudonym(cfg.world_seed, cfg.seed, sid),
        time_us=int(films.time_us[f]),
        number=number,
        uid_seed=("clinfuse", str(cfg.world_seed), str(cfg.seed), str(sid), str(number)),
    )


def _images_frame(c: _Cohort, films: _Films, paths: list[str], profiles: list) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "subject_id": pl.Series(c.subject_id[films.subject], dtype=pl.Int64),
            "time": pl.Series(films.time_us, dtype=pl.Int64).cast(schema.TIME),
            "path": paths,
            "modality": [p.modality for p in profiles],
            "manufacturer": [p.manufacturer for p in profiles],
            "model": [p.model for p in profiles],
            "site": [p.name for p in profiles],
            "view": ["PA"] * len(paths),
        },
        schema_overrides={
            k: pl.String for k in ("path", "modality", "manufacturer", "model", "site", "view")
        },
    ).sort("subject_id", "time", maintain_order=True)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """A SimConfig from parsed ``clinfuse simulate`` options (absent options keep defaults)."""
    names = {f.name for f in fields(SimConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return SimConfig(**given)


def main(args: argparse.Namespace) -> int:
    """``clinfuse simulate``: writes the cohort and prints a short summary."""
    with config_errors(None, "see clinfuse simulate --help"):  # SimConfig checks the options
        cfg = config_from_args(args)
    from clinfuse.api import simulate_config

    start = time.perf_counter()
    out = simulate_config(args.out, cfg).path
    seconds = time.perf_counter() - start
    oracle = pl.read_parquet(out / schema.ORACLE_FILE)
    print(
        f"wrote {out}: {cfg.n_subjects} subjects, {len(oracle['site'].unique())} sites, "
        f"outcome rate {oracle['outcome'].mean():.3f}, mean true risk "
        f"{oracle['true_risk'].mean():.3f} in {seconds:.1f} s"
    )
    if getattr(args, "report", False):
        from clinfuse.simulation.oracle import format_ceilings, modality_ceilings

        print(format_ceilings(modality_ceilings(oracle)))
    return 0
