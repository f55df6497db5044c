"""Scale-out scoring with Ray Data: the same chunks, scored by a pool of actors.

The driver plans the run exactly as the local path does (``plan_run``: samples and
chunks), runs the preflight of ``tune.preflight`` on every node an actor may land on
(each must read the cohort's Parquet files and a sample of its images and see and
write the driver's OUT_DIR; one ``PreflightError`` naming node and path otherwise,
before the manifest is written), writes or checks the manifest, then builds a Ray dataset with one row per
pending chunk and ``map_batches`` it through ``ChunkActor``: each actor loads (and
so verifies) the artifact once, scores whole chunks with ``ChunkScorer`` and stages
their part files in OUT_DIR. The driver holds the output lock for the whole run and
commits each staged part as its row comes back (``scoring.parts``: digest into the
manifest, then the file into place). The output layout, manifest and ``--resume``
semantics are the local ones, so a run started locally can be finished on a cluster
and back; so are failed rows (``scoring.failures``) and the pause on SIGINT/SIGTERM
(``scoring.stops``). On a pause, parts actors staged but the driver did not commit
stay as ``.part-*.tmp`` files, invisible to readers, until ``--resume`` removes them.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from clinfuse.integrity.checksums import cache_failures
from clinfuse.integrity.locks import output_lock
from clinfuse.scoring.parts import PartLedger, StagedPart, stage_part
from clinfuse.scoring.plan import ScoringPlan, prepare_output
from clinfuse.scoring.score import Tally, paused_as, plan_run, resolve_artifact_dir, run_summary
from clinfuse.scoring.scorer import ChunkScorer
from clinfuse.scoring.stops import PauseSignals


class ChunkActor:
    """A Ray Data actor: loads the artifact once, scores whole chunks and stages their parts.

    Args:
        model_dir: the artifact directory.
        cohort_dir: the cohort (the actors must see the same path).
        out_dir: the output dataset directory (shared storage on a cluster).
        plan: the run's plan (samples and chunk bounds).
        scorer_kwargs: ``ChunkScorer`` options (target_prevalence, batch_size, caches).
    """

    def __init__(
        self,
        model_dir: str,
        cohort_dir: str,
        out_dir: str,
        plan: ScoringPlan,
        scorer_kwargs: dict[str, Any],
    ) -> None:
        import torch

        from clinfuse.training.artifact import load_artifact

        device = "cuda" if torch.cuda.is_available() else "cpu"
        artifact = load_artifact(model_dir)
        self.scorer = ChunkScorer(artifact, cohort_dir, device=device, **scorer_kwargs)
        self.out_dir = out_dir
        self.plan = plan

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Scores the chunks named in ``batch["chunk"]``; returns each staged part (its
        temporary file, sha256 and rows) and error count for the driver to commit."""
        staged, errors, failed = [], [], []
        for index in batch["chunk"].tolist():
            failed_before = cache_failures()
            scored = self.scorer.score_chunk(self.plan.chunk(index))
            staged.append(
                stage_part(self.out_dir, index, scored.rows, scored.failed, scored.failure)
            )
            errors.append(scored.errors)
            failed.append(cache_failures() - failed_before)
        return {
            "chunk": np.asarray(batch["chunk"], dtype=np.int64),
            "tmp": np.asarray([s.tmp for s in staged], dtype=object),
            "sha256": np.asarray([s.sha256 for s in staged], dtype=object),
            "rows": np.asarray([s.rows for s in staged], dtype=np.int64),
            "failed": np.asarray([s.failed for s in staged], dtype=np.int64),
            "failure": np.asarray([s.failure or "" for s in staged], dtype=object),
            "errors": np.asarray(errors, dtype=np.int64),
            "cache_failed": np.asarray(failed, dtype=np.int64),
        }


def score_with_ray(
    model: str | Path,
    cohort_dir: str | Path,
    out_dir: str | Path,
    address: str | None = "auto",
    num_actors: int = 2,
    gpus_per_actor: float = 0.0,
    at: datetime | None = None,
    chunk_size: int = 1000,
    resume: bool = False,
    target_prevalence: float | None = None,
    batch_size: int = 256,
    image_cache: str | Path | None = None,
    embedding_cache: str | Path | None = None,
    progress: bool = True,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Scores a cohort on a Ray cluster (or an already initialized Ray); returns the summary.

    Args:
        address: ``auto`` (a running cluster), ``ray://host:port``, or ``local`` (start
            a local Ray). Ignored when Ray is already initialized in this process.
        num_actors: size of the actor pool (``concurrency``).
        gpus_per_actor: ``num_gpus`` per actor; 0 scores on CPU.
        threads: torch threads per actor (1: scale out with actors, not threads).
        Other arguments: as ``score.score_cohort``.

    Raises:
        PreflightError: a node an actor may use cannot read the cohort or write
            ``out_dir`` (or none can hold an actor); nothing was written.
        ScoringPaused: SIGINT or SIGTERM stopped the run; every committed part is valid.
    """
    import ray

    start = time.perf_counter()
    cluster = _init_ray(address)
    # The lock is held on the driver (actors only stage parts); signals wait for a commit.
    with output_lock(out_dir), PauseSignals() as stop, paused_as(stop, out_dir) as run:
        artifact, plan = plan_run(model, cohort_dir, chunk_size, at, target_prevalence)
        _preflight(artifact, cohort_dir, out_dir, gpus_per_actor, cluster)
        del artifact  # the driver needed only the model id; actors load their own copy
        pending = prepare_output(out_dir, plan, resume)
        run.plan, run.pending = plan, pending
        actor_kwargs = dict(
            model_dir=str(resolve_artifact_dir(model)),
            cohort_dir=cohort_dir.resolve_paths()  # a MEDS root, its labels and sidecars
            if hasattr(cohort_dir, "resolve_paths")
            else str(Path(cohort_dir).resolve()),
            out_dir=str(Path(out_dir).resolve()),
            plan=plan,
            scorer_kwargs=dict(
                target_prevalence=target_prevalence,
                batch_size=batch_size,
                image_cache=None if image_cache is None else str(image_cache),
                embedding_cache=None if embedding_cache is None else str(embedding_cache),
                threads=threads,
            ),
        )
        tally, failed = Tally(), 0
        if pending:
            dataset = _chunk_dataset(ray, pending).map_batches(
                ChunkActor,
                fn_constructor_kwargs=actor_kwargs,
                batch_size=1,
                batch_format="numpy",
                concurrency=int(num_actors),
                num_cpus=ACTOR_CPUS,
                **({"num_gpus": float(gpus_per_actor)} if gpus_per_actor > 0 else {}),
            )
            run.ledger = PartLedger(out_dir, guard=stop.held)
            tally, failed = _drain(dataset, pending, plan.n_chunks, progress, run.ledger)
        seconds = time.perf_counter() - start
        return run_summary(plan, pending, tally, seconds, out_dir, cache_failed=failed)


ACTOR_CPUS = 1.0  # each actor's CPU reservation (its torch threads: ``threads``)


def _preflight(
    artifact: Any, cohort_dir: str | Path, out_dir: str | Path, gpus: float, cluster: bool
) -> None:
    """``tune.preflight`` for the nodes that can hold an actor: cohort, images, OUT_DIR."""
    from clinfuse.tune.preflight import SCORING, preflight

    preflight(
        cohort_dir, [out_dir], artifact.spec.image_size, ACTOR_CPUS, gpus, cluster,
        needs_images="image" in getattr(artifact.model, "encoders", {}), work=SCORING,
    )  # fmt: skip


def _init_ray(address: str | None) -> bool:
    """Joins or starts Ray; returns whether other nodes may run the actors (False: a Ray
    this call started inside the process, whose only node is this machine)."""
    import ray

    if ray.is_initialized():
        return True
    if address in (None, "local"):
        ray.init(include_dashboard=False)
        return False
    from clinfuse.tune.preflight import connect

    connect(address)  # one clear error when nothing answers there
    return True


def _chunk_dataset(ray: Any, pending: list[int]) -> Any:
    """One row per pending chunk, one block per chunk so actors share the work evenly."""
    return ray.data.from_items([{"chunk": i} for i in pending], override_num_blocks=len(pending))


def _drain(
    dataset: Any, pending: list[int], total: int, progress: bool, ledger: PartLedger
) -> tuple[int, int]:
    """Runs the pipeline, committing each staged part as its row arrives; checks every
    pending chunk came back once; returns the tally and damaged cache entries."""
    from clinfuse.progress import progress as progress_bar

    seen: list[int] = []
    tally, failed = Tally(), 0
    bar = progress_bar(total=len(pending), enabled=progress, unit="chunk",
               desc=f"scoring on Ray ({total - len(pending)}/{total} chunks done before)")  # fmt: skip
    for row in dataset.iter_rows():
        seen.append(int(row["chunk"]))
        staged = StagedPart(
            int(row["chunk"]), str(row["tmp"]), str(row["sha256"]), int(row["rows"]),
            int(row["failed"]), str(row["failure"]) or None,
        )  # fmt: skip
        ledger.commit(staged)
        tally.add(int(row["errors"]), staged)
        failed += int(row["cache_failed"])
        bar.update(1)
    bar.close()
    if sorted(seen) != sorted(pending):
        raise RuntimeError(f"Ray returned chunks {sorted(seen)}, expected {sorted(pending)}")
    return tally, failed
