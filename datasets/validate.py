"""``clinfuse validate``: check a cohort directory against the contract.

Every file named in :mod:`clinfuse.datasets.schema` is checked and every problem is
reported in one run; a bad file never stops the others from being checked. Schemas
are read first (``collect_schema``, footer only) so a missing column, a wrong dtype
or an unreadable file is named before any data is read. Row-level checks of one table
run as a single vectorized polars pass; cross-table checks are lazy joins.

Row numbers are 0-based row indices within the named file. Each check lists its
first ``MAX_EXAMPLES`` offending rows (or subjects) and then one line with the count
of the rest.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pydicom
from pydicom.errors import InvalidDicomError

from clinfuse.datasets import schema
from clinfuse.datasets.schema import TableSpec
from clinfuse.progress import progress

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")
MAX_EXAMPLES = 5
TIME_MIN = datetime(1900, 1, 1)
# De-identified cohorts shift dates into 2100-2200 (MIMIC-IV, the simulator).
TIME_MAX = datetime(2300, 1, 1)
DOSAGES = (0.0, 1.0, 2.0)
_PROGRESS_MIN_FILES = 50  # a progress bar for fewer DICOM files is noise
_ROW, _FILE, _VALUE = "__row", "__file", "__value"
_READ_ERRORS = (pl.exceptions.PolarsError, OSError)

# Columns that must not be null, and how bad a null is. Time columns are checked
# separately (null or out of range); numeric_value may be null (a code without value).
_NOT_NULL: dict[str, dict[str, Severity]] = {
    "events": {"subject_id": "error", "code": "error"},
    "labels": {"subject_id": "error", "boolean_value": "error"},
    "subjects": {"subject_id": "error", "site": "warning"},
    "images": {"subject_id": "error", "path": "error", "modality": "warning"},
    "genotypes": {"subject_id": "error"},
    "markers": {"marker": "error", "group": "warning"},
    "subject_splits": {"subject_id": "error", "split": "error"},
}
_ID_COLUMNS = {"subject_id", "marker"}


@dataclass(frozen=True)
class Problem:
    """One finding about a cohort.

    Attributes:
        severity: ``error`` (the cohort cannot be used as is), ``warning`` or ``info``.
        file: path of the file relative to the cohort directory.
        column: the column concerned, if any.
        row: 0-based row index within ``file``, if the finding is about one row.
        subject_id: the subject concerned, if any.
        message: what is wrong.
        check: short name of the check that found it (``dtype``, ``time_range``, ...).
    """

    severity: Severity
    file: str
    column: str | None
    row: int | None
    subject_id: int | None
    message: str
    check: str = ""

    def __str__(self) -> str:
        where = self.file + (f":{self.column}" if self.column else "")
        parts = [f"{self.severity.upper():<7}", where]
        if self.row is not None:
            parts.append(f"row {self.row} (0-based)")
        if self.subject_id is not None:
            parts.append(f"subject {self.subject_id}")
        return "  ".join(parts) + f"  {self.message}"


class Report(list[Problem]):
    """The problems found in one cohort, in the order the checks ran."""

    def __init__(self, cohort_dir: str | Path, problems: Iterable[Problem] = ()) -> None:
        super().__init__(problems)
        self.cohort_dir = str(cohort_dir)

    def add(
        self,
        severity: Severity,
        file: str,
        message: str,
        *,
        column: str | None = None,
        row: int | None = None,
        subject_id: int | None = None,
        check: str = "",
    ) -> None:
        self.append(Problem(severity, file, column, row, subject_id, message, check))

    def of(self, severity: Severity) -> list[Problem]:
        return [p for p in self if p.severity == severity]

    @property
    def errors(self) -> list[Problem]:
        return self.of("error")

    @property
    def warnings(self) -> list[Problem]:
        return self.of("warning")

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings and infos allowed)."""
        return not self.errors

    def counts(self) -> dict[str, dict[str, int]]:
        """file -> severity -> number of problems."""
        table: dict[str, dict[str, int]] = {}
        for p in self:
            row = table.setdefault(p.file, dict.fromkeys(SEVERITIES, 0))
            row[p.severity] += 1
        return table

    def summary(self) -> str:
        """A table of problem counts per file, and the verdict."""
        counts = self.counts()
        width = max([len("file"), len("total"), *map(len, counts)])
        lines = [f"{'file':<{width}}  {'errors':>6}  {'warnings':>8}  {'info':>4}"]
        for name, c in sorted(counts.items()):
            lines.append(f"{name:<{width}}  {c['error']:>6}  {c['warning']:>8}  {c['info']:>4}")
        n = {s: len(self.of(s)) for s in SEVERITIES}
        lines.append(f"{'total':<{width}}  {n['error']:>6}  {n['warning']:>8}  {n['info']:>4}")
        verdict = "VALID" if self.ok else "INVALID"
        lines.append(f"{verdict}: {self.cohort_dir} ({n['error']} errors, {n['warning']} warnings)")
        return "\n".join(lines)

    def format(self) -> str:
        """Every problem on its own line, then the summary table."""
        header = f"clinfuse validate {self.cohort_dir} (rows are 0-based indices within each file)"
        by_file = sorted(self, key=lambda p: p.file)  # stable: check order within a file
        return "\n".join([header, *map(str, by_file), "", self.summary()])

    def to_dict(self) -> dict[str, Any]:
        return {
            "cohort": self.cohort_dir,
            "valid": self.ok,
            "counts": {s: len(self.of(s)) for s in SEVERITIES},
            "row_index": "0-based within file",
            "problems": [asdict(p) for p in self],
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------- tables


@dataclass
class _Table:
    """One readable table: contract columns cast to contract dtypes, plus file and row.

    ``frame`` holds ``__file`` (relative path) and ``__row`` (0-based row within that
    file) beside the usable columns; ``raw_columns`` are all columns found on disk.
    """

    spec: TableSpec
    frame: pl.LazyFrame
    columns: list[str]
    files: list[str]
    raw_columns: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.files[0] if len(self.files) == 1 else f"{self.spec.name}/*.parquet"

    @property
    def marker_columns(self) -> list[str]:
        return [c for c in self.columns if c not in self.spec.required]

    def has(self, *columns: str) -> bool:
        return all(c in self.columns for c in columns)


def _rel(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _castable(want: pl.DataType, got: pl.DataType) -> bool:
    """Whether ``got`` converts to ``want`` without losing meaning."""
    if got == pl.Null:  # an all-null column; its nulls are reported by the row checks
        return True
    if want == pl.Int64:
        return got in (pl.Int8, pl.Int16, pl.Int32, pl.UInt8, pl.UInt16, pl.UInt32)
    if isinstance(want, pl.Datetime):
        return isinstance(got, pl.Datetime) or got == pl.Date
    if want == pl.Float32:
        return got.is_float() or got.is_integer()
    if want == pl.String:
        return isinstance(got, (pl.Categorical, pl.Enum))
    return False


def _cast(column: str, want: pl.DataType, got: pl.DataType) -> pl.Expr:
    expr = pl.col(column)
    if isinstance(got, pl.Datetime) and got.time_zone:
        expr = expr.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return expr.cast(want)


def _contract_column(
    exprs: dict[str, pl.Expr],
    col: str,
    want: pl.DataType,
    got: pl.DataType,
    rel: str,
    report: Report,
) -> None:
    """Accept ``col`` (cast to ``want``) when its dtype is right or safely castable."""
    if got == want:
        exprs[col] = pl.col(col)
    elif _castable(want, got):
        report.add(
            "warning",
            rel,
            f"dtype {got} accepted and cast to the contract dtype {want}",
            column=col,
            check="dtype",
        )
        exprs[col] = _cast(col, want, got)
    else:
        report.add(
            "error", rel, f"wrong dtype: expected {want}, found {got}", column=col, check="dtype"
        )


def _marker_column(
    exprs: dict[str, pl.Expr], col: str, got: pl.DataType, rel: str, report: Report
) -> None:
    """A genotype dosage column: any numeric dtype (Int8/Float32 preferred), checked as Float64."""
    if got.is_numeric() or got == pl.Null:
        exprs[col] = pl.col(col).cast(pl.Float64)
    else:
        report.add(
            "error",
            rel,
            f"wrong dtype: expected a numeric dosage (Int8 or Float32), found {got}",
            column=col,
            check="dtype",
        )


def _column_exprs(
    spec: TableSpec, found: pl.Schema, rel: str, report: Report
) -> dict[str, pl.Expr]:
    """Check one file's schema; return column -> expression for every usable column."""
    exprs: dict[str, pl.Expr] = {}
    for col, want in spec.required.items():
        if col in found:
            _contract_column(exprs, col, want, found[col], rel, report)
        else:
            msg = f"required column missing (expected {want}); found {list(found)}"
            report.add("error", rel, msg, column=col, check="missing_column")
    for col, want in spec.optional.items():
        if col in found:
            _contract_column(exprs, col, want, found[col], rel, report)
    if spec.wide:
        for col in found:
            if col not in spec.required:
                _marker_column(exprs, col, found[col], rel, report)
    return exprs


def _scan_file(
    root: Path, path: Path, spec: TableSpec, report: Report
) -> tuple[pl.LazyFrame, dict[str, pl.Expr], list[str]] | None:
    """Read one file's schema; None (and an error naming the file) when unreadable."""
    rel = _rel(root, path)
    try:
        lf = pl.scan_parquet(path)
        found = lf.collect_schema()
    except _READ_ERRORS as exc:
        msg = f"unreadable Parquet file ({_first_line(exc)}); its checks were skipped"
        report.add("error", rel, msg, check="unreadable")
        return None
    exprs = _column_exprs(spec, found, rel, report)
    lf = lf.with_row_index(_ROW).with_columns(pl.lit(rel).alias(_FILE))
    return lf, exprs, list(found)


def _report_absent(spec: TableSpec, report: Report) -> None:
    name = f"{spec.name}.parquet"
    if spec.mandatory:
        msg = f"mandatory file missing (nor a folder {spec.name}/ of Parquet files)"
        report.add("error", name, msg, check="missing_file")
    else:
        report.add("info", name, "optional file absent", check="missing_file")


def _load_table(
    root: Path, spec: TableSpec, report: Report, paths: list[Path] | None = None
) -> _Table | None:
    """Scan every file of ``spec`` (or ``paths``); the usable columns are those every file
    got right."""
    paths = schema.dir_table_paths(root, spec) if paths is None else paths
    if not paths:
        _report_absent(spec, report)
        return None
    parts = [p for p in (_scan_file(root, path, spec, report) for path in paths) if p]
    if not parts:
        return None
    usable = [c for c in parts[0][1] if all(c in exprs for _, exprs, _ in parts)]
    frames = [
        lf.select(_FILE, _ROW, *[exprs[c].alias(c) for c in usable]) for lf, exprs, _ in parts
    ]
    raw = list(dict.fromkeys(c for _, _, cols in parts for c in cols))
    files = [_rel(root, p) for p in paths]
    return _Table(spec, pl.concat(frames, how="vertical"), usable, files, raw)


# ---------------------------------------------------------------------------- row checks


@dataclass(frozen=True)
class _RowCheck:
    """A boolean mask over one table's rows; True marks an offending row.

    ``message`` may contain ``{value}``: the offending row's value in ``column``.
    """

    check: str
    severity: Severity
    column: str
    mask: pl.Expr
    message: str


def _null_checks(t: _Table) -> list[_RowCheck]:
    out = []
    for col, severity in _NOT_NULL.get(t.spec.name, {}).items():
        if t.has(col):
            check = "null_id" if col in _ID_COLUMNS else "null_value"
            out.append(_RowCheck(check, severity, col, pl.col(col).is_null(), f"null {col}"))
    return out


def _time_checks(t: _Table) -> list[_RowCheck]:
    out = []
    for col, dtype in t.spec.required.items():
        if isinstance(dtype, pl.Datetime) and t.has(col):
            c = pl.col(col)
            early, late = pl.lit(TIME_MIN, dtype=dtype), pl.lit(TIME_MAX, dtype=dtype)
            msg = f"{col} {{value}} outside [{TIME_MIN:%Y-%m-%d}, {TIME_MAX:%Y-%m-%d})"
            out.append(_RowCheck("time_range", "error", col, c.is_null(), f"null {col}"))
            out.append(_RowCheck("time_range", "error", col, (c < early) | (c >= late), msg))
    return out


def _finite_checks(t: _Table) -> list[_RowCheck]:
    out = []
    for col, dtype in {**t.spec.required, **t.spec.optional}.items():
        if dtype.is_float() and t.has(col):
            mask = pl.col(col).is_nan() | pl.col(col).is_infinite()
            out.append(_RowCheck("non_finite", "error", col, mask, f"non-finite {col} {{value}}"))
    return out


def _duplicate(columns: list[str], *, all_members: bool = True) -> pl.Expr:
    """Rows sharing ``columns`` with another row (or, if not ``all_members``, with an earlier one)."""
    key = pl.struct(columns)
    dup = key.is_duplicated() if all_members else ~key.is_first_distinct()
    return dup & pl.all_horizontal(pl.col(c).is_not_null() for c in columns)


def _event_checks(t: _Table) -> list[_RowCheck]:
    out = []
    if t.has("numeric_value"):
        mask = pl.col("numeric_value") < 0
        msg = "negative numeric_value {value}"
        out.append(_RowCheck("negative_value", "warning", "numeric_value", mask, msg))
    return out


def _label_checks(t: _Table) -> list[_RowCheck]:
    if not t.has("subject_id", "prediction_time"):
        return []
    mask = _duplicate(["subject_id", "prediction_time"])
    msg = "more than one label for this (subject_id, prediction_time = {value})"
    return [_RowCheck("duplicate_label", "error", "prediction_time", mask, msg)]


def _id_duplicate_check(t: _Table, col: str, what: str) -> list[_RowCheck]:
    if not t.has(col):
        return []
    msg = f"{col} {{value}} appears in more than one row ({what})"
    return [_RowCheck(f"duplicate_{col}", "error", col, _duplicate([col]), msg)]


def _genotype_checks(t: _Table) -> list[_RowCheck]:
    out = _id_duplicate_check(t, "subject_id", "one genotype row per subject")
    for col in t.marker_columns:
        mask = pl.col(col).is_not_null() & ~pl.col(col).is_in(DOSAGES)
        out.append(_RowCheck("dosage", "error", col, mask, "dosage {value} not in {{0, 1, 2}}"))
    return out


def _split_checks(t: _Table) -> list[_RowCheck]:
    if not t.has("split"):
        return []
    mask = pl.col("split").is_not_null() & ~pl.col("split").is_in(schema.SPLITS)
    msg = f"unknown split {{value!r}}; allowed: {', '.join(schema.SPLITS)}"
    return [_RowCheck("unknown_split", "error", "split", mask, msg)]


_TABLE_CHECKS: dict[str, Callable[[_Table], list[_RowCheck]]] = {
    "events": _event_checks,
    "labels": _label_checks,
    "subjects": lambda t: _id_duplicate_check(t, "subject_id", "subjects must be unique"),
    "genotypes": _genotype_checks,
    "markers": lambda t: _id_duplicate_check(t, "marker", "markers must be unique"),
    "subject_splits": _split_checks,
}


def _row_checks(t: _Table) -> list[_RowCheck]:
    specific = _TABLE_CHECKS.get(t.spec.name, lambda _: [])
    return [*_null_checks(t), *_time_checks(t), *_finite_checks(t), *specific(t)]


def _report_more(
    report: Report, sev: Severity, file: str, col: str | None, total: int, check: str
) -> None:
    if total > MAX_EXAMPLES:
        msg = f"... and {total - MAX_EXAMPLES} more with the same problem ({total} in all)"
        report.add(sev, file, msg, column=col, check=check)


def _report_hits(report: Report, t: _Table, chk: _RowCheck, total: int, hits: list[dict]) -> None:
    for hit in hits:
        msg = chk.message.format(value=hit[_VALUE])
        sid = hit.get("subject_id")
        report.add(
            chk.severity,
            hit[_FILE],
            msg,
            column=chk.column,
            row=hit[_ROW],
            subject_id=sid,
            check=chk.check,
        )
    _report_more(report, chk.severity, t.label, chk.column, total, chk.check)


def _examples(keep: list[str], mask: str, column: str) -> pl.Expr:
    """The first offending rows as a list of structs; filtered before the String cast."""
    first = [pl.col(c).filter(pl.col(mask)).head(MAX_EXAMPLES) for c in keep]
    value = pl.col(column).filter(pl.col(mask)).head(MAX_EXAMPLES).cast(pl.String)
    return pl.struct(*first, value.alias(_VALUE)).implode()


def _run_row_checks(t: _Table, report: Report, checks: list[_RowCheck] | None = None) -> None:
    """Evaluate every row check of one table (default ``_row_checks``) in one pass over its data."""
    checks = _row_checks(t) if checks is None else checks
    keep = [_FILE, _ROW, *(["subject_id"] if t.has("subject_id") else [])]
    masks = [chk.mask.alias(f"m{i}") for i, chk in enumerate(checks)]  # each evaluated once
    exprs = []
    for i, chk in enumerate(checks):
        exprs += [
            pl.col(f"m{i}").sum().alias(f"n{i}"),
            _examples(keep, f"m{i}", chk.column).alias(f"x{i}"),
        ]
    out = t.frame.with_columns(masks).select(exprs).collect().row(0, named=True)
    for i, chk in enumerate(checks):
        _report_hits(report, t, chk, out[f"n{i}"], out[f"x{i}"])


# ---------------------------------------------------------------------------- cohort checks


@dataclass
class _Cohort:
    root: Path
    report: Report
    pixels: bool
    tables: dict[str, _Table] = field(default_factory=dict)

    def get(self, name: str, *columns: str) -> _Table | None:
        """The table if it loaded and has every one of ``columns``."""
        t = self.tables.get(name)
        return t if t is not None and t.has(*columns) else None


def _ids(t: _Table) -> pl.LazyFrame:
    return t.frame.select("subject_id").drop_nulls().unique()


def _check_empty(c: _Cohort) -> None:
    labels = c.tables.get("labels")
    if labels is not None and labels.frame.select(pl.len()).collect().item() == 0:
        c.report.add("error", labels.label, "empty cohort: no label rows", check="empty")


def _report_subject_rows(
    c: _Cohort, t: _Table, df: pl.DataFrame, sev: Severity, check: str, msg: Callable[[dict], str]
) -> None:
    """One problem per subject row of ``df`` (first ``MAX_EXAMPLES``), then the count."""
    for rec in df.head(MAX_EXAMPLES).iter_rows(named=True):
        c.report.add(
            sev,
            rec[_FILE],
            msg(rec),
            column="subject_id",
            row=rec[_ROW],
            subject_id=rec["subject_id"],
            check=check,
        )
    _report_more(c.report, sev, t.label, "subject_id", df.height, check)


def _first_rows(lf: pl.LazyFrame, **aggs: pl.Expr) -> pl.LazyFrame:
    """Per subject: the file and row of its first row, plus ``aggs``."""
    first = [pl.col(_FILE).first(), pl.col(_ROW).first()]
    grouped = lf.sort(_FILE, _ROW).group_by("subject_id", maintain_order=True)
    return grouped.agg(*first, pl.len().alias("n"), **aggs)


def _check_unknown_subjects(c: _Cohort) -> None:
    subjects = c.get("subjects", "subject_id")
    if subjects is None:
        return
    for name in ("labels", "events", "images", "genotypes", "subject_splits"):
        t = c.get(name, "subject_id")
        if t is not None:
            _report_unknown_subjects(c, t, subjects)


def _report_unknown_subjects(c: _Cohort, t: _Table, subjects: _Table) -> None:
    """Subjects of ``t`` absent from subjects.parquet, each at its first row."""
    rows = t.frame.filter(pl.col("subject_id").is_not_null())
    unknown = rows.join(_ids(subjects), on="subject_id", how="anti")
    df = _first_rows(unknown).sort(_FILE, _ROW).collect()
    where = f"not in {subjects.label}"
    _report_subject_rows(
        c, t, df, "error", "unknown_subject", lambda r: f"subject_id {where} ({_rows(r['n'])})"
    )


def _check_duplicate_events(c: _Cohort) -> None:
    """Rows identical to an earlier row: a cheap hash finds candidates, exact equality confirms."""
    events = c.get("events", "subject_id", "time", "code")
    if events is None:
        return
    key = pl.struct(events.columns)
    candidates = events.frame.filter(key.hash().is_duplicated()).collect()
    repeats = candidates.filter(~pl.struct(events.columns).is_first_distinct())
    hits = repeats.head(MAX_EXAMPLES).with_columns(pl.lit(None).alias(_VALUE)).to_dicts()
    msg = "identical to an earlier event row (repeated event)"
    chk = _RowCheck("duplicate_event", "warning", "code", pl.lit(True), msg)
    _report_hits(c.report, events, chk, repeats.height, hits)


def _check_split_conflicts(c: _Cohort) -> None:
    t = c.get("subject_splits", "subject_id", "split")
    if t is None:
        return
    valid = t.frame.filter(pl.col("subject_id").is_not_null() & pl.col("split").is_not_null())
    df = _first_rows(valid, splits=pl.col("split").unique().sort())
    df = df.filter(pl.col("splits").list.len() > 1).sort(_FILE, _ROW).collect()
    _report_subject_rows(
        c,
        t,
        df,
        "error",
        "split_conflict",
        lambda r: f"subject in several splits: {', '.join(r['splits'])}",
    )


def _missing_from(labels: _Table, other: _Table) -> pl.DataFrame:
    """Labeled subjects (first label row each) with no row in ``other``."""
    labeled = labels.frame.filter(pl.col("subject_id").is_not_null())
    missing = labeled.join(_ids(other), on="subject_id", how="anti")
    return _first_rows(missing).sort(_FILE, _ROW).collect()


def _check_unsplit(c: _Cohort) -> None:
    labels = c.get("labels", "subject_id")
    if labels is None:
        return
    splits = c.get("subject_splits", "subject_id")
    if splits is None:
        if not schema.has_table(c.root, schema.SUBJECT_SPLITS):
            c.report.add(
                "warning",
                "subject_splits.parquet",
                "absent: no labeled subject has a split",
                check="no_split",
            )
        return
    df = _missing_from(labels, splits)
    _report_subject_rows(
        c,
        labels,
        df,
        "warning",
        "no_split",
        lambda _: f"labeled subject has no row in {splits.label}",
    )


def _check_no_image(c: _Cohort) -> None:
    labels, images = c.get("labels", "subject_id"), c.get("images", "subject_id")
    if labels is None or images is None:
        return
    df = _missing_from(labels, images)
    _report_subject_rows(
        c,
        labels,
        df,
        "warning",
        "no_image",
        lambda _: f"labeled subject has no row in {images.label}",
    )


def _check_events_before(c: _Cohort) -> None:
    labels = c.get("labels", "subject_id", "prediction_time")
    events = c.get("events", "subject_id", "time")
    if labels is None or events is None:
        return
    first = events.frame.group_by("subject_id").agg(pl.col("time").min().alias("first_event"))
    rows = labels.frame.drop_nulls(["subject_id", "prediction_time"]).join(
        first, on="subject_id", how="left"
    )
    late = pl.col("first_event").is_null() | (pl.col("first_event") > pl.col("prediction_time"))
    df = rows.filter(late).sort(_FILE, _ROW).collect()
    for rec in df.head(MAX_EXAMPLES).iter_rows(named=True):
        msg = f"no event at or before prediction_time {rec['prediction_time']} (first event: {rec['first_event']})"
        c.report.add(
            "warning",
            rec[_FILE],
            msg,
            column="prediction_time",
            row=rec[_ROW],
            subject_id=rec["subject_id"],
            check="no_events_before",
        )
    _report_more(
        c.report, "warning", labels.label, "prediction_time", df.height, "no_events_before"
    )


def _check_codes_without_values(c: _Cohort) -> None:
    events = c.get("events", "code", "numeric_value")
    if events is None:
        return
    valued = pl.col("numeric_value").is_not_null().sum()
    per_code = events.frame.drop_nulls("code").group_by("code").agg(valued.alias("k"), pl.len())
    empty = per_code.filter(pl.col("k") == 0).collect()  # few codes: the sort below is cheap
    firsts = _first_code_rows(events, empty["code"])
    for rec in (
        empty.join(firsts, on="code").sort(_FILE, _ROW).head(MAX_EXAMPLES).iter_rows(named=True)
    ):
        msg = f"code {rec['code']!r} has no numeric value in any of its {_rows(rec['len'])} (first at this row)"
        c.report.add(
            "info",
            rec[_FILE],
            msg,
            column="numeric_value",
            row=rec[_ROW],
            check="code_without_values",
        )
    _report_more(
        c.report, "info", events.label, "numeric_value", empty.height, "code_without_values"
    )


def _first_code_rows(events: _Table, codes: pl.Series) -> pl.DataFrame:
    """File and row of the first event of each of ``codes``."""
    rows = events.frame.filter(pl.col("code").is_in(codes.implode())).select("code", _FILE, _ROW)
    return rows.sort(_FILE, _ROW).group_by("code", maintain_order=True).first().collect()


def _check_markers(c: _Cohort) -> None:
    geno = c.tables.get("genotypes")
    if geno is None:
        return
    columns = [col for col in geno.raw_columns if col != "subject_id"]
    markers = c.get("markers", "marker")
    if markers is None:
        if not schema.has_table(c.root, schema.MARKERS):
            msg = f"absent, but {geno.label} has {len(columns)} marker columns"
            c.report.add("error", "markers.parquet", msg, check="marker_unknown")
        return
    rows = (
        markers.frame.drop_nulls("marker")
        .group_by("marker")
        .agg(pl.col(_FILE).first(), pl.col(_ROW).min())
    )
    known = {r["marker"]: r for r in rows.collect().iter_rows(named=True)}
    _report_unknown_markers(c, geno, markers, [col for col in columns if col not in known])
    _report_unused_markers(c, geno, markers, [known[m] for m in sorted(set(known) - set(columns))])


def _report_unknown_markers(c: _Cohort, geno: _Table, markers: _Table, cols: list[str]) -> None:
    for col in cols[:MAX_EXAMPLES]:
        msg = f"genotype column has no row in {markers.label}"
        c.report.add("error", geno.label, msg, column=col, check="marker_unknown")
    _report_more(c.report, "error", geno.label, None, len(cols), "marker_unknown")


def _report_unused_markers(c: _Cohort, geno: _Table, markers: _Table, recs: list[dict]) -> None:
    for rec in recs[:MAX_EXAMPLES]:
        msg = f"marker {rec['marker']!r} has no column in {geno.label}"
        c.report.add(
            "warning", rec[_FILE], msg, column="marker", row=rec[_ROW], check="marker_unused"
        )
    _report_more(c.report, "warning", markers.label, "marker", len(recs), "marker_unused")


# ---------------------------------------------------------------------------- DICOM


def dicom_problem(path: Path, pixels: bool = True) -> str | None:
    """What is wrong with one DICOM file, or None when it reads (and decodes).

    Args:
        path: the file.
        pixels: also decode the pixel data (catches truncated pixel data and
            compressed transfer syntaxes no installed decoder handles).
    """
    if not path.is_file():
        return f"file not found: {path}"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError:
        return f"not a DICOM file (no 'DICM' marker after the 128-byte preamble): {path}"
    except Exception as exc:  # pydicom raises many types on corrupt headers
        return f"unreadable DICOM ({_first_line(exc)}): {path}"
    problem = _photometric_problem(ds, path)
    if problem or not pixels:
        return problem
    return _pixel_problem(ds, path)


# Samples per pixel each photometric interpretation implies (DICOM PS3.3 C.7.6.3.1.2).
_PHOTOMETRIC_SAMPLES = {
    "MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "YBR_FULL": 3,
    "YBR_FULL_422": 3, "YBR_PARTIAL_420": 3, "YBR_ICT": 3, "YBR_RCT": 3,
}  # fmt: skip


def _photometric_problem(ds: pydicom.Dataset, path: Path) -> str | None:
    """A photometric interpretation that is unknown or contradicts SamplesPerPixel."""
    if "PixelData" not in ds and "PhotometricInterpretation" not in ds:
        return None  # the pixel check names the missing pixel data
    name, samples = ds.get("PhotometricInterpretation"), ds.get("SamplesPerPixel")
    want = _PHOTOMETRIC_SAMPLES.get(str(name))
    if want is None:
        return f"unknown PhotometricInterpretation {name!r}: {path}"
    if samples != want:
        return f"PhotometricInterpretation {name} needs SamplesPerPixel {want}, found {samples}: {path}"
    return None


def _pixel_problem(ds: pydicom.Dataset, path: Path) -> str | None:
    if "PixelData" not in ds:
        return f"no PixelData element: {path}"
    try:
        ds.pixel_array  # noqa: B018  (decoding is the check)
    except Exception as exc:  # decoders raise ValueError, RuntimeError, NotImplementedError...
        uid = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
        syntax = f"{uid.name} ({uid})" if uid else "unknown transfer syntax"
        return (
            f"pixel data cannot be decoded, transfer syntax {syntax} ({_first_line(exc)}): {path}"
        )
    return None


def _check_images(c: _Cohort) -> None:
    images = c.get("images", "path")
    if images is None:
        return
    cols = [_FILE, _ROW, *(["subject_id"] if images.has("subject_id") else [])]
    per_path = (
        images.frame.drop_nulls("path").sort(_FILE, _ROW).group_by("path", maintain_order=True)
    )
    df = per_path.agg(pl.col(cols).first()).collect()
    bad = []
    for rec in progress(
        df.iter_rows(named=True),
        total=df.height,
        desc="DICOM",
        unit="file",
        enabled=df.height >= _PROGRESS_MIN_FILES,
        min_interval=10.0,
        leave=False,
    ):
        msg = dicom_problem(c.root / rec["path"], c.pixels)
        if msg:
            bad.append((rec, msg))
    for rec, msg in bad[:MAX_EXAMPLES]:
        c.report.add(
            "error",
            rec[_FILE],
            msg,
            column="path",
            row=rec[_ROW],
            subject_id=rec.get("subject_id"),
            check="dicom",
        )
    _report_more(c.report, "error", images.label, "path", len(bad), "dicom")


# ---------------------------------------------------------------------------- entry points

_COHORT_CHECKS: tuple[Callable[[_Cohort], None], ...] = (
    _check_empty,
    _check_duplicate_events,
    _check_unknown_subjects,
    _check_split_conflicts,
    _check_unsplit,
    _check_no_image,
    _check_events_before,
    _check_codes_without_values,
    _check_markers,
    _check_images,
)


def _load_all(c: _Cohort) -> None:
    """Load and row-check every table; a table whose data cannot be read is dropped."""
    for spec in schema.TABLES:
        t = _load_table(c.root, spec, c.report)
        if t is None:
            continue
        try:
            _run_row_checks(t, c.report)
        except _READ_ERRORS as exc:
            msg = f"data cannot be read ({_first_line(exc)}); its checks were skipped"
            c.report.add("error", t.label, msg, check="unreadable")
            continue
        c.tables[spec.name] = t


def validate_cohort(cohort_dir: str | Path, *, pixels: bool = True) -> Report:
    """Check every file of a cohort directory against the contract.

    Args:
        cohort_dir: the cohort directory.
        pixels: decode DICOM pixel data (False: header-only DICOM check).

    Returns:
        Every problem found; ``report.ok`` is False when any is an error.
    """
    source = schema.as_cohort(cohort_dir)
    if not isinstance(source, Path):
        from clinfuse.datasets.meds.validate import validate_meds

        return validate_meds(source, pixels=pixels)
    root = Path(cohort_dir)
    report = Report(root)
    if not root.is_dir():
        report.add("error", str(root), "cohort directory not found", check="missing_file")
        return report
    c = _Cohort(root, report, pixels)
    _load_all(c)
    for check in _COHORT_CHECKS:
        check(c)
    return report


def main(args: argparse.Namespace) -> int:
    """``clinfuse validate COHORT [--labels DIR] [--sidecars DIR] [--json PATH] [--no-pixels]``:
    1 on errors, else 0."""
    from clinfuse.datasets.meds import open_cohort

    cohort = open_cohort(
        args.cohort, getattr(args, "labels", None), getattr(args, "sidecars", None)
    )
    report = validate_cohort(cohort, pixels=not getattr(args, "no_pixels", False))
    print(report.format())
    if getattr(args, "json", None):
        report.write_json(args.json)
        print(f"report written to {args.json}")
    return 0 if report.ok else 1
