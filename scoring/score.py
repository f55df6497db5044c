"""Batch risk scoring of a cohort, streamed in chunks of subjects to a Parquet dataset.

A hospital runs this every night over its ICU census. The samples table (one row
per ``labels`` row, or one per subject at ``--at``) is small and read whole; the
events, genotypes and images are read per chunk with a subject filter, so memory
stays bounded by the chunk size whatever the cohort size.

``OUT_DIR/``
    _manifest.json       written first: model_id, chunk_size, n_samples, n_chunks,
                         samples_sha256, at, target_prevalence (``--resume`` checks them);
                         ``parts``: sha256 and rows of every committed part
    part-00000.parquet   one file per chunk of subjects, written with Parquet page
    part-00001.parquet   checksums to a temporary name in OUT_DIR, recorded in the
    ...                  manifest, then moved into place (``scoring.parts``)
    .clinfuse.lock       while a run writes: its pid and host (``integrity.locks``)

Output columns (``OUTPUT_SCHEMA``), one row per input sample, always:

    subject_id            Int64
    prediction_time       Datetime(us)
    risk                  Float64  sigmoid(logit / T [+ prior shift]); null on error
    risk_raw              Float64  sigmoid(logit), uncalibrated; null on error
    image_present         Boolean  modalities the model actually used (encoder
    timeseries_present    Boolean  configured and input present and readable)
    genomics_present      Boolean
    ood_score             Float64  Mahalanobis score of the fused embedding
    ood_flag              Boolean  ood_score > the artifact's threshold
    top_modality          String   present modality with the largest |delta|
    top_modality_delta    Float64  logit(all) - logit(without it)
    model_id              String   sha256 of the model weights
    events_sha256         String   sha256 of the sample's window events (see
                                   ``events_digests``)
    image_sop_instance_uid String  SOPInstanceUID of the image used
    image_sha256          String   sha256 of the DICOM file used
    flags                 List(String)  e.g. image_unreadable, no_events_in_window,
                                   unknown_codes, nan_values, unknown_subject, no_modalities
    error                 String   null, or why the sample could not be scored
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from clinfuse.datasets.batch import MODALITIES
from clinfuse.datasets.events import channel_observations, pad_observations
from clinfuse.datasets.images import ImageLoader, file_identity
from clinfuse.datasets.samples import (
    check_not_empty,
    genotype_tensors,
    latest_images,
    sample_tensors,
    scan_events,
    window_events,
)
from clinfuse.datasets.schema import (
    EVENTS,
    GENOTYPES,
    IMAGES,
    LABELS,
    SUBJECTS,
    TIME,
    TableSpec,
    as_cohort,
    has_table,
    scan,
    table_location,
)
from clinfuse.encoders.embedding_cache import FileFeatureStore
from clinfuse.errors import InputError, IntegrityError, NotFoundError, OutputExistsError
from clinfuse.integrity.checksums import cache_failures, temp_file_beside, write_text_atomic
from clinfuse.integrity.locks import output_lock
from clinfuse.scoring.failures import (
    CohortUnreadable,
    ScoredChunk,
    is_file_level,
    is_input_fault,
)
from clinfuse.scoring.ood import MahalanobisOOD
from clinfuse.scoring.parts import (
    MANIFEST,
    PART,
    PartLedger,
    StagedPart,
    failed_rows,
    part_problem,
    recorded_parts,
    remove_temporaries,
    stage_part,
    write_part,  # noqa: F401  (re-exported: benchmarks write parts without a ledger)
)
from clinfuse.scoring.parts import read_scores as _read_parts
from clinfuse.scoring.stops import PauseSignals, ScoringPaused
from clinfuse.training.artifact import META, ModelArtifact, load_artifact
from clinfuse.training.calibration import prior_shift_logit
from clinfuse.training.provenance import file_sha256

MANIFEST_VERSION = 2  # 2: events_sha256 over binary event records
_MATCH_KEYS = (
    "format_version", "model_id", "chunk_size", "n_samples", "n_chunks", "samples_sha256", "at",
    "target_prevalence",
)  # fmt: skip

OUTPUT_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "prediction_time": TIME,
    "risk": pl.Float64(),
    "risk_raw": pl.Float64(),
    "image_present": pl.Boolean(),
    "timeseries_present": pl.Boolean(),
    "genomics_present": pl.Boolean(),
    "ood_score": pl.Float64(),
    "ood_flag": pl.Boolean(),
    "top_modality": pl.String(),
    "top_modality_delta": pl.Float64(),
    "model_id": pl.String(),
    "events_sha256": pl.String(),
    "image_sop_instance_uid": pl.String(),
    "image_sha256": pl.String(),
    "flags": pl.List(pl.String()),
    "error": pl.String(),
}


# ----------------------------------------------------------------------------- samples


def resolve_artifact_dir(path: str | Path) -> Path:
    """The artifact directory: ``path`` itself or ``path/model`` (a run directory).

    Raises:
        NotFoundError: when neither holds ``artifact.json``.
    """
    root = Path(path)
    for candidate in (root, root / "model"):
        if (candidate / META).is_file():
            return candidate
    raise NotFoundError(
        f"not a model artifact nor a run directory (no {META} in it or in model/)", root,
        "pass the run directory of clinfuse train, or its model/ folder",
    )  # fmt: skip


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
        raise (CohortUnreadable if is_file_level(err) else InputError)(
            f"{table_location(cohort_dir, spec)}: cannot be read ({type(err).__name__}: {first})",
            fix=f"run `clinfuse validate {cohort_dir}`",
        ) from err


def _sample_keys(cohort_dir: str | Path, at: datetime | None) -> pl.DataFrame:
    if at is None:
        lazy = scan(cohort_dir, LABELS).select("subject_id", "prediction_time")
    else:
        lazy = scan(cohort_dir, SUBJECTS).select("subject_id").unique(maintain_order=True)
        lazy = lazy.with_columns(prediction_time=pl.lit(_naive_utc(at)))
    return lazy.select(
        pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(TIME)
    ).collect()


def _naive_utc(at: datetime) -> datetime:
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


def samples_fingerprint(samples: pl.DataFrame) -> str:
    """sha256 over the (subject_id, prediction_time in us) pairs, in order, as int64 LE."""
    ids = samples["subject_id"].to_numpy().astype("<i8")
    times = samples["prediction_time"].dt.epoch("us").to_numpy().astype("<i8")
    return hashlib.sha256(np.stack([ids, times], axis=1).tobytes()).hexdigest()


# ------------------------------------------------------------------------------- plan


@dataclass
class ScoringPlan:
    """Samples cut into chunks of whole subjects.

    Attributes:
        samples: the samples table (see ``scoring_samples``).
        bounds: (n_chunks + 1,) row offsets; chunk i is rows bounds[i]:bounds[i+1].
        manifest: what ``_manifest.json`` holds for this run.
        rescored: on resume, the finished parts that failed their check and are
            scored again (part name -> why), set by ``prepare_output``.
        retried: on resume, the parts whose rows failed for a reason other than their
            input and are scored again (part name -> the recorded failure).
    """

    samples: pl.DataFrame
    bounds: list[int]
    manifest: dict[str, Any]
    rescored: dict[str, str] = field(default_factory=dict)
    retried: dict[str, str] = field(default_factory=dict)

    @property
    def n_chunks(self) -> int:
        return len(self.bounds) - 1

    def chunk(self, index: int) -> pl.DataFrame:
        start, stop = self.bounds[index], self.bounds[index + 1]
        return self.samples.slice(start, stop - start)


def chunk_bounds(subject_ids: np.ndarray, chunk_size: int) -> list[int]:
    """Row offsets cutting sorted ``subject_ids`` into chunks of ``chunk_size`` subjects."""
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    if len(subject_ids) == 0:
        return [0]
    starts = np.flatnonzero(np.r_[True, subject_ids[1:] != subject_ids[:-1]])  # per subject
    return [int(s) for s in starts[::chunk_size]] + [len(subject_ids)]


def plan_scoring(
    samples: pl.DataFrame,
    model_id: str,
    chunk_size: int,
    at: datetime | None = None,
    target_prevalence: float | None = None,
) -> ScoringPlan:
    """Chunks and the manifest of a scoring run."""
    bounds = chunk_bounds(samples["subject_id"].to_numpy(), chunk_size)
    manifest = {
        "format_version": MANIFEST_VERSION,
        "model_id": model_id,
        "chunk_size": int(chunk_size),
        "n_samples": samples.height,
        "n_chunks": len(bounds) - 1,
        "samples_sha256": samples_fingerprint(samples),
        "at": None if at is None else _naive_utc(at).isoformat(),
        "target_prevalence": target_prevalence,
        "output_schema": {k: str(v) for k, v in OUTPUT_SCHEMA.items()},
    }
    return ScoringPlan(samples, bounds, manifest)


def prepare_output(out_dir: str | Path, plan: ScoringPlan, resume: bool) -> list[int]:
    """Writes (or checks, on resume) the manifest; returns the chunks still to score.

    On resume a finished part counts as done only when its sha256 matches the one the
    manifest recorded when it was committed; the others are scored again, listed in
    ``plan.rescored`` and in a warning. A part recorded with failed rows (not their
    input's fault) is scored again too, listed in ``plan.retried``.

    Raises:
        OutputExistsError: OUT_DIR already holds a run and ``resume`` is False.
        InputError: on resume, naming the manifest fields that differ.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    existing = manifest_path.is_file() or any(out.glob("part-*.parquet"))
    if existing and not resume:
        raise OutputExistsError(
            "the output directory already holds a scoring run", out,
            "pass --resume to finish it or use a new --out",
        )  # fmt: skip
    records: dict[str, dict[str, Any]] = {}
    if resume and manifest_path.is_file():
        records = recorded_parts(_check_manifest(manifest_path, plan.manifest))
    else:
        _write_json_atomic(manifest_path, plan.manifest)
    remove_temporaries(out)
    pending = [i for i in range(plan.n_chunks) if not _part_done(out, i, records, plan)]
    _warn_rescored(out, plan.rescored)
    return pending


def _check_manifest(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The manifest at ``path``, when it describes the same run as ``expected``."""
    try:
        found = json.loads(path.read_text())
    except ValueError as err:
        raise IntegrityError(
            f"manifest is not valid JSON ({err})", path,
            "score into a new --out (the parts cannot be checked without it)",
        ) from err  # fmt: skip
    diff = [k for k in _MATCH_KEYS if found.get(k) != expected.get(k)]
    if diff:
        details = "; ".join(f"{k}: {found.get(k)!r} there, {expected.get(k)!r} now" for k in diff)
        raise InputError(
            f"cannot resume, the run differs ({details})", path,
            "score with the same model, cohort and options, or use a new --out",
        )  # fmt: skip
    return found


def _part_done(out: Path, index: int, records: dict[str, Any], plan: ScoringPlan) -> bool:
    """Whether chunk ``index`` has a part whose bytes are the ones committed."""
    path = out / PART.format(index)
    if not path.is_file():
        return False
    record = records.get(path.name)
    problem = part_problem(path, record)
    if problem is not None:
        plan.rescored[path.name] = problem
        return False
    if failed_rows(record):
        plan.retried[path.name] = str(record.get("failure"))
        return False
    return True


def _warn_rescored(out: Path, rescored: dict[str, str]) -> None:
    if rescored:
        first, why = next(iter(rescored.items()))
        warnings.warn(
            f"{out}: {len(rescored)} finished part(s) failed their check and are scored "
            f"again (first: {first}: {why})",
            stacklevel=3,
        )


def _write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2))  # no temporary left on Ctrl-C


# ------------------------------------------------------------------------ fingerprints

# One fixed-size record per window event; a sample's digest is sha256 of its records.
EVENT_RECORD = np.dtype([("time", "<i8"), ("code", "S16"), ("null", "u1"), ("value", "<u4")])
_NAN_BITS = np.uint32(0x7FC00000)


def events_digests(windowed: pl.DataFrame, n_samples: int) -> list[str]:
    """sha256 per sample of its window events, stable across runs, chunkings and machines.

    Canonical bytes: one 29-byte little-endian ``EVENT_RECORD`` per event, ``time``
    (int64 microseconds since the epoch), ``code`` (the first 16 bytes of
    sha256(code as UTF-8); null counts as ""), ``null`` (1 when numeric_value is
    null) and ``value`` (float32 bits; every NaN as 0x7FC00000; 0 when null). A
    sample's records are sorted by (time, code, null, value), as unsigned byte and
    integer comparisons, and concatenated. A sample with no window event gets
    sha256(b""). Everything is vectorized: one sort for the chunk, then one
    ``hashlib`` call per sample over a slice of one buffer.

    Args:
        windowed: ``sample`` (row index), ``time``, ``code``, ``numeric_value``.
    """
    sample = windowed["sample"].to_numpy()
    records, minor = _event_records(windowed)
    order = _record_order(sample, np.ascontiguousarray(records["time"]), minor)
    buffer = memoryview(np.take(records, order).view(np.uint8))  # take: no per-field copy
    rows = np.searchsorted(sample[order], np.arange(n_samples + 1))  # (B + 1,) bounds
    bounds = (rows * EVENT_RECORD.itemsize).tolist()
    pairs = zip(bounds[:-1], bounds[1:], strict=True)
    return [hashlib.sha256(buffer[a:b]).hexdigest() for a, b in pairs]


def _event_records(windowed: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The unsorted records and an int64 key ordering (code, null, value) within a time."""
    values = windowed["numeric_value"].cast(pl.Float32)
    null = values.is_null().to_numpy()
    raw = values.fill_null(0.0).to_numpy()
    bits = np.where(null, 0, np.where(np.isnan(raw), _NAN_BITS, raw.view(np.uint32)))
    code = windowed["code"].fill_null("")
    digests = sorted((hashlib.sha256(c.encode()).digest()[:16], c) for c in code.unique())
    rank = code.cast(pl.Enum([c for _, c in digests])).to_physical().to_numpy()  # digest order
    records = np.empty(len(code), EVENT_RECORD)
    records["time"] = windowed["time"].dt.epoch("us").to_numpy()
    records["code"] = np.array([d for d, _ in digests], dtype="S16")[rank]
    records["null"] = null
    records["value"] = bits
    minor = (rank.astype(np.int64) << 33) | (null.astype(np.int64) << 32) | bits.astype(np.int64)
    return records, minor


def _record_order(sample: np.ndarray, time: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """Argsort by (sample, time, minor): two int64 sorts, or a lexsort when keys do not pack.

    Equal keys mean equal records, so the sort need not be stable.
    """
    if len(time) == 0:
        return np.zeros(0, dtype=np.int64)
    rel = time - time.min()
    time_bits = int(rel.max(initial=0)).bit_length()
    if int(sample.max(initial=0)).bit_length() + time_bits > 62:
        return np.lexsort((minor, time, sample))
    major = (sample << time_bits) | rel
    first = np.argsort(major)  # by (sample, time)
    major = major[first]
    group = np.cumsum(np.r_[False, major[1:] != major[:-1]])  # dense rank of (sample, time)
    minor_bits = int(minor.max(initial=0)).bit_length()
    if int(group.max(initial=0)).bit_length() + minor_bits > 62:
        return np.lexsort((minor, time, sample))
    return first[np.argsort((group << minor_bits) | minor[first])]


def _event_flags(windowed: pl.DataFrame, channels: list[str], n_samples: int) -> dict:
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


def image_header(path: str) -> tuple[str | None, str | None]:
    """(SOPInstanceUID, file sha256) of a DICOM file; (None, None) when unreadable.

    Only SOPInstanceUID is parsed (``specific_tags``, ``stop_before_pixels``): no
    patient identifier is ever read.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        uid = ds.get("SOPInstanceUID")
        return (None if uid is None else str(uid)), file_sha256(path)
    except Exception:  # noqa: BLE001 - unreadable header: the image row is flagged
        return None, None


Header = tuple[str | None, str | None]  # (SOPInstanceUID, file sha256)


class HeaderStore:
    """Image headers keyed by ``file_identity``, in JSON-lines shards read once.

    The key is the identity (resolved path, size, mtime) under which ``ImageLoader``
    caches the pixels, so a fingerprint always describes the file whose pixels were
    used. Each ``put`` writes one shard ``<uuid>.jsonl`` (a temporary name, then
    ``os.replace``), so concurrent runs need no locks; a lookup that misses re-reads
    the folder for shards written since. Unreadable files are never stored (they are
    retried next run). ``folder`` None: nothing is stored, every lookup misses.
    """

    def __init__(self, folder: str | Path | None) -> None:
        self.dir = None if folder is None else Path(folder)
        self._entries: dict[str, list] = {}
        self._loaded: set[str] = set()

    def lookup(self, identities: list[str]) -> dict[str, Header]:
        """The stored headers among ``identities``."""
        if self.dir is None:
            return {}
        if any(i not in self._entries for i in identities):
            self._refresh()
        return {i: tuple(self._entries[i]) for i in identities if i in self._entries}

    def put(self, headers: dict[str, Header]) -> None:
        """Stores ``identity -> header`` for the readable ones (sha256 not None)."""
        lines = [json.dumps([i, *h]) for i, h in headers.items() if h[1] is not None]
        if self.dir is None or not lines:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{uuid.uuid4().hex}.jsonl"
        fd, tmp = temp_file_beside(self.dir, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, self.dir / name)
        self._loaded.add(name)
        self._entries.update({i: list(h) for i, h in headers.items() if h[1] is not None})

    def _refresh(self) -> None:
        if not self.dir.is_dir():
            return
        for shard in sorted(self.dir.glob("*.jsonl")):
            if shard.name not in self._loaded:
                self._loaded.add(shard.name)
                for line in shard.read_text().splitlines():
                    identity, uid, sha = json.loads(line)
                    self._entries[identity] = [uid, sha]


def decoded_image_header(path: str, uid: str | None) -> Header:
    """(uid, file sha256) of a file whose pixels were just decoded (``uid`` from that
    parse, so the header is not read a second time); (None, None) when unreadable."""
    try:
        return uid, file_sha256(path)
    except OSError:
        return None, None


# ----------------------------------------------------------------------------- scoring


@dataclass
class _ChunkInputs:
    """What one chunk read from the cohort, besides its tensors."""

    windowed: pl.DataFrame
    images: pl.DataFrame
    ids: dict[str, str | None]  # path -> file_identity (None: cannot be stat-ed)
    keys: dict[str, str | None]  # path -> ImageLoader key (None: cannot be stat-ed)
    decoded: dict[str, str | None] = field(default_factory=dict)  # key -> SOPInstanceUID
    headers: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)  # output columns known before
    marks: dict[str, np.ndarray] = field(default_factory=dict)  # the model runs; (B,) flags


@dataclass
class _Prepared:
    """A chunk's inputs and batch, or the error that building them raised."""

    inputs: _ChunkInputs | None = None
    batch: dict[str, Any] | None = None
    error: BaseException | None = None


def _submit_next(pool: Any, scorer: ChunkScorer, queue: Iterator[tuple[int, pl.DataFrame]]):
    """(index, samples, future of ``scorer.prepare``) for the next chunk, or None at the end."""
    nxt = next(queue, None)
    if nxt is None:
        return None
    return nxt[0], nxt[1], pool.submit(scorer.prepare, nxt[1])


class ChunkScorer:
    """Scores chunks of samples with one loaded artifact; never raises on bad subjects.

    Args:
        artifact: the loaded model artifact (its model is in eval mode).
        cohort_dir: the cohort to read.
        target_prevalence: deployment base rate for prior-shift recalibration (None = off).
        batch_size: samples per forward pass (bounds activation memory).
        image_cache: decoded-pixel cache folder of ``ImageLoader`` (None = memory, per chunk).
        embedding_cache: frozen-backbone feature cache folder for the timm image encoder.
        device: torch device for the forward passes.
        threads: torch intra-op threads for this process (None = leave as is). One is
            fastest for these small matrices on a shared machine; scale out with
            processes or Ray actors instead.
    """

    def __init__(
        self,
        artifact: ModelArtifact,
        cohort_dir: str | Path,
        target_prevalence: float | None = None,
        batch_size: int = 256,
        image_cache: str | Path | None = None,
        embedding_cache: str | Path | None = None,
        device: str | torch.device = "cpu",
        threads: int | None = 1,
    ) -> None:
        if threads is not None:
            if threads < 1:
                raise InputError(f"threads must be >= 1, got {threads}")
            torch.set_num_threads(int(threads))
        self.artifact = artifact
        self.cohort_dir = as_cohort(cohort_dir)
        self.spec = artifact.spec
        self.target_prevalence = target_prevalence
        self.batch_size = int(batch_size)
        self.image_cache = image_cache
        self.device = torch.device(device)
        self.model = artifact.model.to(self.device).eval()
        self.ood = MahalanobisOOD(**artifact.ood) if artifact.ood else None
        self.has_genotypes = has_table(self.cohort_dir, GENOTYPES)
        _set_embedding_cache(self.model, embedding_cache)
        self.features = _file_feature_store(self.model, embedding_cache)
        self.headers = HeaderStore(None if image_cache is None else Path(image_cache) / "headers")

    def score(self, samples: pl.DataFrame) -> pl.DataFrame:
        """One output row per row of ``samples``, in order (see ``OUTPUT_SCHEMA``).

        A failing chunk is retried subject by subject; a subject that still fails
        gets error rows (risk null) carrying the reason.
        """
        return self.score_chunk(samples).rows

    def score_chunk(self, samples: pl.DataFrame) -> ScoredChunk:
        """``score``, with the count of rows that failed for a reason other than their
        input (``scoring.failures``): a chunk with any is not done."""
        return self.finish_chunk(samples, self.prepare(samples))

    def score_strict(self, samples: pl.DataFrame) -> pl.DataFrame:
        """Scores ``samples``; raises on the first subject whose inputs cannot be built."""
        inputs, batch = self._prepare_strict(samples)
        return self._forward_rows(samples, inputs, batch)

    def prepare(self, samples: pl.DataFrame) -> _Prepared:
        """Reads a chunk and builds its batch (the I/O half of ``score``); never raises.

        Safe to run in a second thread while ``finish`` runs the model on the
        previous chunk (see ``score_chunks``).
        """
        try:
            with torch.no_grad():
                return _Prepared(*self._prepare_strict(samples))
        except Exception as err:  # noqa: BLE001 - finish retries subject by subject
            return _Prepared(error=err)

    def finish(self, samples: pl.DataFrame, prepared: _Prepared) -> pl.DataFrame:
        """The model half of ``score``: forward passes and output rows of a prepared chunk."""
        return self.finish_chunk(samples, prepared).rows

    def finish_chunk(self, samples: pl.DataFrame, prepared: _Prepared) -> ScoredChunk:
        """``finish`` with its failed-row count (see ``score_chunk``).

        A cohort file that cannot be read fails every row of the chunk at once; any
        other error is narrowed down subject by subject.
        """
        try:
            if prepared.error is not None:
                raise prepared.error
            return ScoredChunk(self._forward_rows(samples, prepared.inputs, prepared.batch))
        except Exception as err:  # noqa: BLE001 - isolate the bad subject(s), keep going
            if isinstance(err, CohortUnreadable) or samples["subject_id"].n_unique() <= 1:
                return self._error_chunk(samples, err)
            groups = samples.partition_by("subject_id", maintain_order=True)
            return ScoredChunk.concat([self.score_chunk(group) for group in groups])

    def _error_chunk(self, samples: pl.DataFrame, err: BaseException) -> ScoredChunk:
        rows = error_rows(samples, err, self.artifact.model_id)
        if is_input_fault(err):
            return ScoredChunk(rows)
        return ScoredChunk(rows, rows.height, rows["error"][0] if rows.height else None)

    def score_chunks(
        self, chunks: Iterable[tuple[int, pl.DataFrame]], prefetch: bool = True
    ) -> Iterator[tuple[int, pl.DataFrame]]:
        """Scores ``(index, samples)`` chunks in order, yielding ``(index, rows)``
        (``scored_chunks`` without the failed-row counts)."""
        return ((index, scored.rows) for index, scored in self.scored_chunks(chunks, prefetch))

    def scored_chunks(
        self, chunks: Iterable[tuple[int, pl.DataFrame]], prefetch: bool = True
    ) -> Iterator[tuple[int, ScoredChunk]]:
        """Scores ``(index, samples)`` chunks in order, yielding ``(index, ScoredChunk)``.

        With ``prefetch``, one helper thread reads and builds chunk i + 1 (polars,
        numpy, DICOM decoding: mostly outside the GIL) while this thread runs the
        model on chunk i, so a second core is used when there is one. Rows are the
        same as with ``score``.
        """
        if not prefetch:
            yield from ((index, self.score_chunk(samples)) for index, samples in chunks)
            return
        from concurrent.futures import ThreadPoolExecutor

        queue = iter(chunks)
        with ThreadPoolExecutor(1, thread_name_prefix="clinfuse-prefetch") as pool:
            ahead = _submit_next(pool, self, queue)
            while ahead is not None:
                index, samples, future = ahead
                prepared = future.result()
                ahead = _submit_next(pool, self, queue)
                yield index, self.finish_chunk(samples, prepared)

    def _prepare_strict(self, samples: pl.DataFrame) -> tuple[_ChunkInputs, dict[str, Any]]:
        """Inputs, batch, and the fingerprints and flags that need no model output."""
        inputs = self._read_inputs(samples)
        batch = self._batch(samples, inputs)
        inputs.headers = self._headers(inputs)
        inputs.columns = {
            "events_sha256": events_digests(inputs.windowed, samples.height),
            **_image_columns(inputs),
        }
        inputs.marks = self._input_marks(samples, inputs, batch)
        return inputs, batch

    def _forward_rows(
        self, samples: pl.DataFrame, inputs: _ChunkInputs, batch: dict[str, Any]
    ) -> pl.DataFrame:
        outputs = predict(self.model, batch, self.batch_size, self.device)
        return self._rows(samples, inputs, batch, outputs)

    def _read_inputs(self, samples: pl.DataFrame) -> _ChunkInputs:
        with naming_file(self.cohort_dir, EVENTS):
            events = scan_events(self.cohort_dir, samples["subject_id"]).collect()
        windowed = window_events(events, samples, self.spec.window_hours).collect()
        with naming_file(self.cohort_dir, IMAGES):
            images = latest_images(self.cohort_dir, samples)
        paths = images["path"].drop_nulls().unique(maintain_order=True).to_list()
        ids = {p: _identity(p) for p in paths}  # one stat and resolve per file
        loader = ImageLoader(self.spec.image_size)
        keys = {p: loader.key(p, i) if i else None for p, i in ids.items()}
        return _ChunkInputs(windowed, images, ids, keys)

    def _headers(self, inputs: _ChunkInputs) -> dict[str, Header]:
        """(SOPInstanceUID, sha256) per image file: from the header store, from the
        parse that decoded the file for this chunk, or read (``image_header``)."""
        ids = {p: i for p, i in inputs.ids.items() if i is not None}
        known = self.headers.lookup(list(ids.values()))
        found: dict[str, Header] = {}  # identity -> header, read for this chunk
        for path, identity in ids.items():
            key = inputs.keys[path]
            if identity in known:
                continue
            if key in inputs.decoded:
                found[identity] = decoded_image_header(path, inputs.decoded[key])
            else:
                found[identity] = image_header(path)
        self.headers.put(found)
        known |= found
        return {p: known[i] if i is not None else (None, None) for p, i in inputs.ids.items()}

    def _batch(self, samples: pl.DataFrame, inputs: _ChunkInputs) -> dict[str, Any]:
        obs = channel_observations(inputs.windowed.lazy(), self.spec)
        batch: dict[str, Any] = pad_observations(obs, samples.height, self.spec)
        genotypes = scan(self.cohort_dir, GENOTYPES) if self.has_genotypes else None
        with naming_file(self.cohort_dir, GENOTYPES):
            batch.update(genotype_tensors(genotypes, samples, self.spec.markers))
        batch.update(sample_tensors(samples, self.spec.sites, self.spec.ancestries))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unreadable images become flags
            batch.update(self._images(inputs))
        batch["image_age"] = _image_age(inputs.images, batch["image_present"])
        return batch

    def _images(self, inputs: _ChunkInputs) -> dict[str, Tensor]:
        """Pixels, or the frozen backbone's stored features when the store is on.

        Shapes:
            -> image (B, 1, S, S) | image_pooled (B, F) and image_tokens (B, N, F);
            image_present (B,)
        """
        paths = inputs.images["path"].to_list()
        keys = [inputs.keys[p] if p else None for p in paths]
        loader = ImageLoader(self.spec.image_size, self.image_cache)
        inputs.decoded = loader.decoded_uids  # filled as files are decoded
        if self.features is None:
            image, present = loader.load_many(paths, keys)
            return {"image": image, "image_present": present}
        return self._stored_features(loader, inputs.keys, keys)

    def _stored_features(
        self, loader: ImageLoader, by_path: dict[str, str | None], keys: list[str | None]
    ) -> dict[str, Tensor]:
        """Per-sample features from the file-keyed store; missing files are decoded,
        encoded (through the content-hash cache) and stored first."""
        tokens = bool(self.model.fusion.uses_tokens)
        unique = list(dict.fromkeys(k for k in keys if k is not None))
        found = self.features.contains(unique, tokens)
        missing = [k for k, hit in zip(unique, found, strict=True) if not hit]
        if missing:
            paths = {k: p for p, k in by_path.items() if k is not None}
            self._store_features(loader, [paths[k] for k in missing], missing, tokens)
        present, pooled, toks = self.features.lookup(keys, tokens)  # one row per sample
        features = self._image_encoder().num_features
        return _sample_features(features, torch.from_numpy(present), pooled, toks, tokens)

    def _store_features(
        self, loader: ImageLoader, paths: list[str], keys: list[str], tokens: bool
    ) -> None:
        encoder = self._image_encoder()
        for lo in range(0, len(paths), self.batch_size):
            part = slice(lo, lo + self.batch_size)
            images, present = loader.load_many(paths[part], keys[part])  # (b, 1, S, S)
            ok = present.nonzero().squeeze(1).tolist()  # unreadable files are not stored
            if not ok:
                continue
            pooled, toks = encoder.frozen_features(images[ok].to(self.device), tokens)
            self.features.put(
                [keys[part][i] for i in ok],
                pooled.cpu().numpy(),
                None if toks is None else toks.cpu().numpy(),
            )

    def _image_encoder(self) -> Any:
        return self.model.encoders["image"]

    def _rows(
        self,
        samples: pl.DataFrame,
        inputs: _ChunkInputs,
        batch: dict[str, Any],
        outputs: dict[str, np.ndarray],
    ) -> pl.DataFrame:
        logit = outputs["logit"].astype(np.float64)
        top, top_delta = _top_modality(outputs)
        columns = {
            "subject_id": samples["subject_id"],
            "prediction_time": samples["prediction_time"],
            "risk": self._calibrated(logit),
            "risk_raw": _sigmoid(logit),
            **{f"{m}_present": outputs[f"present_{m}"] for m in MODALITIES},
            **self._ood_columns(outputs["fused"]),
            "top_modality": top,
            "top_modality_delta": top_delta,
            "model_id": pl.repeat(self.artifact.model_id, samples.height, eager=True),
            **inputs.columns,
            "flags": _flags(inputs.marks, outputs),
            "error": pl.repeat(None, samples.height, dtype=pl.String, eager=True),
        }
        return pl.DataFrame(columns, schema=OUTPUT_SCHEMA)

    def _calibrated(self, logit: np.ndarray) -> np.ndarray:
        z = self.artifact.calibrated_logit(logit)
        if self.target_prevalence is not None:
            z = prior_shift_logit(z, self.artifact.train_prevalence, self.target_prevalence)
        return _sigmoid(z)

    def _ood_columns(self, fused: np.ndarray) -> dict[str, Any]:
        if self.ood is None:
            return {"ood_score": [None] * len(fused), "ood_flag": [None] * len(fused)}
        score = self.ood.score(fused)
        return {"ood_score": score, "ood_flag": score > self.ood.threshold}

    def _input_marks(
        self, samples: pl.DataFrame, inputs: _ChunkInputs, batch: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        """The (B,) flags known before the forward pass, in output order."""
        has_path = inputs.images["path"].is_not_null().to_numpy()
        marks = _event_flags(inputs.windowed, self.spec.channels, samples.height)
        marks["image_unreadable"] = has_path & ~batch["image_present"].numpy()
        marks["unknown_subject"] = ~samples["known_subject"].to_numpy()
        return marks


def _flags(marks: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> pl.Series:
    used = np.stack([outputs[f"present_{m}"] for m in MODALITIES], axis=1)  # (B, 3)
    return flag_lists({**marks, "no_modalities": ~used.any(axis=1)})


def flag_lists(marks: dict[str, np.ndarray]) -> pl.Series:
    """Per row, the names whose (B,) bool array is True there, in ``marks`` order."""
    table = pl.DataFrame({name: np.asarray(hit, dtype=bool) for name, hit in marks.items()})
    named = [pl.when(pl.col(name)).then(pl.lit(name)) for name in marks]
    return table.select(pl.concat_list(named).list.drop_nulls().alias("flags")).to_series()


def _set_embedding_cache(model: torch.nn.Module, cache_dir: str | Path | None) -> None:
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


def _identity(path: str) -> str | None:
    try:
        return file_identity(path)
    except OSError:
        return None


def _file_feature_store(
    model: torch.nn.Module, cache_dir: str | Path | None
) -> FileFeatureStore | None:
    """The file-keyed feature store beside the content-hash cache (frozen timm only)."""
    if cache_dir is None:
        return None  # _set_embedding_cache has checked the encoder when it is not None
    encoder = model.encoders["image"]
    return FileFeatureStore(cache_dir, encoder.cache_fingerprint())


def _sample_features(
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


def _image_age(images: pl.DataFrame, present: Tensor) -> Tensor:
    age = torch.from_numpy(images["image_age"].fill_null(0.0).to_numpy().astype(np.float32))
    return torch.where(present, age, torch.zeros_like(age))


def _image_columns(inputs: _ChunkInputs) -> dict[str, list[str | None]]:
    paths = inputs.images["path"].to_list()
    headers = [inputs.headers[p] if p else (None, None) for p in paths]
    return {
        "image_sop_instance_uid": [h[0] for h in headers],
        "image_sha256": [h[1] for h in headers],
    }


def _top_modality(outputs: dict[str, np.ndarray]) -> tuple[list[str | None], np.ndarray]:
    deltas = np.stack([outputs[f"delta_{m}"] for m in MODALITIES], axis=1)  # (B, 3)
    used = np.stack([outputs[f"present_{m}"] for m in MODALITIES], axis=1)  # (B, 3)
    best = np.where(used, np.abs(deltas), -1.0).argmax(axis=1)  # (B,)
    any_used = used.any(axis=1)
    names = [MODALITIES[i] if ok else None for i, ok in zip(best, any_used, strict=True)]
    value = np.where(any_used, deltas[np.arange(len(best)), best], np.nan)
    return names, value


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))  # overflow-free logistic


def error_rows(samples: pl.DataFrame, err: BaseException, model_id: str) -> pl.DataFrame:
    """Rows with risk null and ``error`` naming the subject and the reason."""
    n = samples.height
    subject = samples["subject_id"][0] if n else None
    reason = f"subject_id {subject}: {type(err).__name__}: {err}"
    filled = {"model_id": model_id, "flags": [], "error": reason}
    columns = {
        name: samples[name] if name in samples.columns else [filled.get(name)] * n
        for name in OUTPUT_SCHEMA
    }
    return pl.DataFrame(columns, schema=OUTPUT_SCHEMA)


# ---------------------------------------------------------------------------- forward


@torch.no_grad()
def predict(
    model: torch.nn.Module, batch: dict[str, Any], batch_size: int, device: torch.device
) -> dict[str, np.ndarray]:
    """Logit, fused embedding, used modalities and leave-one-out deltas per sample.

    The encoders run once per mini-batch; each modality is then left out by
    re-fusing (``FusionModel.fuse_variants``: one token build for all variants).

    Returns:
        ``logit (B,)``, ``fused (B, D)``, and per modality in ``MODALITIES``:
        ``present_m (B,)`` bool (False when the model has no encoder for it) and
        ``delta_m (B,)`` = logit(all) - logit(without m), NaN where not used.
    """
    n = int(batch["label"].shape[0])
    parts = [
        _predict_one(model, _to(_slice(batch, lo, min(lo + batch_size, n)), device))
        for lo in range(0, n, max(1, batch_size))
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _predict_one(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    embeddings, tokens = model.encode(batch)
    used = [m for m in MODALITIES if m in embeddings]
    runs = model.fuse_variants(embeddings, tokens, [(), *[[m] for m in used]])
    logit = runs["logit"][:, 0]  # (B,) all modalities; column 1 + i leaves used[i] out
    b = logit.shape[0]
    out = {"logit": logit, "fused": runs["fused"][:, 0]}
    for m in MODALITIES:
        if m not in used:
            out[f"present_{m}"] = torch.zeros(b, dtype=torch.bool)
            out[f"delta_{m}"] = torch.full((b,), float("nan"))
            continue
        present = runs["embeddings"][m][1].bool()
        left_out = runs["logit"][:, 1 + used.index(m)]
        out[f"present_{m}"] = present
        out[f"delta_{m}"] = (logit - left_out).masked_fill(~present, float("nan"))
    return {k: v.detach().float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
            for k, v in out.items()}  # fmt: skip


def _slice(batch: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
    out = {k: v[lo:hi] for k, v in batch.items() if k != "confounds"}
    out["confounds"] = {k: v[lo:hi] for k, v in batch["confounds"].items()}
    return out


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    out = {k: v.to(device) for k, v in batch.items() if k != "confounds"}
    out["confounds"] = {k: v.to(device) for k, v in batch["confounds"].items()}
    return out


# ------------------------------------------------------------------------------ runs


def plan_run(
    model: str | Path,
    cohort_dir: str | Path,
    chunk_size: int = 1000,
    at: datetime | None = None,
    target_prevalence: float | None = None,
) -> tuple[ModelArtifact, ScoringPlan]:
    """Loads the artifact and plans the chunks; writes nothing."""
    if target_prevalence is not None and not 0.0 < target_prevalence < 1.0:
        raise InputError(f"target_prevalence must be in (0, 1), got {target_prevalence}")
    artifact = load_artifact(resolve_artifact_dir(model))
    samples = scoring_samples(cohort_dir, at)
    return artifact, plan_scoring(samples, artifact.model_id, chunk_size, at, target_prevalence)


def open_run(
    model: str | Path,
    cohort_dir: str | Path,
    out_dir: str | Path,
    chunk_size: int = 1000,
    at: datetime | None = None,
    resume: bool = False,
    target_prevalence: float | None = None,
) -> tuple[ModelArtifact, ScoringPlan, list[int]]:
    """Loads the artifact, plans the chunks, writes or checks the manifest.

    Returns:
        The artifact, the plan, and the indices of chunks still to score.
    """
    artifact, plan = plan_run(model, cohort_dir, chunk_size, at, target_prevalence)
    return artifact, plan, prepare_output(out_dir, plan, resume)


def score_cohort(
    model: str | Path,
    cohort_dir: str | Path,
    out_dir: str | Path,
    at: datetime | None = None,
    chunk_size: int = 1000,
    resume: bool = False,
    target_prevalence: float | None = None,
    batch_size: int = 256,
    image_cache: str | Path | None = None,
    embedding_cache: str | Path | None = None,
    progress: bool = True,
    threads: int | None = 1,
    workers: int = 1,
    prefetch: bool = False,
) -> dict[str, Any]:
    """Scores a cohort chunk by chunk, in-process or in local worker processes; returns a
    run summary.

    Args:
        model: an artifact directory or a run directory holding ``model/``.
        cohort_dir: the cohort (labels.parquet gives the samples unless ``at``).
        out_dir: the output Parquet dataset (see the module docstring).
        at: score every subject of subjects.parquet at this time instead.
        chunk_size: subjects per chunk (and per part file).
        resume: skip finished chunks of an interrupted run with the same manifest.
        target_prevalence: deployment base rate for prior-shift recalibration.
        batch_size: samples per forward pass.
        image_cache: decoded-pixel cache folder.
        embedding_cache: frozen-backbone feature cache folder.
        progress: show a progress bar over chunks.
        threads: torch intra-op threads (see ``ChunkScorer``).
        workers: local processes scoring chunks in parallel (1 = in this process). Each
            loads the model once and writes its own part files atomically, so resume
            and the output are the same as with one process.
        prefetch: in-process, read and build the next chunk in a helper thread while
            the model runs on this one (``ChunkScorer.score_chunks``). Off by default:
            on a 2-core machine shared with other jobs it did not raise throughput.

    Rows that failed for a reason other than their input (``scoring.failures``) are
    counted in ``failed_rows``; their chunks are scored again by ``resume``.

    Raises:
        ScoringPaused: SIGINT or SIGTERM stopped the run; every committed part is valid.
    """
    start, failed_before = time.perf_counter(), cache_failures()
    # One writer per OUT_DIR, held until every part is in; signals wait for a commit.
    with output_lock(out_dir), PauseSignals() as stop, paused_as(stop, out_dir) as run:
        artifact, plan, pending = open_run(
            model, cohort_dir, out_dir, chunk_size, at, resume, target_prevalence
        )
        ledger = run.ledger = PartLedger(out_dir, guard=stop.held)
        run.plan, run.pending = plan, pending
        if workers > 1 and len(pending) > 1:
            options = (str(resolve_artifact_dir(model)), str(cohort_dir), str(out_dir),
                       target_prevalence, batch_size, image_cache, embedding_cache, threads)  # fmt: skip
            tally, failed = _score_in_processes(plan, pending, workers, options, progress, ledger)
        else:
            scorer = ChunkScorer(
                artifact, cohort_dir, target_prevalence, batch_size, image_cache,
                embedding_cache, threads=threads,
            )  # fmt: skip
            tally = _score_here(scorer, plan, pending, prefetch, progress, ledger)
            failed = cache_failures() - failed_before
        seconds = time.perf_counter() - start
        return run_summary(plan, pending, tally, seconds, out_dir, cache_failed=failed)


@dataclass
class _RunState:
    """What ``paused_as`` needs to say how far a stopped run got."""

    plan: ScoringPlan | None = None
    pending: list[int] = field(default_factory=list)
    ledger: PartLedger | None = None


@contextmanager
def paused_as(stop: PauseSignals, out_dir: str | Path) -> Iterator[_RunState]:
    """Turns a ``KeyboardInterrupt`` inside the block into ``ScoringPaused``.

    Staged parts this process was writing are removed (``stage_part`` does that
    itself); committed ones stay.
    """
    run = _RunState()
    try:
        yield run
    except KeyboardInterrupt:
        total = 0 if run.plan is None else run.plan.n_chunks
        before = total - len(run.pending)
        done = before + (0 if run.ledger is None else run.ledger.committed)
        manifest = (Path(out_dir) / MANIFEST).is_file()
        raise ScoringPaused(stop.signum or 2, done, total, manifest) from None


@dataclass
class Tally:
    """Rows and chunks a run has scored so far."""

    errors: int = 0  # rows without a risk, for any reason
    failed: int = 0  # rows that failed for a reason other than their input
    failed_chunks: int = 0
    failure: str | None = None  # the first such failure

    def add(self, errors: int, staged: StagedPart) -> None:
        self.errors += errors
        if staged.failed:
            self.failed += staged.failed
            self.failed_chunks += 1
            self.failure = self.failure or f"{staged.name}: {staged.failure}"


def _stage(out_dir: str | Path, index: int, scored: ScoredChunk) -> StagedPart:
    return stage_part(out_dir, index, scored.rows, scored.failed, scored.failure)


def _score_here(
    scorer: ChunkScorer,
    plan: ScoringPlan,
    pending: list[int],
    prefetch: bool,
    progress: bool,
    ledger: PartLedger,
) -> Tally:
    """Scores ``pending`` chunks in this process, committing each part; returns the tally."""
    tally = Tally()
    chunks = ((index, plan.chunk(index)) for index in pending)
    scored = scorer.scored_chunks(chunks, prefetch=prefetch)
    for index, chunk in _progress(scored, plan.n_chunks, progress, len(pending)):
        staged = _stage(ledger.out, index, chunk)
        ledger.commit(staged)
        tally.add(chunk.errors, staged)
    return tally


_WORKER: dict[str, Any] = {}  # the ChunkScorer of a worker process


def _score_in_processes(
    plan: ScoringPlan,
    pending: list[int],
    workers: int,
    options: tuple,
    progress: bool,
    ledger: PartLedger,
) -> tuple[Tally, int]:
    """Scores ``pending`` chunks in ``workers`` spawned processes; returns the tally and
    the cache entries the workers found damaged (and recomputed).

    Workers stage their parts; this process (the lock holder) commits them. On a
    pause, chunks not started are cancelled, the ones running finish and are committed.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch
    tally, failed, committed = Tally(), 0, set()
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=options)  # fmt: skip
    futures = [pool.submit(_worker_score, i, plan.chunk(i)) for i in pending]
    try:
        for future in _progress(as_completed(futures), plan.n_chunks, progress, len(pending)):
            staged, n_errors, n_failed = future.result()
            ledger.commit(staged)
            committed.add(future)
            tally.add(n_errors, staged)
            failed += n_failed
    except KeyboardInterrupt:
        pool.shutdown(wait=True, cancel_futures=True)
        for future in futures:  # finished while we waited: keep them
            if future not in committed and _succeeded(future):
                ledger.commit(future.result()[0])
        raise
    pool.shutdown(wait=True)
    return tally, failed


def _succeeded(future: Any) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _init_worker(model_dir, cohort_dir, out_dir, target_prevalence, batch_size,
                 image_cache, embedding_cache, threads) -> None:  # fmt: skip
    import signal

    # Ctrl-C reaches the whole process group: the driver pauses, workers finish their chunk.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    artifact = load_artifact(model_dir)
    _WORKER["out_dir"] = out_dir
    _WORKER["scorer"] = ChunkScorer(
        artifact, cohort_dir, target_prevalence, batch_size, image_cache, embedding_cache,
        threads=threads,
    )  # fmt: skip


def _worker_score(index: int, samples: pl.DataFrame) -> tuple[StagedPart, int, int]:
    failed_before = cache_failures()
    scored = _WORKER["scorer"].score_chunk(samples)
    staged = _stage(_WORKER["out_dir"], index, scored)
    return staged, scored.errors, cache_failures() - failed_before


def _progress(pending, total: int, enabled: bool, n: int | None = None):
    """A bar over chunks on a terminal, one line per chunk in a log (``clinfuse.progress``)."""
    from clinfuse.progress import progress

    n = len(pending) if n is None else n
    return progress(
        pending, total=n, enabled=enabled, unit="chunk",
        desc=f"scoring ({total - n}/{total} chunks done before)",
    )  # fmt: skip


def run_summary(
    plan: ScoringPlan,
    pending: list[int],
    tally: Tally,
    seconds: float,
    out_dir: str | Path,
    cache_failed: int = 0,
) -> dict[str, Any]:
    """What a scoring run reports when it ends.

    ``parts_rescored``: finished parts that failed their check on ``--resume``;
    ``parts_retried``: parts with failed rows from an earlier run, scored again;
    ``cache_entries_recomputed``: image or feature cache entries that failed their
    checksum while scoring, dropped and recomputed; ``failed_rows``: rows that failed
    for a reason other than their input (``scoring.failures``), in ``failed_chunks``
    chunks that ``--resume`` scores again, ``failure`` the first reason.
    """
    scored = sum(plan.bounds[i + 1] - plan.bounds[i] for i in pending)
    return {
        "out_dir": str(out_dir),
        "n_samples": plan.samples.height,
        "n_chunks": plan.n_chunks,
        "chunks_scored": len(pending),
        "chunks_skipped": plan.n_chunks - len(pending),
        "samples_scored": scored,
        "parts_rescored": len(plan.rescored),
        "parts_retried": len(plan.retried),
        "cache_entries_recomputed": cache_failed,
        "error_rows": tally.errors,
        "failed_rows": tally.failed,
        "failed_chunks": tally.failed_chunks,
        "failure": tally.failure,
        "seconds": seconds,
    }


def read_scores(out_dir: str | Path) -> pl.DataFrame:
    """Every part file of a scoring run, in chunk order, each verified against its
    recorded sha256 and its Parquet page checksums (``scoring.parts.read_scores``).

    Raises:
        IntegrityError: naming the first damaged part.
    """
    return _read_parts(out_dir, OUTPUT_SCHEMA)
