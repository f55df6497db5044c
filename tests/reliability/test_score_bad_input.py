"""Every bad-input case: ``validate`` names the file and row, ``score`` keeps every sample.

One trained artifact (session), one fresh cohort copy per case. For each case the
score output must have exactly one row per input sample, in order, and the broken
subject's row must carry a flag or an error; untouched subjects keep a finite risk.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinfuse.datasets.batch import MODALITIES
from clinfuse.datasets.validate import validate_cohort
from clinfuse.scoring.inputs import scoring_samples
from clinfuse.scoring.score import read_scores, score_cohort

from .conftest import CASES, N_SUBJECTS, read, write

# case -> (validate check, severity) of the planted problem.
VALIDATE_EXPECT = {
    "dicom_truncated": ("dicom", "error"),
    "dicom_corrupt": ("dicom", "error"),
    "dicom_no_pixels": ("dicom", "error"),
    "dicom_wrong_photometric": ("dicom", "error"),
    "image_missing": ("dicom", "error"),
    "nan_inf_values": ("non_finite", "error"),
    "time_before_1900": ("time_range", "error"),
    "events_after_prediction": ("no_events_before", "warning"),
    "duplicate_subject_ids": ("duplicate_subject_id", "error"),
    "empty_subject": ("no_events_before", "warning"),
}
# case -> the flag the broken subject's score row must carry (risk still computed).
SCORE_FLAG = {
    "dicom_truncated": "image_unreadable",
    "dicom_corrupt": "image_unreadable",
    "dicom_no_pixels": "image_unreadable",
    "image_missing": "image_unreadable",
    "nan_inf_values": "nan_values",
    "events_after_prediction": "no_events_in_window",
    "unknown_codes": "unknown_codes",
    "empty_subject": "no_modalities",
}


def _score(trained, cohort: Path, out: Path) -> pl.DataFrame:
    score_cohort(trained.model_dir, cohort, out, chunk_size=8, progress=False)
    return read_scores(out)


def _assert_one_row_per_sample(cohort: Path, scores: pl.DataFrame) -> None:
    samples = scoring_samples(cohort)
    assert scores.height == samples.height
    assert scores["subject_id"].to_list() == samples["subject_id"].to_list()
    assert scores["prediction_time"].to_list() == samples["prediction_time"].to_list()


@pytest.mark.parametrize("case", sorted(VALIDATE_EXPECT))
def test_validate_names_file_and_row(cohort_copy: Path, case: str) -> None:
    planted = CASES[case](cohort_copy)
    check, severity = VALIDATE_EXPECT[case]
    hits = [p for p in validate_cohort(cohort_copy) if p.check == check]
    named = {(p.file, p.row) for p in hits if p.severity == severity}
    assert {(planted.file, r) for r in planted.rows} <= named, [str(p) for p in hits]
    if "path" in planted.extra:
        (hit,) = [p for p in hits if p.row == planted.rows[0]]
        assert str(planted.extra["path"]) in hit.message


@pytest.mark.parametrize("case", sorted(set(CASES) - {"empty_cohort"}))  # refused: test below
def test_score_keeps_every_sample(trained, cohort_copy: Path, tmp_path: Path, case: str) -> None:
    planted = CASES[case](cohort_copy)
    scores = _score(trained, cohort_copy, tmp_path / "scores")
    _assert_one_row_per_sample(cohort_copy, scores)
    ok = scores.filter(pl.col("error").is_null())
    assert ok["risk"].is_finite().all() and ok["risk"].is_between(0, 1).all()
    if case in SCORE_FLAG:
        row = scores.filter(pl.col("subject_id") == planted.subject_id).row(0, named=True)
        assert SCORE_FLAG[case] in row["flags"] and row["error"] is None
        assert 0.0 < row["risk"] < 1.0


def test_inf_value_is_flagged_and_ignored(trained, cohort_copy: Path, tmp_path: Path) -> None:
    """An inf heart rate is flagged and dropped: the risk equals the one without that row."""
    planted = CASES["nan_inf_values"](cohort_copy)
    inf_subject, inf_row = planted.extra["inf_subject"], planted.rows[1]
    scores = _score(trained, cohort_copy, tmp_path / "with_inf")
    events = read(cohort_copy, "events")
    keep = pl.int_range(pl.len()) != inf_row
    write(cohort_copy, "events", events.filter(keep))
    without = _score(trained, cohort_copy, tmp_path / "without")
    risk = {s: r for s, r in zip(scores["subject_id"], scores["risk"], strict=True)}
    risk_without = dict(zip(without["subject_id"], without["risk"], strict=True))
    assert "nan_values" in scores.filter(pl.col("subject_id") == inf_subject)["flags"][0]
    assert risk[inf_subject] == pytest.approx(risk_without[inf_subject], abs=1e-6)


def test_unreadable_file_gives_error_rows_naming_it(trained, cohort_copy, tmp_path) -> None:
    """A truncated events.parquet: every sample gets an error row naming the file, and
    the rows are failed (the file, not the rows): --resume will score them again."""
    CASES["truncated_parquet"](cohort_copy)
    out = tmp_path / "scores"
    summary = score_cohort(trained.model_dir, cohort_copy, out, chunk_size=8, progress=False)
    assert summary["failed_rows"] == summary["error_rows"] == N_SUBJECTS
    with pytest.warns(UserWarning, match="were not scored for a reason other than their input"):
        scores = read_scores(out)
    _assert_one_row_per_sample(cohort_copy, scores)
    assert scores["risk"].null_count() == scores.height
    assert all("CohortUnreadable" in e for e in scores["error"])
    assert all("events.parquet: cannot be read (ComputeError" in e for e in scores["error"])


def test_wrong_dtype_errors_only_the_subject_with_the_bad_value(trained, cohort_copy, tmp_path):
    planted = CASES["wrong_dtype"](cohort_copy)
    scores = _score(trained, cohort_copy, tmp_path / "scores")
    errors = scores.filter(pl.col("error").is_not_null())
    assert errors["subject_id"].to_list() == [planted.subject_id]
    assert "events.parquet" in errors["error"][0] and "numeric_value" in errors["error"][0]
    report = validate_cohort(cohort_copy)
    (dtype,) = [p for p in report if p.check == "dtype"]
    assert (dtype.file, dtype.column) == ("events.parquet", "numeric_value")
    assert "expected Float32, found String" in dtype.message


def test_empty_cohort_is_an_error_naming_labels_for_score_train_and_evaluate(
    trained, cohort_copy, tmp_path, tiny_run_config, capsys
) -> None:
    """An empty labels.parquet: one clear error naming it, not an empty output with exit 0."""
    from clinfuse.cli import main
    from clinfuse.evaluation.evaluate import evaluate
    from clinfuse.training.run import train

    CASES["empty_cohort"](cohort_copy)
    labels = cohort_copy / "labels.parquet"
    out = tmp_path / "scores"
    assert main(["score", str(trained.model_dir), "--cohort", str(cohort_copy),
                 "--out", str(out), "--no-progress"]) == 2  # fmt: skip
    assert (
        f"clinfuse score: error: {labels}: no label rows (empty cohort)" in capsys.readouterr().err
    )
    assert not out.exists()
    with pytest.raises(ValueError, match=f"{labels}: no label rows"):
        train(tiny_run_config(cohort_copy, "validate=false"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"labels\.parquet +empty cohort: no label rows"):
        train(tiny_run_config(cohort_copy), tmp_path / "run2")  # validate names it first
    with pytest.raises(ValueError, match=f"{labels}: no label rows"):
        evaluate(trained.run_dir, cohort_copy, tmp_path / "eval")
    (empty,) = [p for p in validate_cohort(cohort_copy) if p.check == "empty"]
    assert (empty.severity, empty.file) == ("error", "labels.parquet")


def test_empty_subjects_is_an_error_for_score_at(trained, cohort_copy, tmp_path) -> None:
    write(cohort_copy, "subjects", read(cohort_copy, "subjects").clear())
    with pytest.raises(ValueError, match=r"subjects\.parquet: no subject rows \(empty cohort\)"):
        score_cohort(trained.model_dir, cohort_copy, tmp_path / "s", at=datetime(2150, 1, 1),
                     progress=False)  # fmt: skip


def test_truncated_labels_refuse_to_score_naming_the_file(trained, cohort_copy, tmp_path):
    """Without readable labels the samples are unknown: a clear error, no partial output."""
    CASES["truncated_parquet"](cohort_copy, "labels")
    with pytest.raises(ValueError, match=r"labels\.parquet: cannot be read"):
        score_cohort(trained.model_dir, cohort_copy, tmp_path / "scores", progress=False)
    (bad,) = [p for p in validate_cohort(cohort_copy) if p.check == "unreadable"]
    assert bad.file == "labels.parquet"


# ------------------------------------------------------------------------ property


def _drop_modalities(cohort: Path, losses: dict[int, set[str]]) -> None:
    tables = {"image": "images", "timeseries": "events", "genomics": "genotypes"}
    for modality, name in tables.items():
        gone = [s for s, lost in losses.items() if modality in lost]
        write(cohort, name, read(cohort, name).filter(~pl.col("subject_id").is_in(gone)))


_LOSSES = st.dictionaries(
    st.integers(1, N_SUBJECTS),
    st.sets(st.sampled_from(["image", "timeseries", "genomics"]), min_size=1),
    max_size=8,
)


@settings(
    max_examples=10, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
@given(losses=_LOSSES)
def test_score_one_row_per_sample_whatever_modalities_are_lost(trained, tmp_path, losses):
    work = Path(tempfile.mkdtemp(dir=tmp_path))  # one folder per example
    cohort = Path(shutil.copytree(trained.cohort, work / "cohort"))
    _drop_modalities(cohort, losses)
    scores = _score(trained, cohort, work / "scores")
    _assert_one_row_per_sample(cohort, scores)
    assert scores["error"].null_count() == scores.height
    for row in scores.iter_rows(named=True):
        lost = losses.get(row["subject_id"], set())
        used = [row[f"{m}_present"] for m in MODALITIES]
        assert not any(row[f"{m}_present"] for m in lost)
        assert ("no_modalities" in row["flags"]) == (not any(used))
        assert (row["risk"] is not None) and 0.0 < row["risk"] < 1.0
