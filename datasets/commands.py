"""``clinfuse simulate`` and ``clinfuse validate``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_simulate(subparsers)
    _register_validate(subparsers)
    _register_labels(subparsers)


def _register_simulate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="write a synthetic cohort (Parquet + DICOM) with known true risk",
        description="Write a synthetic ICU cohort in the clinfuse cohort contract, with "
        "real DICOM files and oracle.parquet (true risk, latent factors) beside it. "
        "The population (sites, scanners, allele frequencies, causal genes) comes from "
        "--world-seed, the subjects from --seed: a test cohort of the same world uses "
        "another --seed with the same --world-seed.",
    )
    p.add_argument("--out", required=True, help="cohort directory to create")
    p.add_argument(
        "--subjects", dest="n_subjects", type=int, default=500, help="number of subjects (500)"
    )
    p.add_argument(
        "--sites",
        dest="n_sites",
        type=int,
        default=3,
        choices=range(1, 10),
        metavar="1-9",
        help="hospital sites, 1-9 (3)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the subjects (0)")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the population (0)")
    p.add_argument("--image-size", type=int, default=128, help="film side in pixels (128)")
    p.add_argument(
        "--site-effect",
        choices=("normal", "reversed", "none"),
        default="normal",
        help="link between site and risk: as in training, reversed, or removed (normal)",
    )
    p.add_argument(
        "--ancestry-effect",
        choices=("normal", "reversed", "none"),
        default="none",
        help="a non-genetic link between ancestry and risk (a shortcut the genotypes "
        "reveal): present, reversed, or absent (none)",
    )
    p.add_argument(
        "--new-site",
        action="store_true",
        help="add the world's held-back site (never in training; its subjects are held_out)",
    )
    p.add_argument("--ancestries", dest="n_ancestries", type=int, default=3, help="(3)")
    p.add_argument("--fst", type=float, default=0.08, help="Balding-Nichols Fst (0.08)")
    p.add_argument("--groups", dest="n_groups", type=int, default=20, help="marker genes (20)")
    p.add_argument("--markers-per-group", type=int, default=10, help="(10)")
    p.add_argument("--causal-groups", dest="n_causal_groups", type=int, default=4, help="(4)")
    p.add_argument("--missing-call-rate", type=float, default=0.02, help="(0.02)")
    p.add_argument(
        "--image-missing", type=float, default=0.15, help="share of subjects with no film (0.15)"
    )
    p.add_argument(
        "--image-missing-mode",
        choices=("random", "informative"),
        default="random",
        help="random, or informative: sicker subjects are filmed more often (random)",
    )
    p.add_argument(
        "--genotype-missing",
        type=float,
        default=0.0,
        help="share of subjects never genotyped (0)",
    )
    p.add_argument("--horizon-hours", type=float, default=48.0, help="outcome horizon (48)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument(
        "--format",
        choices=("cohort", "meds"),
        default="cohort",
        help="cohort: a cohort directory; meds: OUT/meds (a MEDS root), OUT/labels (its "
        "label directory) and OUT/sidecars (images, genotypes, markers, oracle) (cohort)",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="print the oracle AUROC and per-modality ceilings (logistic regressions "
        "on the latent factors)",
    )

    def run(args: argparse.Namespace) -> int:
        if args.format == "meds":
            from clinfuse.datasets.meds.export import simulate_meds_main

            return simulate_meds_main(args)
        from clinfuse.datasets.simulator import main

        return main(args)

    p.set_defaults(func=run)


def add_meds_arguments(p: argparse.ArgumentParser) -> None:
    """``--labels`` and ``--sidecars``: what a MEDS root needs beside it (docs/meds.md)."""
    p.add_argument(
        "--labels",
        metavar="DIR",
        help="MEDS roots: the label directory (subject_id, prediction_time, boolean_value)",
    )
    p.add_argument(
        "--sidecars",
        metavar="DIR",
        help="MEDS roots: folder of images.parquet (+ DICOM), genotypes.parquet, "
        "markers.parquet, subjects.parquet (default: the MEDS root)",
    )


def _register_validate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "validate",
        help="check a cohort directory against the contract",
        description="Check every file of a cohort directory and report every problem "
        "(file, column, row or subject, what is wrong). Exits 1 on errors; warnings "
        "alone exit 0.",
    )
    p.add_argument("cohort", help="cohort directory, or a MEDS root (data/ + metadata/)")
    add_meds_arguments(p)
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    p.add_argument(
        "--no-pixels",
        action="store_true",
        help="header-only DICOM check: do not decode pixel data (faster)",
    )

    def run(args: argparse.Namespace) -> int:
        from clinfuse.datasets.validate import main

        return main(args)

    p.set_defaults(func=run)


def _register_labels(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "labels",
        help="extract task labels from a MEDS root with ACES (es-aces)",
        description="Run an ACES task configuration (predicates, trigger, windows) over "
        "every shard of a MEDS root and write a MEDS label directory for --labels. ACES "
        "runs in its own venv (it needs polars<2): `make aces` builds .venv-aces.",
    )
    p.add_argument("--aces", required=True, metavar="TASK.yaml", help="ACES task config")
    p.add_argument("--cohort", required=True, metavar="MEDS_ROOT", help="the MEDS root")
    p.add_argument("--out", required=True, metavar="DIR", help="label directory to write")
    p.add_argument(
        "--aces-cli",
        metavar="PATH",
        help="the aces-cli program (default: $CLINFUSE_ACES_CLI, PATH, .venv-aces/bin)",
    )

    def run(args: argparse.Namespace) -> int:
        from clinfuse.datasets.meds.aces import main

        return main(args)

    p.set_defaults(func=run)
