"""Builders for broken cohorts: a tiny trained model once per session, then one
planted defect per case on a fresh copy of its cohort.

Each builder takes a copy of the clean simulated cohort, breaks it in one way and
returns a ``Planted``: the file and 0-based rows ``validate`` must name, and the
subject whose score row must show the defect.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pydicom
import pytest

from clinfuse.datasets.schema import TIME

N_SUBJECTS = 24  # the clean cohort; subject ids 1..N_SUBJECTS
UNKNOWN_CODE = "LAB//NEVER_SEEN"


@dataclass(frozen=True)
class Trained:
    """The clean cohort and the run directory of a model trained on it for one epoch."""

    cohort: Path
    run_dir: Path

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


@dataclass(frozen=True)
class Planted:
    """Where a builder put its defect.

    Attributes:
        file: the cohort file ``validate`` must name (relative path).
        rows: 0-based rows of ``file`` that are broken (empty: file-level defect).
        subject_id: the subject whose samples carry the defect, if one.
        extra: builder-specific facts (e.g. the DICOM path).
    """

    file: str
    rows: tuple[int, ...] = ()
    subject_id: int | None = None
    extra: dict = field(default_factory=dict)


def simulate(cohort: Path, n_subjects: int = N_SUBJECTS, seed: int = 0) -> Path:
    """A clean simulated cohort with 32 px films and 20 markers in 4 groups."""
    from clinfuse.simulation.simulator import SimConfig, simulate_cohort

    cfg = SimConfig(
        n_subjects=n_subjects, image_size=32, seed=seed, n_groups=4, markers_per_group=5,
        n_causal_groups=2, progress=False,
    )  # fmt: skip
    return simulate_cohort(cohort, cfg)


def train_tiny(cohort: Path, run_dir: Path, tiny_run_config) -> Path:
    """Trains the shared tiny demo model (all three modalities, 16-wide) for one epoch."""
    from clinfuse.training.run import train

    train(tiny_run_config(cohort), run_dir)
    return run_dir


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_run_config) -> Trained:
    root = tmp_path_factory.mktemp("reliability")
    cohort = simulate(root / "cohort")
    return Trained(cohort, train_tiny(cohort, root / "run", tiny_run_config))


@pytest.fixture
def cohort_copy(trained: Trained, tmp_path: Path) -> Path:
    """A fresh, writable copy of the clean cohort."""
    return Path(shutil.copytree(trained.cohort, tmp_path / "cohort"))


# ------------------------------------------------------------------------ helpers


def read(cohort: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(cohort / f"{name}.parquet")


def write(cohort: Path, name: str, frame: pl.DataFrame) -> None:
    frame.write_parquet(cohort / f"{name}.parquet")


def latest_film(cohort: Path, nth: int = 0) -> tuple[int, int, Path]:
    """(subject_id, images.parquet row, DICOM path) of the film scoring will use.

    Picks the ``nth`` subject that has exactly one film, taken at or before its
    prediction time, so breaking that file is what its sample sees.
    """
    images = read(cohort, "images").with_row_index("row")
    labels = read(cohort, "labels").select("subject_id", "prediction_time")
    single = images.filter(pl.len().over("subject_id") == 1).join(labels, on="subject_id")
    rec = (
        single.filter(pl.col("time") <= pl.col("prediction_time"))
        .sort("subject_id")
        .row(nth, named=True)
    )
    return rec["subject_id"], rec["row"], cohort / rec["path"]


def _film_case(cohort: Path, nth: int, breaker: Callable[[Path], None]) -> Planted:
    sid, row, path = latest_film(cohort, nth)
    breaker(path)
    return Planted("images.parquet", (row,), sid, {"path": path})


def set_event_value(cohort: Path, rows: list[int], value: float) -> pl.DataFrame:
    """Sets ``numeric_value`` of events ``rows`` to ``value``; returns the new table."""
    events = read(cohort, "events")
    hit = pl.int_range(pl.len()).is_in(rows)
    events = events.with_columns(
        numeric_value=pl.when(hit).then(pl.lit(value, pl.Float32)).otherwise("numeric_value")
    )
    write(cohort, "events", events)
    return events


def measured_rows(cohort: Path) -> np.ndarray:
    """Event rows that carry a numeric value (the rows a NaN can replace)."""
    events = read(cohort, "events").with_row_index("row")
    return events.filter(pl.col("numeric_value").is_not_null())["row"].to_numpy()


def window_row(cohort: Path, subject_id: int, code_prefix: str = "VITAL//HR") -> int:
    """Row of the last ``code_prefix`` event of a subject at or before its prediction time."""
    events = read(cohort, "events").with_row_index("row")
    pt = read(cohort, "labels").filter(pl.col("subject_id") == subject_id)["prediction_time"][0]
    hits = events.filter(
        (pl.col("subject_id") == subject_id)
        & pl.col("code").str.starts_with(code_prefix)
        & (pl.col("time") <= pt)
    )
    return int(hits["row"][-1])


# ----------------------------------------------------------------------- DICOM breakers


def truncate_file(path: Path, keep: float | int = 0.5) -> None:
    """Keeps the first ``keep`` bytes (int) or fraction of the file (float)."""
    data = path.read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    path.write_bytes(data[:n])


def corrupt_header(path: Path) -> None:
    """Keeps the preamble and 'DICM' marker, then random bytes where the header was."""
    data = path.read_bytes()
    noise = np.random.default_rng(0).integers(0, 256, len(data) - 132, dtype=np.uint8)
    path.write_bytes(data[:132] + noise.tobytes())


def drop_pixel_data(path: Path) -> None:
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)


def wrong_photometric(path: Path) -> None:
    """Declares a one-sample grayscale film to be RGB."""
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "RGB"
    ds.save_as(path)


# --------------------------------------------------------------------- cohort builders


def dicom_truncated(cohort: Path) -> Planted:
    return _film_case(cohort, 0, truncate_file)


def dicom_corrupt(cohort: Path) -> Planted:
    return _film_case(cohort, 1, corrupt_header)


def dicom_no_pixels(cohort: Path) -> Planted:
    return _film_case(cohort, 2, drop_pixel_data)


def dicom_wrong_photometric(cohort: Path) -> Planted:
    return _film_case(cohort, 3, wrong_photometric)


def image_missing(cohort: Path) -> Planted:
    return _film_case(cohort, 4, lambda p: p.unlink())


def nan_inf_values(cohort: Path) -> Planted:
    """One NaN and one +inf heart rate in the prediction window of two subjects."""
    nan_row, inf_row = window_row(cohort, 1), window_row(cohort, 2)
    set_event_value(cohort, [nan_row], float("nan"))
    set_event_value(cohort, [inf_row], float("inf"))
    return Planted("events.parquet", (nan_row, inf_row), 1, {"inf_subject": 2})


def time_before_1900(cohort: Path) -> Planted:
    row = window_row(cohort, 3)
    events = read(cohort, "events")
    events = events.with_columns(
        time=pl.when(pl.int_range(pl.len()) == row)
        .then(pl.lit(datetime(1850, 1, 1), TIME))
        .otherwise("time")
    )
    write(cohort, "events", events)
    return Planted("events.parquet", (row,), 3)


def duplicate_timestamps(cohort: Path) -> Planted:
    """A subject's window heart rate repeated at the same time: once identical, once changed."""
    row = window_row(cohort, 4)
    events = read(cohort, "events")
    rec = events.row(row, named=True)
    extra = pl.DataFrame(
        [rec, {**rec, "numeric_value": rec["numeric_value"] + 40.0}], schema=events.schema
    )
    write(cohort, "events", pl.concat([events, extra]))
    return Planted("events.parquet", (events.height, events.height + 1), 4)


def events_after_prediction(cohort: Path) -> Planted:
    """Every event of one subject moved to one hour after its prediction time."""
    sid = 5
    labels = read(cohort, "labels").with_row_index("row")
    label = labels.filter(pl.col("subject_id") == sid).row(0, named=True)
    events = read(cohort, "events")
    offset = pl.col("time") - pl.col("time").min().over("subject_id")
    late = pl.lit(label["prediction_time"], TIME) + offset + pl.duration(hours=1)
    events = events.with_columns(
        time=pl.when(pl.col("subject_id") == sid).then(late).otherwise("time")
    )
    write(cohort, "events", events)
    return Planted("labels.parquet", (label["row"],), sid)


def unknown_codes(cohort: Path) -> Planted:
    """A valued code the model was never trained on, inside one subject's window."""
    row = window_row(cohort, 6)
    events = read(cohort, "events")
    rec = {**events.row(row, named=True), "code": UNKNOWN_CODE, "unit": "u"}
    write(cohort, "events", pl.concat([events, pl.DataFrame([rec], schema=events.schema)]))
    return Planted("events.parquet", (events.height,), 6)


def duplicate_subject_ids(cohort: Path) -> Planted:
    """subjects.parquet lists subject 7 twice (with different sites)."""
    subjects = read(cohort, "subjects")
    first = subjects.with_row_index("row").filter(pl.col("subject_id") == 7).row(0, named=True)
    twin = {k: v for k, v in first.items() if k != "row"} | {"site": "Elsewhere"}
    write(cohort, "subjects", pl.concat([subjects, pl.DataFrame([twin], schema=subjects.schema)]))
    return Planted("subjects.parquet", (first["row"], subjects.height), 7)


def empty_subject(cohort: Path) -> Planted:
    """A labeled subject with no event, no film and no genotype row."""
    sid = 8
    for name in ("events", "images", "genotypes"):
        write(cohort, name, read(cohort, name).filter(pl.col("subject_id") != sid))
    row = read(cohort, "labels").with_row_index("row").filter(pl.col("subject_id") == sid)
    return Planted("labels.parquet", (int(row["row"][0]),), sid)


def wrong_dtype(cohort: Path) -> Planted:
    """events.numeric_value written as strings, one of them not a number."""
    row = window_row(cohort, 9)
    events = read(cohort, "events").with_columns(pl.col("numeric_value").cast(pl.String))
    events = events.with_columns(
        numeric_value=pl.when(pl.int_range(pl.len()) == row)
        .then(pl.lit("n/a"))
        .otherwise("numeric_value")
    )
    write(cohort, "events", events)
    return Planted("events.parquet", (row,), 9)


def empty_cohort(cohort: Path) -> Planted:
    write(cohort, "labels", read(cohort, "labels").clear())
    return Planted("labels.parquet")


def truncated_parquet(cohort: Path, name: str = "events") -> Planted:
    truncate_file(cohort / f"{name}.parquet", 0.6)
    return Planted(f"{name}.parquet")


CASES: dict[str, Callable[[Path], Planted]] = {
    f.__name__: f
    for f in (
        dicom_truncated, dicom_corrupt, dicom_no_pixels, dicom_wrong_photometric, image_missing,
        nan_inf_values, time_before_1900, duplicate_timestamps, events_after_prediction,
        unknown_codes, duplicate_subject_ids, empty_subject, wrong_dtype, empty_cohort,
        truncated_parquet,
    )
}  # fmt: skip
