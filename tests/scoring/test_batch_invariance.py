"""A subject's risk does not depend on who else is scored with it.

Scoring is per sample: the encoders see each sample's own rows (padding is masked), so
the risk may only move by float rounding (observed under 1e-7) when the chunk size or
the forward batch size changes, or when a neighbour in the same chunk and batch has
NaN/inf events, an unreadable film or a broken genotype row. 1e-6 is the bound.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clinfuse.scoring.inputs import scoring_samples
from clinfuse.scoring.plan import chunk_bounds
from clinfuse.scoring.scorer import ChunkScorer

ATOL = 1e-6


def _by_chunks(scorer: ChunkScorer, samples: pl.DataFrame, chunk_size: int) -> pl.DataFrame:
    bounds = chunk_bounds(samples["subject_id"].to_numpy(), chunk_size)
    parts = [samples.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return pl.concat([scorer.score(part) for part in parts])


def _risk(scores: pl.DataFrame) -> dict[int, float]:
    return dict(zip(scores["subject_id"].to_list(), scores["risk"].to_list(), strict=True))


@pytest.fixture(scope="module")
def reference(scoring_run, artifact) -> pl.DataFrame:
    """Every sample in one chunk and one forward batch."""
    samples = scoring_samples(scoring_run.cohort)
    return ChunkScorer(artifact, scoring_run.cohort, batch_size=samples.height).score(samples)


@pytest.mark.parametrize(("chunk_size", "batch_size"), [(1, 256), (7, 1), (50, 3), (120, 16)])
def test_risk_does_not_move_with_chunk_or_batch_size(
    scoring_run, artifact, reference, chunk_size, batch_size
) -> None:
    samples = scoring_samples(scoring_run.cohort)
    scorer = ChunkScorer(artifact, scoring_run.cohort, batch_size=batch_size)
    scores = _by_chunks(scorer, samples, chunk_size)
    assert scores["subject_id"].to_list() == reference["subject_id"].to_list()
    assert scores["error"].null_count() == scores.height
    np.testing.assert_allclose(scores["risk"].to_numpy(), reference["risk"].to_numpy(),
                               rtol=0, atol=ATOL)  # fmt: skip


def _break_neighbours(cohort: Path, nan_inf: int, film: int, genotype: int, dosage) -> None:
    """NaN and inf heart rates for one subject, random bytes for another's films, and a
    third's genotype row set to ``dosage`` (None: every call missing; 7: impossible)."""
    events = pl.read_parquet(cohort / "events.parquet")
    hr = (pl.col("subject_id") == nan_inf) & pl.col("code").str.starts_with("VITAL//HR")
    odd = pl.int_range(pl.len()).over("subject_id") % 2 == 1
    bad = pl.when(odd).then(float("inf")).otherwise(float("nan"))
    events = events.with_columns(
        numeric_value=pl.when(hr).then(bad).otherwise(pl.col("numeric_value"))
    )
    events.write_parquet(cohort / "events.parquet")
    images = pl.read_parquet(cohort / "images.parquet").filter(pl.col("subject_id") == film)
    rng = np.random.default_rng(0)
    for rel in images["path"]:
        (cohort / rel).write_bytes(b"DICM" + rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    genotypes = pl.read_parquet(cohort / "genotypes.parquet")
    markers = [c for c in genotypes.columns if c != "subject_id"]
    row = pl.col("subject_id") == genotype
    genotypes.with_columns(
        pl.when(row).then(pl.lit(dosage)).otherwise(pl.col(m)).cast(genotypes.schema[m]).alias(m)
        for m in markers
    ).write_parquet(cohort / "genotypes.parquet")


@pytest.mark.parametrize("dosage", [None, 7], ids=["genotype_all_missing", "genotype_impossible"])
def test_broken_neighbours_do_not_move_a_subjects_risk(
    scoring_run, artifact, reference, tmp_path, dosage
) -> None:
    cohort = Path(shutil.copytree(scoring_run.cohort, tmp_path / "cohort"))
    with_film = sorted(set(pl.read_parquet(cohort / "images.parquet")["subject_id"].to_list()))
    nan_inf, film, genotype = with_film[1], with_film[3], with_film[5]
    _break_neighbours(cohort, nan_inf, film, genotype, dosage)
    samples = scoring_samples(cohort)
    chunk = samples.filter(pl.col("subject_id") <= with_film[6])  # the broken ones and others
    scores = ChunkScorer(artifact, cohort, batch_size=chunk.height).score(chunk)

    rows = {r["subject_id"]: r for r in scores.iter_rows(named=True)}
    assert "nan_values" in rows[nan_inf]["flags"]  # the neighbours really are broken
    assert "image_unreadable" in rows[film]["flags"]
    if dosage is None:
        assert rows[genotype]["error"] is None and rows[genotype]["genomics_present"] is not None
    else:
        assert "subject_id" in rows[genotype]["error"] and rows[genotype]["risk"] is None
    ref = _risk(reference)
    others = [s for s in rows if s not in (nan_inf, film, genotype)]
    assert len(others) >= 3
    got = np.array([rows[s]["risk"] for s in others])
    np.testing.assert_allclose(got, [ref[s] for s in others], rtol=0, atol=ATOL)
