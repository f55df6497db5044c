"""What a scoring run writes, and the plan it writes it by: output schema, chunks, manifest.

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
                                   ``scoring.fingerprints.events_digests``)
    image_sop_instance_uid String  SOPInstanceUID of the image used
    image_sha256          String   sha256 of the DICOM file used
    flags                 List(String)  e.g. image_unreadable, no_events_in_window,
                                   unknown_codes, nan_values, unknown_subject, no_modalities
    error                 String   null, or why the sample could not be scored
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from clinfuse.datasets.schema import TIME
from clinfuse.errors import InputError, IntegrityError, OutputExistsError
from clinfuse.integrity.checksums import write_text_atomic
from clinfuse.scoring.inputs import naive_utc
from clinfuse.scoring.parts import (
    MANIFEST,
    PART,
    failed_rows,
    part_problem,
    recorded_parts,
    remove_temporaries,
)

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
        "at": None if at is None else naive_utc(at).isoformat(),
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
