"""Batch risk scoring of a cohort, streamed in chunks of subjects to a Parquet dataset.

A hospital runs this every night over its ICU census. This module runs a scoring
run: it loads the artifact, plans the chunks and writes or checks the manifest
(``scoring.plan``), scores the pending chunks in this process or in local worker
processes (``scoring.scorer``), and commits each chunk's part file
(``scoring.parts``). The samples and per-chunk inputs are read by
``scoring.inputs``; ``scoring.ray_scoring`` runs the same chunks on a Ray cluster.
The output layout and its columns are described in ``scoring.plan``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from clinfuse.errors import InputError, NotFoundError
from clinfuse.integrity.checksums import cache_failures
from clinfuse.integrity.locks import output_lock
from clinfuse.scoring.failures import ScoredChunk
from clinfuse.scoring.inputs import scoring_samples
from clinfuse.scoring.parts import MANIFEST, PartLedger, StagedPart, stage_part
from clinfuse.scoring.parts import read_scores as _read_parts
from clinfuse.scoring.plan import OUTPUT_SCHEMA, ScoringPlan, plan_scoring, prepare_output
from clinfuse.scoring.scorer import ChunkScorer
from clinfuse.scoring.stops import PauseSignals, ScoringPaused
from clinfuse.training.artifact import META, ModelArtifact, load_artifact


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
