"""What a run directory records so a metric traces back to its inputs.

Code version (package version + git commit when available), package versions,
and sha256 of every cohort file the run read.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

from clinfuse.hashing import file_sha256  # noqa: F401  (re-exported)

_PACKAGES = (
    "torch", "timm", "lightning", "torchmetrics", "polars", "pyarrow", "pydicom",
    "torch-geometric", "ray", "numpy", "pytorch-forecasting", "scikit-learn",
)  # fmt: skip


def cohort_hashes(cohort_dir: str | Path | Any) -> dict[str, str]:
    """sha256 of every Parquet file of the cohort (relative path -> hex digest).

    DICOM files are fingerprinted per image where they are used (scoring output,
    image cache keys); hashing every image of a large cohort here would cost more
    than the run.
    """
    from clinfuse.datasets.schema import as_cohort

    source = as_cohort(cohort_dir)
    if not isinstance(source, Path):  # a MEDS root: its own files, the labels, the sidecars
        return {str(p): file_sha256(p) for p in source.files()}
    root = Path(cohort_dir)
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*.parquet"))}


def code_version() -> dict[str, Any]:
    from clinfuse import __version__

    here = Path(__file__).resolve().parent.parent
    return {
        "clinfuse": __version__,
        "git_commit": _git(here, "rev-parse", "HEAD"),
        "git_dirty": bool(_git(here, "status", "--porcelain", "--untracked-files=no")),
    }


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _git(cwd: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None
