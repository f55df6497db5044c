"""``clinfuse validate`` for a MEDS root: the ``meds`` package's schemas, then our checks.

Each file is first checked against its schema in the ``meds`` package
(``DataSchema``, ``LabelSchema``, ``SubjectSplitSchema``, ``CodeMetadataSchema``,
``DatasetMetadataSchema``): missing or mistyped columns and, where the schema allows
none, extra columns, in the package's own words. Row checks follow each column's
nullability in the same schema (a null ``time`` is a static event, a null
``subject_id`` an error) and the time range of our cohort contract. Then the cohort
checks of ``datasets.validate`` run on the MEDS tables: labels whose subjects are not
in ``data/`` (with counts), split names, sidecar images, genotypes and markers.

Row numbers are 0-based within the named file, as for a cohort directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import meds
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from flexible_schema import SchemaValidationError
from flexible_schema.columns import Nullability

from clinfuse.datasets import schema
from clinfuse.datasets import validate as v
from clinfuse.datasets.meds.source import CODES_FILE, DATA_DIR, DATASET_FILE, MedsSource
from clinfuse.datasets.schema import TableSpec


def table_spec(name: str, meds_schema: Any) -> TableSpec:
    """Our TableSpec for one ``meds`` schema: its columns, with polars dtypes."""
    dtypes = dict(pl.from_arrow(meds_schema.schema().empty_table()).schema)
    required = {c: dtypes[c] for c in meds_schema.required_columns()}
    optional = {c: dtypes[c] for c in meds_schema.optional_columns()}
    return TableSpec(name, required, optional)


DATA = table_spec("events", meds.DataSchema)
LABELS = table_spec("labels", meds.LabelSchema)
SPLITS = table_spec("subject_splits", meds.SubjectSplitSchema)
CODES = table_spec("codes", meds.CodeMetadataSchema)


def validate_meds(source: MedsSource, *, pixels: bool = True) -> v.Report:
    """Every problem of a MEDS root, its label directory and its sidecars.

    Args:
        source: the MEDS root (``labels`` None: the root and sidecars alone).
        pixels: decode DICOM pixel data of the sidecar images.
    """
    report = v.Report(str(source))
    if not source.root.is_dir():
        report.add("error", str(source.root), "MEDS root not found", check="missing_file")
        return report
    _check_dataset_json(source, report)
    c = v._Cohort(source.sidecar_dir, report, pixels)
    _load_meds_tables(source, c)
    _load_sidecars(source, c)
    for check in v._COHORT_CHECKS:
        check(c)
    _check_codes(source, c)
    _check_label_subjects(source, c)
    return report


# ---------------------------------------------------------------------------- tables


def _load_meds_tables(source: MedsSource, c: v._Cohort) -> None:
    data = _load(source.root, DATA, meds.DataSchema, source.data_paths(), c.report)
    if data is None and not source.data_paths():
        c.report.add("error", "data/", "no Parquet shard under data/", check="missing_file")
    if data is not None:
        c.tables["events"] = data
        if data.has("subject_id"):
            c.tables["subjects"] = _subjects_of(data)
    if source.labels is not None:
        paths = source.label_paths()
        if not paths:
            msg = "no Parquet label file in the label directory"
            c.report.add("error", str(source.labels), msg, check="missing_file")
        labels = _load(source.root, LABELS, meds.LabelSchema, paths, c.report)
        if labels is not None:
            _require_boolean(labels, c.report)
            c.tables["labels"] = labels
    splits = source.table_paths(schema.SUBJECT_SPLITS)
    if splits:
        loaded = _load(source.root, SPLITS, meds.SubjectSplitSchema, splits, c.report)
        if loaded is not None:
            c.tables["subject_splits"] = loaded
    else:
        msg = "absent: subjects are split 70/15/15 by clinfuse (seeded)"
        c.report.add("warning", meds.subject_splits_filepath, msg, check="no_split")


def _load(
    root: Path, spec: TableSpec, meds_schema: Any, paths: list[Path], report: v.Report
) -> v._Table | None:
    """Checks each file against ``meds_schema``, then loads and row-checks the table."""
    if not paths:
        return None
    for path in paths:
        _check_file_schema(root, path, meds_schema, spec, report)
    loaded = _load_cast(root, spec, paths, report)
    if loaded is None:
        return None
    table = _Shown(**vars(loaded), shown=_shown(root, paths, spec))
    try:
        v._run_row_checks(table, report, _row_checks(table, meds_schema))
    except v._READ_ERRORS as exc:
        msg = f"data cannot be read ({v._first_line(exc)}); its checks were skipped"
        report.add("error", table.label, msg, check="unreadable")
        return None
    return table


def _load_cast(root: Path, spec: TableSpec, paths: list[Path], report: v.Report) -> v._Table | None:
    """The files of one table, each meds column cast to its dtype as meds' ``align``
    would (``strict=False``: a value that does not convert becomes null, and the null
    checks name its row). Columns some file lacks are left out."""
    want = {**spec.required, **spec.optional}
    frames, found = [], []
    for path in paths:
        try:
            lazy = pl.scan_parquet(path)
            names = lazy.collect_schema()
        except v._READ_ERRORS as exc:
            msg = f"unreadable Parquet file ({v._first_line(exc)}); its checks were skipped"
            report.add("error", v._rel(root, path), msg, check="unreadable")
            continue
        cols = {c: _cast(c, names[c], want[c]) for c in want if c in names}
        rel = pl.lit(v._rel(root, path)).alias(v._FILE)
        frames.append((lazy.with_row_index(v._ROW).with_columns(rel), cols))
        found.append(list(names))
    if not frames:
        return None
    usable = [c for c in want if all(c in cols for _, cols in frames)]
    parts = [lf.select(v._FILE, v._ROW, *[cols[c].alias(c) for c in usable]) for lf, cols in frames]
    raw = list(dict.fromkeys(c for names in found for c in names))
    files = [v._rel(root, p) for p in paths]
    return v._Table(spec, pl.concat(parts, how="vertical"), usable, files, raw)


def _cast(column: str, got: pl.DataType, want: pl.DataType) -> pl.Expr:
    expr = pl.col(column)
    if isinstance(got, pl.Datetime) and got.time_zone:
        expr = expr.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return expr.cast(want, strict=False)


def _shown(root: Path, paths: list[Path], spec: TableSpec) -> str:
    if spec.name == "events":
        return f"{DATA_DIR}/**/*.parquet"
    folder = paths[0].parent
    return f"{v._rel(root, folder)}/*.parquet"


def _check_file_schema(
    root: Path, path: Path, meds_schema: Any, spec: TableSpec, report: v.Report
) -> None:
    """The meds schema's own check of one file's footer. Only a dtype that converts
    without losing meaning (int32 -> int64, large_string -> string, a time zone) is a
    warning, as for a cohort directory; anything else breaks the schema."""
    rel = v._rel(root, path)
    try:
        found = pq.read_schema(path)
    except (OSError, pa.ArrowException):
        return  # reported as unreadable when the table loads
    try:
        meds_schema.validate(found)
    except SchemaValidationError as err:
        column = _column_named(str(err), found)
        if _only_castable_types(str(err), found, spec):
            msg = f"accepted and cast, as meds.{meds_schema.__name__}.align does: {err}"
            report.add("warning", rel, msg, column=column, check="dtype")
        else:
            msg = f"breaks meds.{meds_schema.__name__}: {err}"
            report.add("error", rel, msg, column=column, check="meds_schema")


def _only_castable_types(message: str, found: pa.Schema, spec: TableSpec) -> bool:
    if not message.startswith("Columns with incorrect types"):
        return False  # missing or extra columns
    got = dict(pl.from_arrow(found.empty_table()).schema)
    want = {**spec.required, **spec.optional}
    return all(got[c] == want[c] or v._castable(want[c], got[c]) for c in want if c in got)


def _column_named(message: str, found: pa.Schema) -> str | None:
    names = [n for n in found.names if n in message]
    return names[0] if len(names) == 1 else None


def _row_checks(t: v._Table, meds_schema: Any) -> list[v._RowCheck]:
    """Nulls where the meds schema allows none, times in range, finite values, and the
    table's own checks (duplicate labels, split names)."""
    out = []
    # Label value columns clinfuse does not read (integer_value, ...) are not checked:
    # the MEDS sample datasets themselves write them all null.
    used = set(meds_schema.required_columns()) | {"boolean_value"}
    for col, column in meds_schema._columns_map().items():
        if column.nullable == Nullability.NONE and col in used and t.has(col):
            check = "null_id" if col == "subject_id" else "null_value"
            out.append(v._RowCheck(check, "error", col, pl.col(col).is_null(), f"null {col}"))
    out += [chk for chk in v._time_checks(t) if chk.message != f"null {chk.column}"]
    out += v._finite_checks(t)
    specific = v._TABLE_CHECKS.get(t.spec.name)
    return out + (specific(t) if specific else [])


def _require_boolean(labels: v._Table, report: v.Report) -> None:
    if not labels.has("boolean_value"):
        msg = (
            "no boolean_value column: clinfuse trains binary tasks (MEDS LabelSchema boolean_value)"
        )
        report.add("error", labels.label, msg, column="boolean_value", check="missing_column")


@dataclass
class _Shown(v._Table):
    """A table named in messages as ``shown`` (``data/**/*.parquet``) when it has several files."""

    shown: str = ""

    @property
    def label(self) -> str:
        return self.files[0] if len(self.files) == 1 else self.shown


def _subjects_of(data: v._Table) -> v._Table:
    """The subjects table of a MEDS root: every subject_id of ``data/``."""
    return _Shown(
        schema.SUBJECTS, data.frame, ["subject_id"], data.files, ["subject_id"], data.label
    )


def _load_sidecars(source: MedsSource, c: v._Cohort) -> None:
    for spec in (schema.IMAGES, schema.GENOTYPES, schema.MARKERS):
        paths = source.table_paths(spec)
        if not paths:
            c.report.add(
                "info", f"{spec.name}.parquet", "optional sidecar absent", check="missing_file"
            )
            continue
        t = v._load_table(source.sidecar_dir, spec, c.report, paths)
        if t is None:
            continue
        try:
            v._run_row_checks(t, c.report)
        except v._READ_ERRORS as exc:
            msg = f"data cannot be read ({v._first_line(exc)}); its checks were skipped"
            c.report.add("error", t.label, msg, check="unreadable")
            continue
        c.tables[spec.name] = t


# ---------------------------------------------------------------------------- metadata


def _check_dataset_json(source: MedsSource, report: v.Report) -> None:
    path = source.root / DATASET_FILE
    if not path.is_file():
        report.add("warning", DATASET_FILE, "absent (MEDS metadata)", check="missing_file")
        return
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        report.add("error", DATASET_FILE, f"not JSON ({err})", check="unreadable")
        return
    try:
        meds.DatasetMetadataSchema.validate(meta)
    except Exception as err:  # flexible_schema's JSON validation errors
        cause = err.__cause__ or err
        msg = f"breaks meds.DatasetMetadataSchema: {v._first_line(cause)}"
        report.add("error", DATASET_FILE, msg, check="meds_schema")


def _check_codes(source: MedsSource, c: v._Cohort) -> None:
    """codes.parquet against its schema; data codes it lacks; channel codes that select nothing."""
    path = source.root / CODES_FILE
    known: pl.DataFrame | None = None
    if path.is_file():
        codes = _load(source.root, CODES, meds.CodeMetadataSchema, [path], c.report)
        if codes is not None and codes.has("code"):
            known = codes.frame.select("code").unique().collect()
    else:
        c.report.add("warning", CODES_FILE, "absent (MEDS code metadata)", check="missing_file")
    events = c.get("events", "code")
    if events is None:
        return
    used = events.frame.select(pl.col("code").drop_nulls().unique()).collect()
    if known is not None:
        missing = used.join(known, on="code", how="anti").sort("code")
        if missing.height:
            shown = ", ".join(missing["code"].head(v.MAX_EXAMPLES).to_list())
            msg = f"{missing.height} code(s) of data/ are not listed here (e.g. {shown})"
            c.report.add("warning", CODES_FILE, msg, column="code", check="code_unlisted")
    options = source.options
    if options.channels and not used.filter(options.code_filter()).height:
        msg = f"data.meds.channels {options.channels} selects no code of data/"
        c.report.add("error", "data/", msg, column="code", check="no_channel")


def _check_label_subjects(source: MedsSource, c: v._Cohort) -> None:
    """One line with counts: how many label subjects (and rows) the MEDS root lacks."""
    labels, data = c.get("labels", "subject_id"), c.get("events", "subject_id")
    if labels is None or data is None:
        return
    rows = labels.frame.filter(pl.col("subject_id").is_not_null())
    missing = rows.join(v._ids(data), on="subject_id", how="anti")
    counts = missing.select(pl.len(), pl.col("subject_id").n_unique()).collect().row(0)
    total = rows.select(pl.col("subject_id").n_unique()).collect().item()
    if counts[0]:
        msg = (
            f"{counts[1]} of {total} label subjects ({counts[0]} label rows) are not in "
            f"the MEDS root {source.root}"
        )
        c.report.add("error", str(source.labels), msg, column="subject_id", check="unknown_subject")
