"""``clinfuse verify``: what is intact in a run directory, a model artifact or a score output.

Everything clinfuse can hold to a record under the given directory is checked:
every model artifact (``artifact.json`` against ``artifact.sha256``, the weights
against ``model_id``), every score output (each part against the sha256 the
manifest recorded, and its Parquet page checksums; missing parts), every other
Parquet file (it reads, page checksums where written) and every Lightning
checkpoint (against the sha256 recorded beside it, and it loads with
``weights_only=True``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from clinfuse.errors import NotFoundError, UserError
from clinfuse.integrity.checksums import parquet_problem
from clinfuse.scoring.parts import MANIFEST, PART, part_problem, recorded_parts
from clinfuse.training.artifact import META, verify_artifact


@dataclass(frozen=True)
class Check:
    """One verified thing: ``problem`` None means intact; ``note`` says what was checked."""

    path: Path
    problem: str | None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_path(path: str | Path) -> list[Check]:
    """Every check under ``path`` (a run or sweep directory, an artifact, a score output).

    Raises:
        NotFoundError: ``path`` does not exist or holds nothing clinfuse wrote.
    """
    root = Path(path)
    if not root.is_dir():
        raise NotFoundError("no such directory", root, "pass a run, model or score directory")
    checks = [check_artifact(d) for d in _dirs_with(root, META)]
    parts: set[Path] = set()
    for out in _dirs_with(root, MANIFEST):
        found = check_score_output(out)
        parts |= {c.path for c in found}
        checks += found
    checks += [check_parquet(p) for p in sorted(root.rglob("*.parquet")) if p not in parts]
    checks += [check_checkpoint(p) for p in sorted(root.rglob("*.ckpt"))]
    if not checks:
        raise NotFoundError(
            "nothing clinfuse wrote here (no artifact, score output, Parquet file or "
            "checkpoint)", root, "pass a run, model or score directory",
        )  # fmt: skip
    return checks


def check_artifact(directory: Path) -> Check:
    """A model artifact against its recorded digests (``training.artifact.verify_artifact``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            verify_artifact(directory)
        except UserError as err:
            return Check(directory, err.what)
    if caught:  # exported before artifact.sha256: the weights were still checked
        return Check(directory, None, "weights match model_id; no artifact.sha256 (old export)")
    return Check(directory, None, "artifact.json and model.safetensors match their sha256")


def check_score_output(out: Path) -> list[Check]:
    """Every part a scoring run's manifest plans: present, matching its recorded sha256,
    with valid page checksums."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        n_chunks = int(manifest["n_chunks"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [Check(out / MANIFEST, f"manifest unreadable ({err})")]
    records = recorded_parts(manifest)
    return [_check_part(out / PART.format(i), records) for i in range(n_chunks)]


def _check_part(path: Path, records: dict) -> Check:
    if not path.is_file():
        return Check(path, "missing (the run did not finish: score again with --resume)")
    problem = part_problem(path, records.get(path.name)) or parquet_problem(path)
    return Check(path, problem, "sha256 matches the manifest; page checksums valid")


def check_parquet(path: Path) -> Check:
    """A Parquet file reads whole, page checksums verified where it has them."""
    return Check(path, parquet_problem(path), "reads; page checksums valid where written")


def check_checkpoint(path: Path) -> Check:
    """A Lightning checkpoint against the sha256 recorded beside it when it was written
    (``training.checkpoints``), and it loads with ``weights_only=True``."""
    import torch

    from clinfuse.training.checkpoints import sidecar, verify_checkpoint

    recorded = sidecar(path).is_file()
    try:
        if recorded:
            verify_checkpoint(path)
        torch.load(path, map_location="cpu", weights_only=True)
    except UserError as err:
        return Check(path, err.what)
    except Exception as err:  # noqa: BLE001 - any failure to load is the finding
        return Check(path, f"does not load ({type(err).__name__}: {_first_line(err)})")
    if not recorded:
        return Check(path, None, f"loads; no recorded sha256 ({sidecar(path).name} is missing)")
    return Check(path, None, "loads; sha256 matches the one recorded when it was written")


def _dirs_with(root: Path, name: str) -> list[Path]:
    return sorted(p.parent for p in root.rglob(name))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""
