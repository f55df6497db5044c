"""``clinfuse simulate`` and ``clinfuse validate``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_simulate(subparsers)
    _register_validate(subparsers)


def _register_simulate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="write a synthetic cohort (Parquet + DICOM) with known true risk",
        description="Write a synthetic ICU cohort in the clinfuse cohort contract, with "
        "real DICOM files and oracle.parquet (true risk, latent factors) beside it.",
    )
    p.add_argument("--out", required=True, help="cohort directory to create")
    p.add_argument("--subjects", type=int, default=500, help="number of subjects (default 500)")
    p.add_argument("--sites", type=int, default=3, help="number of hospital sites (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    def run(args: argparse.Namespace) -> int:
        from clinfuse.datasets.simulator import main

        return main(args)

    p.set_defaults(func=run)


def _register_validate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "validate",
        help="check a cohort directory against the contract",
        description="Check every file of a cohort directory and report every problem "
        "(file, column, row or subject, what is wrong). Exits 1 on errors; warnings "
        "alone exit 0.",
    )
    p.add_argument("cohort", help="cohort directory")
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
