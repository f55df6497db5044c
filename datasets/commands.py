"""``clinfuse validate`` and ``clinfuse labels``."""

from __future__ import annotations

import argparse

from clinfuse.cli_options import LABELS, SIDECARS, add_command, option


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "validate", _validate, [
        option("cohort", help="cohort directory, or a MEDS root (data/ + metadata/)"),
        LABELS,
        SIDECARS,
        option("--json", metavar="PATH", help="also write the report as JSON to PATH"),
        option("--no-pixels", action="store_true",
               help="header-only DICOM check: do not decode pixel data (faster)"),
    ])  # fmt: skip
    add_command(subparsers, "labels", _labels, [
        option("--aces", required=True, metavar="TASK.yaml", help="ACES task config"),
        option("--cohort", required=True, metavar="MEDS_ROOT", help="the MEDS root"),
        option("--out", required=True, metavar="DIR", help="label directory to write"),
        option("--aces-cli", metavar="PATH",
               help="the aces-cli program (default: $CLINFUSE_ACES_CLI, PATH, .venv-aces/bin)"),
    ])  # fmt: skip


def _validate(args: argparse.Namespace) -> int:
    """check a cohort directory against the contract

    Check every file of a cohort directory and report every problem (file, column, row
    or subject, what is wrong). Exits 1 on errors; warnings alone exit 0.
    """
    from clinfuse.datasets.validate import main

    return main(args)


def _labels(args: argparse.Namespace) -> int:
    """extract task labels from a MEDS root with ACES (es-aces)

    Run an ACES task configuration (predicates, trigger, windows) over every shard of a
    MEDS root and write a MEDS label directory for --labels. ACES runs in its own venv
    (it needs polars<2): `make aces` builds .venv-aces.
    """
    from clinfuse.datasets.meds.aces import main

    return main(args)
