"""``clinfuse verify``: check what clinfuse wrote against its recorded checksums."""

from __future__ import annotations

import argparse

from clinfuse.cli_options import add_command, option


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "verify", _verify, [
        option("dir", help="run directory, model artifact directory or score output"),
    ])  # fmt: skip


def _verify(args: argparse.Namespace) -> int:
    """check a run directory, model artifact or score output against its checksums

    Check everything clinfuse wrote under DIR: model artifacts (artifact.json against
    artifact.sha256, weights against model_id), score outputs (every part against the
    sha256 in the manifest, page checksums, missing parts), other Parquet files and
    checkpoints. Prints one line per item and exits 1 when anything is damaged or
    missing.
    """
    from clinfuse.integrity.verify import verify_path

    checks = verify_path(args.dir)
    for check in checks:
        status, text = ("ok  ", check.note) if check.ok else ("FAIL", check.problem)
        print(f"{status}  {check.path}: {text}")
    bad = sum(not c.ok for c in checks)
    print(f"{len(checks) - bad} intact, {bad} damaged or missing")
    return 1 if bad else 0
