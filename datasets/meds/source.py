"""A MEDS root read in place, as a cohort.

A MEDS v0.4 root (``data/**/*.parquet``, ``metadata/codes.parquet``,
``metadata/dataset.json``, ``metadata/subject_splits.parquet``), a label directory in
the MEDS label schema and our sidecar tables (``images.parquet`` + DICOM,
``genotypes.parquet`` + ``markers.parquet``, optionally ``subjects.parquet``) give
the same tables as a cohort directory (``datasets.schema``):

========================  ==================================================
cohort table              read from
========================  ==================================================
``events``                ``data/**/*.parquet``: timed rows of the chosen codes
``labels``                ``LABELS/**/*.parquet`` (subject_id, prediction_time,
                          boolean_value)
``subjects``              every subject of ``data/``; site, ancestry, sex, age
                          from static events (``time`` null) of the codes in
                          ``MedsOptions``, or from ``SIDECARS/subjects.parquet``
``subject_splits``        ``metadata/subject_splits.parquet``
``images`` ...            ``SIDECARS/images.parquet`` ... (paths relative to
                          SIDECARS)
========================  ==================================================

Nothing is copied: every table is a lazy scan. A subject lives in one shard
(MEDS rule), so a subject-range filter skips the other shards through their
Parquet statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import meds
import polars as pl

from clinfuse.datasets import schema
from clinfuse.datasets.meds.options import MedsOptions
from clinfuse.datasets.schema import TIME, TableSpec
from clinfuse.errors import InputError, NotFoundError

DATA_DIR = meds.data_subdirectory  # "data"
CODES_FILE = meds.code_metadata_filepath  # "metadata/codes.parquet"
DATASET_FILE = meds.dataset_metadata_filepath  # "metadata/dataset.json"
SPLITS_FILE = meds.subject_splits_filepath  # "metadata/subject_splits.parquet"
MEDS_SPLITS = (meds.train_split, meds.tuning_split, meds.held_out_split)
_SIDECARS = (schema.IMAGES, schema.GENOTYPES, schema.MARKERS)


def is_meds_root(path: str | Path) -> bool:
    """Whether ``path`` has the MEDS layout: a ``data/`` and a ``metadata/`` folder."""
    root = Path(path)
    return (root / DATA_DIR).is_dir() and (root / "metadata").is_dir()


@dataclass(frozen=True)
class MedsSource:
    """A MEDS root, its label directory and our sidecar tables, read as a cohort.

    Everything that takes a cohort directory takes a ``MedsSource`` too
    (``schema.scan`` and friends dispatch on it). ``os.fspath`` gives the MEDS root;
    ``str`` gives the command-line words that name the same cohort.

    Attributes:
        root: the MEDS root.
        labels: the label directory (None: validation of the root alone).
        sidecars: folder of images/genotypes/markers/subjects tables (default: root).
        options: which codes become channels and subject metadata.
    """

    root: Path
    labels: Path | None = None
    sidecars: Path | None = None
    options: MedsOptions = field(default_factory=MedsOptions, compare=False)

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        words = [str(self.root)]
        if self.labels is not None:
            words.append(f"--labels {self.labels}")
        if self.sidecars is not None and self.sidecars != self.root:
            words.append(f"--sidecars {self.sidecars}")
        return " ".join(words)

    def resolve_paths(self) -> MedsSource:
        """The same source with absolute paths (for processes with another working dir)."""

        def absolute(p: Path | None) -> Path | None:
            return None if p is None else p.resolve()

        return replace(
            self, root=self.root.resolve(), labels=absolute(self.labels),
            sidecars=absolute(self.sidecars),
        )  # fmt: skip

    @property
    def sidecar_dir(self) -> Path:
        """Where images.parquet (and the DICOM paths in it), genotypes and markers live."""
        return self.sidecars if self.sidecars is not None else self.root

    # ------------------------------------------------------------------ files

    def data_paths(self) -> list[Path]:
        """The data shards, sorted (``data/**/*.parquet``)."""
        return sorted((self.root / DATA_DIR).rglob("*.parquet"))

    def label_paths(self) -> list[Path]:
        if self.labels is None:
            return []
        if self.labels.is_file():
            return [self.labels]
        return sorted(self.labels.rglob("*.parquet"))

    def table_paths(self, spec: TableSpec) -> list[Path]:
        """The Parquet file(s) behind a cohort table (``subjects``: the data shards)."""
        if spec.name in ("events", "subjects"):
            return self.data_paths()
        if spec.name == "labels":
            return self.label_paths()
        if spec.name == "subject_splits":
            path = self.root / SPLITS_FILE
            return [path] if path.is_file() else []
        if spec.name == "subjects_sidecar":
            return schema.dir_table_paths(self.sidecar_dir, schema.SUBJECTS)
        return schema.dir_table_paths(self.sidecar_dir, spec)

    def files(self) -> list[Path]:
        """Every Parquet and metadata file a run reads: shards, metadata, labels, sidecar tables."""
        meta = sorted(p for p in (self.root / "metadata").rglob("*") if p.is_file())
        side = [p for spec in (*_SIDECARS, _SUBJECTS_SIDECAR) for p in self.table_paths(spec)]
        return [*self.data_paths(), *meta, *self.label_paths(), *side]

    def where(self, spec: TableSpec) -> str:
        """The file (or folder) to name in a message about ``spec``."""
        if spec.name in ("events", "subjects"):
            return str(self.root / DATA_DIR)
        if spec.name == "labels":
            return str(self.labels) if self.labels is not None else "the label directory"
        if spec.name == "subject_splits":
            return str(self.root / SPLITS_FILE)
        return str(self.sidecar_dir / f"{spec.name}.parquet")

    # ------------------------------------------------------------------ scans

    def scan_table(self, spec: TableSpec) -> pl.LazyFrame:
        """A lazy scan of one cohort table, with the cohort's column names."""
        if spec.name == "events":
            return self.scan_events()
        if spec.name == "subjects":
            return self.scan_subjects()
        if spec.name == "labels":
            return self.scan_labels()
        paths = self.table_paths(spec)
        if not paths:
            raise NotFoundError(
                f"{self.where(spec)}: no such file", fix="see docs/meds.md for the MEDS layout"
            )
        return pl.scan_parquet([str(p) for p in paths])

    def scan_data(self) -> pl.LazyFrame:
        """Every row of ``data/``: subject_id, time, code, numeric_value (null when a shard
        has no such column), one lazy scan per shard so each keeps its own statistics."""
        paths = self.data_paths()
        if not paths:
            raise NotFoundError(f"{self.root / DATA_DIR}: no Parquet shard", fix="see docs/meds.md")
        return pl.concat([_scan_shard(p) for p in paths], how="vertical")

    def scan_events(self) -> pl.LazyFrame:
        """Timed rows of the codes ``options.channels`` selects (static rows have no time)."""
        data = self.scan_data()
        return data.filter(pl.col("time").is_not_null() & self.options.code_filter())

    def scan_labels(self) -> pl.LazyFrame:
        paths = self.label_paths()
        if not paths:
            where = self.labels if self.labels is not None else self.root
            raise NotFoundError(
                f"{where}: no MEDS label files",
                fix="pass --labels DIR: a folder of Parquet files with subject_id, "
                "prediction_time, boolean_value (e.g. from `clinfuse labels --aces`)",
            )
        return pl.concat(
            [
                pl.scan_parquet(str(p)).select(
                    pl.col("subject_id").cast(pl.Int64),
                    pl.col("prediction_time").cast(TIME),
                    "boolean_value",
                )
                for p in paths
            ],
            how="vertical",
        )

    def scan_subjects(self) -> pl.LazyFrame:
        """One row per subject of ``data/``: site, ancestry, sex, age.

        Static events (``time`` null) give the values; a sidecar ``subjects.parquet``
        fills in what they do not say.
        """
        o = self.options
        static = self.scan_data().filter(pl.col("time").is_null())
        facts = static.group_by("subject_id").agg(
            _after(o.site).alias("site"),
            _after(o.ancestry).alias("ancestry"),
            _after(o.sex).alias("sex"),
            pl.col("numeric_value").filter(pl.col("code") == o.age).first().alias("age"),
        )
        # Two light scans (ids alone, static rows alone) rather than one of every column.
        ids = self.scan_data().select("subject_id").unique()
        subjects = ids.join(facts, on="subject_id", how="left")
        side = self.table_paths(_SUBJECTS_SIDECAR)
        if side:
            subjects = _fill_from_sidecar(subjects, pl.scan_parquet([str(p) for p in side]))
        return subjects.sort("subject_id")


_SUBJECTS_SIDECAR = TableSpec("subjects_sidecar", dict(schema.SUBJECTS.required))


def _after(prefix: str) -> pl.Expr:
    """The rest of the first code starting with ``prefix`` (``SITE//A`` -> ``A``)."""
    code = pl.col("code")
    return code.filter(code.str.starts_with(prefix)).first().str.strip_prefix(prefix)


def _scan_shard(path: Path) -> pl.LazyFrame:
    lazy = pl.scan_parquet(str(path))
    names = lazy.collect_schema().names()
    value = pl.col("numeric_value") if "numeric_value" in names else pl.lit(None)
    return lazy.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("time").cast(TIME),
        pl.col("code").cast(pl.String),
        value.cast(pl.Float32).alias("numeric_value"),
    )


def _fill_from_sidecar(subjects: pl.LazyFrame, sidecar: pl.LazyFrame) -> pl.LazyFrame:
    names = sidecar.collect_schema().names()
    wanted = [c for c in ("site", "ancestry", "sex", "age") if c in names]
    dtypes = {"age": pl.Float32}
    side = sidecar.select(
        pl.col("subject_id").cast(pl.Int64),
        *[pl.col(c).cast(dtypes.get(c, pl.String)).alias(f"_{c}") for c in wanted],
    )
    joined = subjects.join(side, on="subject_id", how="left")
    return joined.with_columns(pl.coalesce(c, f"_{c}").alias(c) for c in wanted).drop(
        [f"_{c}" for c in wanted]
    )


# ---------------------------------------------------------------------- opening


def open_cohort(
    cohort: str | Path | MedsSource,
    labels: str | Path | None = None,
    sidecars: str | Path | None = None,
    options: MedsOptions | dict | None = None,
) -> Path | MedsSource:
    """A cohort directory as a Path, or a MEDS root (detected by its layout) as a MedsSource.

    Raises:
        InputError: ``labels`` or ``sidecars`` given for a cohort directory.
    """
    if isinstance(cohort, MedsSource):
        return cohort
    path = Path(cohort)
    if not is_meds_root(path):
        if labels or sidecars:
            raise InputError(
                f"{path}: --labels and --sidecars are for MEDS roots (data/ and metadata/), "
                "and this is not one",
                fix="drop them: a cohort directory has its own labels.parquet",
            )
        return path
    if isinstance(options, dict):
        from clinfuse.config import from_dict

        options = from_dict(MedsOptions, options)
    return MedsSource(
        root=path,
        labels=Path(labels) if labels else None,
        sidecars=Path(sidecars) if sidecars else None,
        options=options or MedsOptions(),
    )


def cohort_for_model(
    cohort: str | Path | MedsSource,
    labels: str | Path | None,
    sidecars: str | Path | None,
    data_config: dict | None,
) -> Path | MedsSource:
    """``open_cohort`` with the MEDS options a trained model was built with
    (``data_config["meds"]`` of its run config or artifact)."""
    options = (data_config or {}).get("meds")
    if isinstance(cohort, MedsSource):
        if options is None:
            return cohort
        from clinfuse.config import from_dict

        return replace(cohort, options=from_dict(MedsOptions, options))
    return open_cohort(cohort, labels, sidecars, options)
