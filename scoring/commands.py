"""``clinfuse score``: batch risk scoring of a cohort into a Parquet dataset."""

from __future__ import annotations

import argparse
from datetime import datetime


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score",
        help="score a cohort with a trained model; writes a Parquet dataset",
        description="Score every sample (each labels.parquet row, or every subject at --at) "
        "with a model artifact: calibrated risk, modalities used, OOD score, top modality, "
        "input fingerprints, flags and per-sample errors. Streams chunks of subjects and "
        "writes one part file per chunk atomically; --resume finishes an interrupted run.",
    )
    p.add_argument("model", help="model artifact directory (run_dir/model) or a run directory")
    p.add_argument("--cohort", required=True, help="cohort directory to score")
    p.add_argument("--out", required=True, help="output directory (a Parquet dataset)")
    p.add_argument(
        "--at", type=_timestamp, help="score every subject at this time (ISO 8601), not labels"
    )
    p.add_argument("--chunk-size", type=int, default=1000, help="subjects per chunk (1000)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per forward pass (256)")
    p.add_argument("--resume", action="store_true", help="skip chunks an earlier run finished")
    p.add_argument(
        "--target-prevalence", type=float, help="recalibrate risks to this base rate (prior shift)"
    )
    p.add_argument("--image-cache", help="folder caching decoded DICOM pixels between runs")
    p.add_argument(
        "--embedding-cache", help="folder caching frozen image-backbone features between runs"
    )
    p.add_argument(
        "--threads", type=_positive, default=1,
        help="torch threads per process or Ray actor (1; scale out with --num-actors)",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=_positive, default=1,
        help="local processes scoring chunks in parallel (1 = in this process)",
    )  # fmt: skip
    p.add_argument(
        "--prefetch", action="store_true",
        help="in-process: read the next chunk in a helper thread while scoring this one",
    )  # fmt: skip
    p.add_argument("--ray-address", help="score with Ray Data: auto, ray://host:port or local")
    p.add_argument("--num-actors", type=int, default=2, help="Ray scoring actors (2)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per Ray actor (0)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    options = dict(
        at=args.at,
        chunk_size=args.chunk_size,
        resume=args.resume,
        target_prevalence=args.target_prevalence,
        batch_size=args.batch_size,
        image_cache=args.image_cache,
        embedding_cache=args.embedding_cache,
        progress=args.progress,
        threads=args.threads,
    )
    if args.ray_address:
        from clinfuse.scoring.ray_scoring import score_with_ray

        summary = score_with_ray(
            args.model, args.cohort, args.out, address=args.ray_address,
            num_actors=args.num_actors, gpus_per_actor=args.gpus_per_actor, **options,
        )  # fmt: skip
    else:
        from clinfuse.scoring.score import score_cohort

        summary = score_cohort(
            args.model, args.cohort, args.out, workers=args.workers, prefetch=args.prefetch,
            **options,
        )  # fmt: skip
    rescored = summary.get("parts_rescored", 0)
    again = f", {rescored} failed their checksum and were re-scored" if rescored else ""
    if failed := summary.get("cache_entries_recomputed", 0):
        print(f"{failed} cache entries failed their checksum and were recomputed")
    print(
        f"scored {summary['samples_scored']} samples in {summary['chunks_scored']} chunks "
        f"({summary['chunks_skipped']} already done{again}), {summary['error_rows']} error "
        f"rows, {summary['seconds']:.1f} s -> {summary['out_dir']}"
    )
    return 0


def _timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--at {text!r} is not an ISO 8601 timestamp") from err


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--threads must be >= 1, got {value}")
    return value
