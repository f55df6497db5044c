"""A cohort directory written as a MEDS root, a label directory and sidecars.

``clinfuse simulate --format meds`` writes the simulator's cohort this way, so the
MEDS path can be tested against the cohort layout on the same subjects:

``OUT/meds/``
    ``data/{train,tuning,held_out}/N.parquet``   events, plus static events
                                                 (``time`` null): ``SITE//x``,
                                                 ``ANCESTRY//x``, ``SEX//x``, ``AGE``
    ``metadata/codes.parquet``                   every code, its unit as description
    ``metadata/dataset.json``                    ``meds.DatasetMetadataSchema``
    ``metadata/subject_splits.parquet``
``OUT/labels/labels.parquet``                    the MEDS label schema
``OUT/sidecars/``                                images.parquet + DICOM, genotypes,
                                                 markers, the simulator's oracle

Every table is cast with the ``meds`` schema's own ``align`` before it is written.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import meds
import polars as pl
import pyarrow.parquet as pq

from clinfuse.datasets import schema
from clinfuse.datasets.meds.options import MedsOptions
from clinfuse.datasets.meds.source import CODES_FILE, DATA_DIR, DATASET_FILE, SPLITS_FILE
from clinfuse.errors import OutputExistsError

SUBJECTS_PER_SHARD = 1000
_MOVED = ("events", "labels", "subjects", "subject_splits")  # become MEDS tables


def cohort_to_meds(
    cohort_dir: str | Path,
    out: str | Path,
    *,
    dataset_name: str = "clinfuse cohort",
    subjects_per_shard: int = SUBJECTS_PER_SHARD,
    options: MedsOptions | None = None,
) -> Path:
    """Writes a MEDS root (``out/data``, ``out/metadata``) from a cohort directory.

    The cohort's events keep their order within a subject (the model then sums
    repeated cells in the same order through both layouts).
    """
    cohort, root = Path(cohort_dir), Path(out)
    options = options or MedsOptions()
    splits = schema.scan(cohort, schema.SUBJECT_SPLITS).collect()
    events = _data_frame(cohort, options)
    _write_shards(root / DATA_DIR, events, splits, subjects_per_shard)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    _write(meds.SubjectSplitSchema, splits.select("subject_id", "split"), root / SPLITS_FILE)
    _write(meds.CodeMetadataSchema, _codes(cohort, events), root / CODES_FILE)
    _write_dataset_json(root / DATASET_FILE, dataset_name)
    return root


def write_labels(cohort_dir: str | Path, labels_dir: str | Path) -> Path:
    """The cohort's labels as ``labels_dir/labels.parquet`` (MEDS label schema)."""
    labels = schema.scan(cohort_dir, schema.LABELS).collect()
    path = Path(labels_dir) / "labels.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(meds.LabelSchema, labels.select("subject_id", "prediction_time", "boolean_value"), path)
    return Path(labels_dir)


def split_simulated(cohort_dir: Path, out: Path) -> tuple[Path, Path, Path]:
    """Turns a freshly simulated cohort directory into ``out/meds``, ``out/labels`` and
    ``out/sidecars`` (the cohort directory becomes the sidecar folder)."""
    root = cohort_to_meds(cohort_dir, out / "meds", dataset_name="clinfuse simulator")
    labels = write_labels(cohort_dir, out / "labels")
    sidecars = out / "sidecars"
    if cohort_dir.resolve() != sidecars.resolve():
        shutil.move(str(cohort_dir), str(sidecars))
    for name in _MOVED:
        (sidecars / f"{name}.parquet").unlink()
    return root, labels, sidecars


def _data_frame(cohort: Path, options: MedsOptions) -> pl.DataFrame:
    """Static events then timed events, per subject, sorted by subject and time."""
    timed = schema.scan(cohort, schema.EVENTS).select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("time").cast(schema.TIME),
        pl.col("code").cast(pl.String),
        pl.col("numeric_value").cast(pl.Float32),
    )
    static = _static_events(schema.scan(cohort, schema.SUBJECTS), options)
    frame = pl.concat([static, timed], how="vertical").collect()
    # Stable: static rows (null time) first, timed rows keep the cohort's order.
    return frame.sort("subject_id", "time", nulls_last=False, maintain_order=True)


def _static_events(subjects: pl.LazyFrame, o: MedsOptions) -> pl.LazyFrame:
    names = subjects.collect_schema().names()
    parts = []
    for column, prefix in (("site", o.site), ("ancestry", o.ancestry), ("sex", o.sex)):
        if column in names:
            code = pl.lit(prefix) + pl.col(column).cast(pl.String)
            parts.append(_static(subjects.filter(pl.col(column).is_not_null()), code, None))
    if "age" in names:
        value = pl.col("age").cast(pl.Float32)
        parts.append(_static(subjects.filter(pl.col("age").is_not_null()), pl.lit(o.age), value))
    return pl.concat(parts, how="vertical")


def _static(subjects: pl.LazyFrame, code: pl.Expr, value: pl.Expr | None) -> pl.LazyFrame:
    return subjects.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.lit(None, schema.TIME).alias("time"),
        code.alias("code"),
        (value if value is not None else pl.lit(None, pl.Float32)).alias("numeric_value"),
    )


def _write_shards(data: Path, events: pl.DataFrame, splits: pl.DataFrame, per_shard: int) -> None:
    """``data/<split>/<n>.parquet``: each subject in one shard, shards of ``per_shard``
    subjects in subject order (MEDS: a subject's rows are contiguous and sorted)."""
    ids = events.select("subject_id").unique().sort("subject_id")
    ids = ids.join(splits.select("subject_id", "split"), on="subject_id", how="left")
    ids = ids.with_columns(pl.col("split").fill_null("unsplit"))
    for (split,), members in ids.group_by("split", maintain_order=True):
        for n, start in enumerate(range(0, members.height, per_shard)):
            chunk = members["subject_id"].slice(start, per_shard)
            rows = events.filter(pl.col("subject_id").is_in(chunk.implode()))
            path = data / str(split) / f"{n}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(meds.DataSchema, rows, path)


def _codes(cohort: Path, events: pl.DataFrame) -> pl.DataFrame:
    codes = events.select(pl.col("code").unique().sort())
    lazy = schema.scan(cohort, schema.EVENTS)
    if "unit" in lazy.collect_schema().names():
        units = lazy.group_by("code").agg(pl.col("unit").drop_nulls().first()).collect()
        codes = codes.join(units, on="code", how="left", maintain_order="left")
        description = pl.lit("unit: ") + pl.col("unit")
    else:
        description = pl.lit(None, pl.String)
    return codes.select(
        "code",
        description.alias("description"),
        pl.lit(None, pl.List(pl.String)).alias("parent_codes"),
    )


def _write(meds_schema, frame: pl.DataFrame, path: Path) -> None:
    """Casts with the meds schema's ``align`` (string, not large_string) and writes."""
    pq.write_table(meds_schema.align(frame.to_arrow()), path)


def _write_dataset_json(path: Path, name: str) -> None:
    from clinfuse import __version__

    meta = meds.DatasetMetadataSchema(
        dataset_name=name,
        dataset_version="1",
        etl_name="clinfuse",
        etl_version=__version__,
        meds_version=meds.__version__,
        created_at=datetime.now(timezone.utc).isoformat(),
    )
    meds.DatasetMetadataSchema.validate(meta.to_dict())
    path.write_text(json.dumps(meta.to_dict(), indent=2, default=str) + "\n")


def simulate_meds(out: str | Path, cfg) -> tuple[Path, Path, Path]:
    """Simulates a cohort (``cfg``: a ``SimConfig``) and writes it as ``out/meds``,
    ``out/labels`` and ``out/sidecars``. A failure leaves no partial ``out``.

    Raises:
        OutputExistsError: ``out`` exists and is not empty.
    """
    from clinfuse.api import simulate_config

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(
            "output directory is not empty", out, "pass a new --out or remove it"
        )
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        cohort = simulate_config(out / "sidecars", cfg).path
        return split_simulated(cohort, out)
    except BaseException:
        shutil.rmtree(out) if created else _empty(out)
        raise


def _empty(folder: Path) -> None:
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def simulate_meds_main(args) -> int:
    """``clinfuse simulate --format meds``: writes the three folders, prints a summary."""
    from clinfuse.errors import config_errors
    from clinfuse.simulation.simulator import config_from_args

    with config_errors(None, "see clinfuse simulate --help"):
        cfg = config_from_args(args)
    root, labels, sidecars = simulate_meds(args.out, cfg)
    n = pl.scan_parquet(str(labels / "labels.parquet")).select(pl.len()).collect().item()
    print(
        f"wrote MEDS root {root} ({len(list((root / DATA_DIR).rglob('*.parquet')))} shards), "
        f"{n} labels in {labels}, sidecars in {sidecars}"
    )
    print(f"next: clinfuse validate {root} --labels {labels} --sidecars {sidecars}")
    return 0
