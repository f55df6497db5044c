"""What a chunk reads from the cohort: the samples table, its window events and images,
the flags known before the model runs, and the frozen-feature store of the image encoder.

The samples table (one row per ``labels`` row, or one per subject at ``--at``) is
small and read whole; the events, genotypes and images are read per chunk with a
subject filter, so memory stays bounded by the chunk size whatever the cohort size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from clinfuse.datasets.images import file_identity
from clinfuse.datasets.samples import check_not_empty
from clinfuse.datasets.schema import LABELS, SUBJECTS, TIME, TableSpec, scan
from clinfuse.encoders.embedding_cache import FileFeatureStore
from clinfuse.errors import InputError
from clinfuse.scoring.failures import CohortUnreadable, is_file_level


def scoring_samples(cohort_dir: str | Path, at: datetime | None = None) -> pl.DataFrame:
    """The samples to score, sorted by subject_id then prediction_time.

    Without ``at``: one sample per row of ``labels.parquet``. With ``at``: one per
    subject of ``subjects.parquet``, all at that time. Columns: subject_id,
    prediction_time, label (null: scoring needs none), site, ancestry, known_subject.

    Raises:
        ValueError: naming the file and row of a null subject_id or prediction_time,
            or naming the file when it has no row.
    """
    with naming_file(cohort_dir, SUBJECTS if at is not None else LABELS):
        keys = _sample_keys(cohort_dir, at)
    _check_keys(cohort_dir, keys, at)
    with naming_file(cohort_dir, SUBJECTS):
        subjects = _subject_info(cohort_dir)
    samples = keys.join(subjects, on="subject_id", how="left", maintain_order="left")
    return samples.with_columns(
        pl.col("known_subject").fill_null(False), label=pl.lit(None, pl.Float32)
    ).sort("subject_id", "prediction_time", maintain_order=True)


@contextmanager
def naming_file(cohort_dir: str | Path, spec: TableSpec) -> Iterator[None]:
    """Re-raises a read or cast failure of one table as a ValueError naming its file.

    Polars messages name the column and the expression, never the file; a nightly
    run's error rows must say which file to fix. A file that cannot be read at all
    raises ``CohortUnreadable`` (not the input rows' fault, see ``scoring.failures``).
    """
    try:
        yield
    except (pl.exceptions.PolarsError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        where = Path(cohort_dir) / f"{spec.name}.parquet"
        raise (CohortUnreadable if is_file_level(err) else InputError)(
            f"{where}: cannot be read ({type(err).__name__}: {first})",
            fix=f"run `clinfuse validate {cohort_dir}`",
        ) from err


def _sample_keys(cohort_dir: str | Path, at: datetime | None) -> pl.DataFrame:
    if at is None:
        lazy = scan(cohort_dir, LABELS).select("subject_id", "prediction_time")
    else:
        lazy = scan(cohort_dir, SUBJECTS).select("subject_id").unique(maintain_order=True)
        lazy = lazy.with_columns(prediction_time=pl.lit(naive_utc(at)))
    return lazy.select(
        pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(TIME)
    ).collect()


def naive_utc(at: datetime) -> datetime:
    return at if at.tzinfo is None else at.astimezone(timezone.utc).replace(tzinfo=None)


def _check_keys(cohort_dir: str | Path, keys: pl.DataFrame, at: datetime | None) -> None:
    name = "subjects.parquet" if at is not None else "labels.parquet"
    check_not_empty(Path(cohort_dir) / name, keys, "subject" if at is not None else "label")
    for column in ("subject_id", "prediction_time"):
        nulls = keys[column].is_null()
        if nulls.any():
            row = int(nulls.arg_max())
            raise InputError(
                f"{Path(cohort_dir) / name}: column {column} is null at row {row}",
                fix=f"run `clinfuse validate {cohort_dir}` and fix the file",
            )


def _subject_info(cohort_dir: str | Path) -> pl.DataFrame:
    lazy = scan(cohort_dir, SUBJECTS)
    names = lazy.collect_schema().names()
    ancestry = pl.col("ancestry") if "ancestry" in names else pl.lit(None)
    return (
        lazy.select(
            pl.col("subject_id").cast(pl.Int64),
            pl.col("site").cast(pl.String),
            ancestry.cast(pl.String).alias("ancestry"),
            known_subject=pl.lit(True),
        )
        .unique("subject_id", keep="first", maintain_order=True)
        .collect()
    )


@dataclass
class ChunkInputs:
    """What one chunk read from the cohort, besides its tensors."""

    windowed: pl.DataFrame
    images: pl.DataFrame
    ids: dict[str, str | None]  # path -> file_identity (None: cannot be stat-ed)
    keys: dict[str, str | None]  # path -> ImageLoader key (None: cannot be stat-ed)
    decoded: dict[str, str | None] = field(default_factory=dict)  # key -> SOPInstanceUID
    headers: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)  # output columns known before
    marks: dict[str, np.ndarray] = field(default_factory=dict)  # the model runs; (B,) flags


def event_flags(windowed: pl.DataFrame, channels: list[str], n_samples: int) -> dict:
    """Per sample: no window event; a measured code that is no channel; a NaN or inf value."""
    counts = np.bincount(windowed["sample"].to_numpy(), minlength=n_samples)
    measured = pl.col("numeric_value").is_finite()
    # Measurements the model ignores; valueless codes (admissions, orders) are not channels.
    unknown = windowed.filter(measured & ~pl.col("code").fill_null("").is_in(channels))
    nan = windowed.filter(pl.col("numeric_value").is_nan() | pl.col("numeric_value").is_infinite())
    return {
        "no_events_in_window": counts == 0,
        "unknown_codes": _any_per_sample(unknown, n_samples),
        "nan_values": _any_per_sample(nan, n_samples),
    }


def _any_per_sample(rows: pl.DataFrame, n_samples: int) -> np.ndarray:
    return np.bincount(rows["sample"].to_numpy(), minlength=n_samples) > 0


def set_embedding_cache(model: torch.nn.Module, cache_dir: str | Path | None) -> None:
    """Uses ``cache_dir`` for frozen image features, or no cache at all when None.

    Artifacts may carry the training run's cache folder in their config; scoring
    never writes there unless asked, so a model directory can stay read-only.
    """
    encoders = getattr(model, "encoders", None)
    encoder = encoders["image"] if encoders is not None and "image" in encoders else None
    config = getattr(encoder, "config", None)
    if config is None or not hasattr(config, "cache_dir"):
        if cache_dir is not None:
            raise InputError("--embedding-cache needs a model with the timm_image encoder")
        return
    if cache_dir is not None and config.transfer != "frozen":
        raise InputError(
            f"--embedding-cache needs a frozen image backbone; this model's transfer is "
            f"{config.transfer!r} (its backbone weights were fine-tuned)"
        )
    config.cache_dir = "" if cache_dir is None else str(cache_dir)


def path_identity(path: str) -> str | None:
    try:
        return file_identity(path)
    except OSError:
        return None


def file_feature_store(
    model: torch.nn.Module, cache_dir: str | Path | None
) -> FileFeatureStore | None:
    """The file-keyed feature store beside the content-hash cache (frozen timm only)."""
    if cache_dir is None:
        return None  # set_embedding_cache has checked the encoder when it is not None
    encoder = model.encoders["image"]
    return FileFeatureStore(cache_dir, encoder.cache_fingerprint())


def sample_features(
    features: int,
    present: Tensor,
    pooled: np.ndarray | None,
    tokens: np.ndarray | None,
    want_tokens: bool,
) -> dict[str, Tensor]:
    """The batch entries of gathered per-sample features (zero rows: no stored file).

    Shapes:
        pooled: (B, F), tokens: (B, N, F) -> image_pooled (B, F), image_tokens (B, N, F),
        image_present (B,) (N = 1 when no file was found, as the encoder does for an
        image-less batch)
    """
    b = len(present)
    out = {"image_present": present}
    if pooled is None:  # no stored file at all
        out["image_pooled"] = torch.zeros(b, features)
        return out | ({"image_tokens": torch.zeros(b, 1, features)} if want_tokens else {})
    out["image_pooled"] = torch.from_numpy(pooled)
    return out | ({"image_tokens": torch.from_numpy(tokens)} if want_tokens else {})


def image_age(images: pl.DataFrame, present: Tensor) -> Tensor:
    age = torch.from_numpy(images["image_age"].fill_null(0.0).to_numpy().astype(np.float32))
    return torch.where(present, age, torch.zeros_like(age))


def image_columns(inputs: ChunkInputs) -> dict[str, list[str | None]]:
    paths = inputs.images["path"].to_list()
    headers = [inputs.headers[p] if p else (None, None) for p in paths]
    return {
        "image_sop_instance_uid": [h[0] for h in headers],
        "image_sha256": [h[1] for h in headers],
    }
