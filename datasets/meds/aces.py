"""``clinfuse labels --aces TASK.yaml``: task labels from a MEDS root with ACES.

ACES (the ``es-aces`` package) extracts a cohort of prediction times and binary
labels from a task configuration: predicates over codes, a trigger, windows. It
pins ``polars<2``, which our own ``polars`` pin excludes, so it runs in its own
virtual environment (``make aces`` builds ``.venv-aces``) and clinfuse calls its
``aces-cli`` as a program: every shard of ``data/`` in one Hydra multirun, each
writing ``OUT/<shard>.parquet`` in the MEDS label schema. The output is written
beside ``OUT`` and moved into place once every shard is done and every file passes
``meds.LabelSchema``: a failure leaves no partial ``OUT``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import meds
import polars as pl
import pyarrow.parquet as pq

from clinfuse.datasets.meds.source import DATA_DIR, is_meds_root
from clinfuse.errors import InputError, NotFoundError, OutputExistsError

ACES_ENV = "CLINFUSE_ACES_CLI"


def find_aces_cli(given: str | None = None) -> Path:
    """``--aces-cli``, else ``$CLINFUSE_ACES_CLI``, else ``aces-cli`` beside this Python
    or on PATH, else ``.venv-aces/bin/aces-cli`` in the working directory."""
    for candidate in (given, os.environ.get(ACES_ENV)):
        if candidate:
            path = Path(candidate)
            if not path.is_file():
                raise NotFoundError("no aces-cli here", path, "pass the aces-cli of es-aces")
            return path
    beside = Path(sys.executable).parent / "aces-cli"
    found = shutil.which("aces-cli")
    local = Path(".venv-aces/bin/aces-cli")
    for path in (beside, Path(found) if found else None, local):
        if path is not None and path.is_file():
            return path
    raise NotFoundError(
        "aces-cli not found (es-aces needs polars<2, so it lives in its own venv)",
        fix="run `make aces` (builds .venv-aces) or pip install es-aces in another venv, "
        f"then pass --aces-cli PATH or set {ACES_ENV}",
    )


def shard_names(root: Path) -> list[str]:
    """Shards of ``data/`` as ACES names them: paths relative to data/, no suffix."""
    data = root / DATA_DIR
    return [p.relative_to(data).with_suffix("").as_posix() for p in sorted(data.rglob("*.parquet"))]


def extract_labels(task: str | Path, root: str | Path, out: str | Path, aces_cli: Path) -> Path:
    """Runs ACES over every shard of a MEDS root; returns the label directory ``out``.

    Raises:
        InputError: not a MEDS root, a task file missing, or ACES failed (its last lines).
        OutputExistsError: ``out`` exists and is not empty.
    """
    root, out, task = Path(root), Path(out), Path(task)
    _check_inputs(task, root, out)
    shards = shard_names(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        work = Path(tmp)
        _run_aces(aces_cli, task, root, shards, work)
        labels = work / "labels"
        for shard in shards:
            _check_labels(labels / f"{shard}.parquet", task)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(labels, out)
    return out


def _check_inputs(task: Path, root: Path, out: Path) -> None:
    if not task.is_file():
        raise NotFoundError("no ACES task file", task, "pass --aces TASK.yaml")
    if not is_meds_root(root):
        raise InputError(
            "not a MEDS root (no data/ and metadata/)", root, "pass --cohort MEDS_ROOT"
        )
    if not shard_names(root):
        raise InputError("no Parquet shard under data/", root, "see docs/meds.md")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError("output exists and is not an empty folder", out, "pass a new --out")


def _run_aces(aces_cli: Path, task: Path, root: Path, shards: list[str], work: Path) -> None:
    args = [
        str(aces_cli), "data=sharded", "data.standard=meds",
        f"data.root={(root / DATA_DIR).resolve()}", f"data.shard={','.join(shards)}",
        f"cohort_dir={work}", "cohort_name=labels", f"config_path={task.resolve()}",
        f"log_dir={work / 'logs'}", "-m",
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise InputError(f"ACES failed on {task} (exit {done.returncode}): {tail}", root)


def _check_labels(path: Path, task: Path) -> None:
    if not path.is_file():
        raise InputError(f"ACES wrote no labels for shard {path.stem}", task)
    meds.LabelSchema.validate(pq.read_schema(path))


def main(args: argparse.Namespace) -> int:
    """``clinfuse labels --aces TASK.yaml --cohort MEDS_ROOT --out DIR``."""
    out = extract_labels(args.aces, args.cohort, args.out, find_aces_cli(args.aces_cli))
    labels = pl.scan_parquet(str(out / "**/*.parquet")).select(
        pl.len(), pl.col("subject_id").n_unique(), pl.col("boolean_value").sum()
    )
    n, subjects, positives = labels.collect().row(0)
    print(f"wrote {n} labels of {subjects} subjects ({positives} positive) to {out}")
    print(f"next: clinfuse validate {args.cohort} --labels {out}")
    return 0
