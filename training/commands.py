"""``clinfuse train``, ``clinfuse evaluate`` and ``clinfuse demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from clinfuse.cli_options import (
    COHORT,
    CONFIG,
    LABELS,
    OUT,
    OVERRIDES,
    RESUME,
    SIDECARS,
    add_command,
    option,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = add_command(
        subparsers,
        "train",
        _train,
        [
            CONFIG,
            COHORT(help="cohort directory or MEDS root (overrides cohort= in the config)"),
            LABELS,
            SIDECARS,
            option("--run-dir", required=True, help="run directory to write"),
            RESUME(help="continue from checkpoints/last.ckpt"),
            OVERRIDES,
        ],
    )
    ray = train.add_argument_group(
        "data-parallel training on a Ray cluster (docs/distributed.md)",
        "The cohort, the run directory and the storage path must be on storage every "
        "node sees. data.batch_size is the global batch, split among the workers.",
    )
    ray.add_argument("--ray-address", help="the cluster: auto, HOST:PORT or ray://HOST:PORT")
    ray.add_argument("--num-workers", type=int, help="DDP workers (2)")
    ray.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (0: CPU, gloo)")
    ray.add_argument("--storage-path", help="Ray Train checkpoints: dir or URI (RUN_DIR/ray)")
    ray.add_argument("--max-failures", type=int, help="worker-group restarts after a failure (3)")
    ray.add_argument(
        "--placement-strategy", choices=["PACK", "SPREAD"], help="workers on few nodes (PACK)"
    )
    add_command(
        subparsers,
        "evaluate",
        _evaluate,
        [
            option("run_dir", help="run directory written by clinfuse train"),
            COHORT(required=True, help="cohort directory or MEDS root to evaluate on"),
            LABELS,
            SIDECARS,
            OUT(help="output directory (default RUN_DIR/evaluation)"),
            option("--split", help="held_out (default when present), tuning, train or all"),
            option("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs"),
            option(
                "--no-baseline",
                action="store_true",
                help="skip the gradient-boosting baselines fit on the run's training split",
            ),
            option(
                "--shifted",
                metavar="COHORT",
                help="also score every labelled sample of a shifted cohort (e.g. simulated "
                "with --site-effect reversed, or --new-site) and report the AUROC drop",
            ),
        ],
    )
    add_command(subparsers, "demo", _demo, [
        OUT(default="runs/demo", help="where the cohort and run go"),
        option("--subjects", type=int, default=2000, help="simulated subjects (2000)"),
        CONFIG(help="preset (default: the packaged demo.yaml)"),
        OVERRIDES(help=None),
    ])  # fmt: skip


def _train(args: argparse.Namespace) -> int:
    """train a model on a cohort; writes a run directory

    Train from a YAML preset with key=value overrides (e.g. model.fusion.name=gated
    optim.lr=3e-4). The run directory gets the resolved config, metrics (CSV,
    TensorBoard), checkpoints, data hashes, code version and the exported model artifact.
    """
    from clinfuse.api import train
    from clinfuse.training.config import best_score_text

    run = train(
        _cohort(args), args.config, run_dir=args.run_dir, overrides=args.overrides,
        resume=args.resume, ray_address=args.ray_address, num_workers=args.num_workers,
        gpus_per_worker=args.gpus_per_worker, storage_path=args.storage_path,
        max_failures=args.max_failures, placement_strategy=args.placement_strategy,
    )  # fmt: skip
    print(f"best {best_score_text(run.summary)}; artifact in {run.model_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """metrics.json and report.html for a trained run on a cohort

    Evaluate a run's model artifact on a cohort: discrimination with bootstrap CIs,
    calibration, per-site and per-ancestry tables, the confound audit, modality
    attribution and Grad-CAM overlays.
    """
    from clinfuse.api import evaluate

    report = evaluate(
        args.run_dir, _cohort(args), args.out, split=args.split, bootstrap=args.bootstrap,
        baseline=not args.no_baseline, shifted=args.shifted,
    )  # fmt: skip
    print(_summary_line(report.metrics))
    print(f"report: {report.html}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """simulate a cohort, train the confound-free attention fusion, evaluate

    End to end on a small simulated cohort, a few minutes on 2 CPU cores.
    """
    from clinfuse.training.demo import run_demo

    return run_demo(args.out, args.subjects, args.config, args.overrides)


def _cohort(args: argparse.Namespace):
    """The ``Cohort`` named by --cohort, --labels and --sidecars (None without --cohort)."""
    from clinfuse.api import Cohort

    if args.cohort is None:
        if args.labels or args.sidecars:
            from clinfuse.errors import InputError

            raise InputError("--labels and --sidecars need --cohort MEDS_ROOT")
        return None
    labels, sidecars = (Path(a) if a else None for a in (args.labels, args.sidecars))
    return Cohort(Path(args.cohort), labels, sidecars)


def _summary_line(m: dict) -> str:
    parts = [f"AUROC {m['auroc']:.3f}"]
    if "oracle_auroc" in m:
        parts.append(f"oracle AUROC {m['oracle_auroc']:.3f}")
    for key, label in (("baseline", "gradient-boosting"), ("baseline_matched", "confound-matched")):
        base = m.get(key, {})
        if "delta" in base:
            low, high = base["delta_ci"]
            parts.append(
                f"{label} baseline {base['auroc']:.3f} "
                f"(model {base['delta']:+.3f} [{low:+.3f}, {high:+.3f}])"
            )
    shift = m.get("shift", {})
    if "drop" in shift:
        low, high = shift["drop_ci"]
        parts.append(
            f"shifted cohort AUROC {shift['auroc']:.3f} "
            f"(drop {shift['drop']:+.3f} [{low:+.3f}, {high:+.3f}])"
        )
    audit = m.get("audit", {})
    for name in ("site", "ancestry"):
        if name in audit:
            a = audit[name]
            parts.append(
                f"{name} probe {a['probe_accuracy']:.2f} (majority {a['majority_rate']:.2f})"
            )
    verdict = audit.get("verdict")
    if verdict:
        parts.append(_verdict_text(verdict))
    return "; ".join(parts)


def _verdict_text(verdict: dict) -> str:
    """The audit's verdict in one clause: every probe within its floor + 2 s.e., or which not."""
    if verdict["passed"]:
        return f"audit: all {verdict['checked']} probes within floor + 2 s.e."
    worst = sorted(verdict["above"], key=lambda a: a["limit"] - a["accuracy"])[:3]
    listed = ", ".join(
        f"{a['confound']} from {a['representation']} ({a['probe']}) {a['accuracy']:.2f} > "
        f"{a['limit']:.2f}"
        for a in worst
    )
    more = len(verdict["above"]) - len(worst)
    return (
        f"audit: {len(verdict['above'])} of {verdict['checked']} probes above floor + 2 s.e. "
        f"({listed}{f', {more} more' if more > 0 else ''})"
    )
