"""Property tests of ``validate`` on randomly corrupted events: every corrupted row
is reported by its 0-based index (up to ``MAX_EXAMPLES`` per check, then a count
line with the exact total), and validate never raises."""

from __future__ import annotations

import shutil
import tempfile
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinfuse.datasets.schema import TIME
from clinfuse.datasets.validate import MAX_EXAMPLES, validate_cohort

from .conftest import read, truncate_file, write

# kind -> (check, column) validate must report it under.
KINDS = {
    "nan": ("non_finite", "numeric_value"),
    "inf": ("non_finite", "numeric_value"),
    "ancient": ("time_range", "time"),
    "null_code": ("null_value", "code"),
}
_TABLES = ("events", "labels", "subjects", "subject_splits")
_FUZZ = settings(
    max_examples=20, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip


@pytest.fixture(scope="module")
def tabular(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clean cohort without films: events, labels, subjects, splits."""
    root = tmp_path_factory.mktemp("tabular")
    for name in _TABLES:
        shutil.copy(trained.cohort / f"{name}.parquet", root)
    return root


def _fresh(tabular: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tabular, Path(tempfile.mkdtemp(dir=tmp_path)) / "c"))


def _corrupt(events: pl.DataFrame, plan: dict[int, str]) -> pl.DataFrame:
    row = pl.int_range(pl.len())

    def rows(kind: str) -> pl.Expr:
        return row.is_in([r for r, k in plan.items() if k == kind])

    return events.with_columns(
        numeric_value=pl.when(rows("nan")).then(float("nan"))
        .when(rows("inf")).then(float("inf"))
        .otherwise("numeric_value").cast(pl.Float32),
        time=pl.when(rows("ancient")).then(pl.lit(datetime(1850, 1, 1), TIME)).otherwise("time"),
        code=pl.when(rows("null_code")).then(None).otherwise("code"),
    )  # fmt: skip


def _expected(plan: dict[int, str]) -> dict[tuple[str, str], list[int]]:
    out: dict[tuple[str, str], list[int]] = {}
    for r, kind in sorted(plan.items()):
        out.setdefault(KINDS[kind], []).append(r)
    return out


_PLANS = st.dictionaries(
    st.integers(0, 3999), st.sampled_from(sorted(KINDS)), min_size=1, max_size=14
)


@_FUZZ
@given(plan=_PLANS)
def test_every_corrupted_event_row_is_reported(tabular, tmp_path, plan) -> None:
    cohort = _fresh(tabular, tmp_path)
    write(cohort, "events", _corrupt(read(cohort, "events"), plan))
    report = validate_cohort(cohort)
    for (check, column), rows in _expected(plan).items():
        hits = [p for p in report if (p.check, p.column) == (check, column)]
        named = [p.row for p in hits if p.row is not None]
        assert named == rows[:MAX_EXAMPLES], [str(p) for p in hits]
        assert all(p.file == "events.parquet" and p.severity == "error" for p in hits)
        more = [p.message for p in hits if p.row is None]
        assert more == ([f"... and {len(rows) - MAX_EXAMPLES} more with the same problem ({len(rows)} in all)"] if len(rows) > MAX_EXAMPLES else [])  # fmt: skip


@_FUZZ
@given(plan=_PLANS, split_at=st.integers(1, 3999))
def test_rows_are_counted_within_each_file_of_a_folder(tabular, tmp_path, plan, split_at) -> None:
    """events/ as two Parquet files: each hit names its own file and the row inside it."""
    cohort = _fresh(tabular, tmp_path)
    events = _corrupt(read(cohort, "events"), plan)
    (cohort / "events.parquet").unlink()
    (cohort / "events").mkdir()
    events.head(split_at).write_parquet(cohort / "events" / "a.parquet")
    events.slice(split_at).write_parquet(cohort / "events" / "b.parquet")
    report = validate_cohort(cohort)
    for (check, column), rows in _expected(plan).items():
        want = [("events/a.parquet", r) if r < split_at else ("events/b.parquet", r - split_at) for r in rows]  # fmt: skip
        hits = [(p.file, p.row) for p in report if (p.check, p.column) == (check, column)]
        assert [h for h in hits if h[1] is not None] == want[:MAX_EXAMPLES]


@_FUZZ
@given(name=st.sampled_from(_TABLES), fraction=st.floats(0.0, 0.99))
def test_truncated_parquet_is_named_and_never_raises(tabular, tmp_path, name, fraction) -> None:
    cohort = _fresh(tabular, tmp_path)
    truncate_file(cohort / f"{name}.parquet", fraction)
    report = validate_cohort(cohort)
    bad = [p for p in report if p.check == "unreadable"]
    assert [(p.severity, p.file) for p in bad] == [("error", f"{name}.parquet")]
    assert "unreadable Parquet file" in bad[0].message
    assert not report.ok


def test_wrong_dtype_and_duplicate_ids_are_named(tabular, tmp_path) -> None:
    cohort = _fresh(tabular, tmp_path)
    labels = read(cohort, "labels")
    write(cohort, "labels", labels.with_columns(pl.col("boolean_value").cast(pl.String)))
    subjects = read(cohort, "subjects")
    write(cohort, "subjects", pl.concat([subjects, subjects.slice(3, 1)]))
    report = validate_cohort(cohort)
    (dtype,) = [p for p in report if p.check == "dtype"]
    assert (dtype.file, dtype.column) == ("labels.parquet", "boolean_value")
    assert "expected Boolean, found String" in dtype.message
    dup = [(p.row, p.subject_id) for p in report if p.check == "duplicate_subject_id"]
    sid = subjects["subject_id"][3]
    assert dup == [(3, sid), (subjects.height, sid)]
