"""``clinfuse validate``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_validate(subparsers)


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
