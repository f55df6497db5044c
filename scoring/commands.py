"""``clinfuse score``: batch risk scoring of a cohort into a Parquet dataset.

Exit status: 0 when every sample was scored or got an error row for its own input;
1 when rows failed for another reason (a cohort file this machine or a node cannot
read, ``scoring.failures``): their chunks are recorded as failed and the message
names the ``--resume`` command that scores them again; 2 for a bad input, option or
output, or a failed preflight (a ``UserError``); 130 (SIGINT) or 143 (SIGTERM) when
the run was paused, with the ``--resume`` command.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from datetime import datetime

from clinfuse.cli_options import COHORT, NO_PROGRESS, OUT, RESUME, add_command, option, values_for


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "score", _run, _OPTIONS)


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


_OPTIONS = [
    option("model", help="model artifact directory (run_dir/model) or a run directory"),
    COHORT(required=True, help="cohort directory to score"),
    OUT(required=True, help="output directory (a Parquet dataset)"),
    option("--at", type=_timestamp,
           help="score every subject at this time (ISO 8601), not labels"),
    option("--chunk-size", type=int, default=1000, help="subjects per chunk (1000)"),
    option("--batch-size", type=int, default=256, help="samples per forward pass (256)"),
    RESUME(help="skip chunks an earlier run finished"),
    option("--target-prevalence", type=float,
           help="recalibrate risks to this base rate (prior shift)"),
    option("--image-cache", help="folder caching decoded DICOM pixels between runs"),
    option("--embedding-cache",
           help="folder caching frozen image-backbone features between runs"),
    option("--threads", type=_positive, default=1,
           help="torch threads per process or Ray actor (1; scale out with --num-actors)"),
    option("--workers", type=_positive, default=1,
           help="local processes scoring chunks in parallel (1 = in this process)"),
    option("--prefetch", action="store_true",
           help="in-process: read the next chunk in a helper thread while scoring this one"),
    option("--ray-address", help="score with Ray Data: auto, ray://host:port or local"),
    option("--num-actors", type=int, default=2, help="Ray scoring actors (2)"),
    option("--gpus-per-actor", type=float, default=0.0, help="GPUs per Ray actor (0)"),
    NO_PROGRESS,
]  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    """score a cohort with a trained model; writes a Parquet dataset

    Score every sample (each labels.parquet row, or every subject at --at) with a model
    artifact: calibrated risk, modalities used, OOD score, top modality, input
    fingerprints, flags and per-sample errors. Streams chunks of subjects and writes one
    part file per chunk atomically; --resume finishes an interrupted run. Ctrl-C (or
    SIGTERM) pauses the run (exit 130/143). Exits 1 when rows failed for a reason other
    than their input (e.g. a cohort file that cannot be read): --resume scores those
    chunks again.
    """
    from clinfuse.scoring.stops import ScoringPaused

    try:
        summary = _score(args)
    except ScoringPaused as paused:
        print(f"clinfuse score: {_paused_message(paused, args)}", file=sys.stderr)
        return paused.exit_code
    except KeyboardInterrupt:  # before the run could write anything
        print("clinfuse score: stopped before scoring started", file=sys.stderr)
        return 130
    _report(summary)
    if summary["failed_rows"]:
        print(f"clinfuse score: error: {_failed_message(summary, args)}", file=sys.stderr)
        return 1
    return 0


# The options score_cohort and score_with_ray both take.
_SCORE_OPTIONS = (
    "at", "chunk_size", "resume", "target_prevalence", "batch_size", "image_cache",
    "embedding_cache", "progress", "threads",
)  # fmt: skip


def _score(args: argparse.Namespace) -> dict:
    options = values_for(args, _SCORE_OPTIONS)
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
    return summary


def _report(summary: dict) -> None:
    rescored = summary.get("parts_rescored", 0)
    again = f", {rescored} failed their checksum and were re-scored" if rescored else ""
    if retried := summary.get("parts_retried", 0):
        again += f", {retried} with failed rows scored again"
    if failed := summary.get("cache_entries_recomputed", 0):
        print(f"{failed} cache entries failed their checksum and were recomputed")
    print(
        f"scored {summary['samples_scored']} samples in {summary['chunks_scored']} chunks "
        f"({summary['chunks_skipped']} already done{again}), {summary['error_rows']} error "
        f"rows, {summary['seconds']:.1f} s -> {summary['out_dir']}"
    )


def _paused_message(paused, args: argparse.Namespace) -> str:
    if not paused.manifest:
        return "stopped before scoring started; nothing was written: run the same command again"
    return (
        f"paused by {signal.Signals(paused.signum).name} with {paused.done} of {paused.total} chunks "
        f"done (finished parts are kept). Continue with: {resume_command(args)}"
    )


def _failed_message(summary: dict, args: argparse.Namespace) -> str:
    return (
        f"{summary['failed_rows']} of {summary['n_samples']} rows were not scored for a "
        f"reason other than their input, in {summary['failed_chunks']} chunk(s) recorded "
        f"as failed (first: {summary['failure']}). Fix the cause, then score them with: "
        f"{resume_command(args)}"
    )


# Options that are the same run (the manifest checks them) or how it runs; in this order.
_RESUME_OPTIONS = (
    "at", "chunk_size", "target_prevalence", "batch_size", "image_cache", "embedding_cache",
    "threads", "workers", "prefetch", "ray_address", "num_actors", "gpus_per_actor", "progress",
)  # fmt: skip


def resume_command(args: argparse.Namespace) -> str:
    """The ``clinfuse score ... --resume`` command that continues the run ``args`` describe:
    the model, cohort and output, and every option not at its default."""
    words = ["clinfuse", "score", args.model, "--cohort", args.cohort, "--out", args.out]
    defaults = _defaults()
    for name in _RESUME_OPTIONS:
        value = getattr(args, name)
        if value == defaults[name]:
            continue
        flag = "--no-progress" if name == "progress" else "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag)
        else:
            words += [flag, value.isoformat() if isinstance(value, datetime) else str(value)]
    return shlex.join([*words, "--resume"])


def _defaults() -> dict:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return vars(parser.parse_args(["score", "M", "--cohort", "C", "--out", "O"]))
