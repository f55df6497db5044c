"""``clinfuse validate``."""

from __future__ import annotations

import argparse

from clinfuse.cli_options import add_command, option


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "validate", _validate, [
        option("cohort", help="cohort directory"),
        option("--json", metavar="PATH", help="also write the report as JSON to PATH"),
        option("--no-pixels", action="store_true",
               help="header-only DICOM check: do not decode pixel data (faster)"),
    ])  # fmt: skip


def _validate(args: argparse.Namespace) -> int:
    """check a cohort directory against the contract

    Check every file of a cohort directory and report every problem (file, column, row
    or subject, what is wrong). Exits 1 on errors; warnings alone exit 0.
    """
    from clinfuse.datasets.validate import main

    return main(args)
