"""``clinfuse train``, ``clinfuse evaluate`` and ``clinfuse demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from clinfuse.datasets.commands import add_meds_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_train(subparsers)
    _register_evaluate(subparsers)
    _register_demo(subparsers)


def _register_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on a cohort; writes a run directory",
        description="Train from a YAML preset with key=value overrides (e.g. "
        "model.fusion.name=gated optim.lr=3e-4). The run directory gets the resolved "
        "config, metrics (CSV, TensorBoard), checkpoints, data hashes, code version and "
        "the exported model artifact.",
    )
    p.add_argument("--config", help="YAML file, or the name of a packaged preset (demo)")
    p.add_argument(
        "--cohort", help="cohort directory or MEDS root (overrides cohort= in the config)"
    )
    add_meds_arguments(p)
    p.add_argument("--run-dir", required=True, help="run directory to write")
    p.add_argument("--resume", action="store_true", help="continue from checkpoints/last.ckpt")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    def run(args: argparse.Namespace) -> int:
        from clinfuse.api import train

        run = train(
            _cohort(args), args.config, run_dir=args.run_dir, overrides=args.overrides,
            resume=args.resume,
        )  # fmt: skip
        print(f"best val AUROC {run.summary['best_val_auroc']}; artifact in {run.model_dir}")
        return 0

    p.set_defaults(func=run)


def _register_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="metrics.json and report.html for a trained run on a cohort",
        description="Evaluate a run's model artifact on a cohort: discrimination with "
        "bootstrap CIs, calibration, per-site and per-ancestry tables, the confound audit, "
        "modality attribution and Grad-CAM overlays.",
    )
    p.add_argument("run_dir", help="run directory written by clinfuse train")
    p.add_argument("--cohort", required=True, help="cohort directory or MEDS root to evaluate on")
    add_meds_arguments(p)
    p.add_argument("--out", help="output directory (default RUN_DIR/evaluation)")
    p.add_argument("--split", help="held_out (default when present), tuning, train or all")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the gradient-boosting baseline fit on the run's training split",
    )

    def run(args: argparse.Namespace) -> int:
        from clinfuse.api import evaluate

        report = evaluate(
            args.run_dir, _cohort(args), args.out, split=args.split, bootstrap=args.bootstrap,
            baseline=not args.no_baseline,
        )  # fmt: skip
        print(_summary_line(report.metrics))
        print(f"report: {report.html}")
        return 0

    p.set_defaults(func=run)


def _register_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="simulate a cohort, train attention fusion with the adversary, evaluate",
        description="End to end on a small simulated cohort, a few minutes on 2 CPU cores.",
    )
    p.add_argument("--out", default="runs/demo", help="where the cohort and run go")
    p.add_argument("--subjects", type=int, default=2000, help="simulated subjects (2000)")
    p.add_argument("--config", default=None, help="preset (default: the packaged demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value")

    def run(args: argparse.Namespace) -> int:
        from clinfuse.training.demo import run_demo

        return run_demo(args.out, args.subjects, args.config, args.overrides)

    p.set_defaults(func=run)


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
    base = m.get("baseline", {})
    if "delta" in base:
        low, high = base["delta_ci"]
        parts.append(
            f"gradient-boosting baseline {base['auroc']:.3f} "
            f"(model {base['delta']:+.3f} [{low:+.3f}, {high:+.3f}])"
        )
    audit = m.get("audit", {})
    for name in ("site", "ancestry"):
        if name in audit:
            a = audit[name]
            parts.append(
                f"{name} probe {a['probe_accuracy']:.2f} (majority {a['majority_rate']:.2f})"
            )
    return "; ".join(parts)
