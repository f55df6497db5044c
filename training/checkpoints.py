"""Lightning checkpoints that prove themselves: a sha256 recorded when one is written,
checked before one is read.

``VerifiedCheckpointIO`` is the run's Lightning ``CheckpointIO`` plugin
(``training.run.build_trainer``), so every checkpoint the Trainer writes, in a run
directory (``best.ckpt``, ``last.ckpt``, ``erased.ckpt``) or a Ray Tune trial
(``lightning.ckpt``), gets a ``sha256sum``-format sidecar beside it
(``last.ckpt.sha256``; ``sha256sum -c last.ckpt.sha256`` checks it), and every
checkpoint the Trainer resumes from (``train --resume``, a retried or restored
trial) is checked against it first. ``load_checkpoint`` does the same for the
checkpoints we read ourselves (the best epoch's weights, the sweep's best trial).

Writing order: the sidecar first lists the digests of both the old and the new
checkpoint, then the checkpoint is replaced, then the sidecar lists the new one
alone, so a crash at any point leaves a checkpoint that matches its sidecar. Neither
write leaves a temporary file in the checkpoint's folder (the checkpoint goes through
the system temporary directory, as with Lightning's own writer; the small sidecar is
written in place): Ray Tune copies trial folders while trials write them, and a file
that vanishes under it is an error there. Loading always uses ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from clinfuse.errors import IntegrityError
from clinfuse.hashing import file_sha256
from clinfuse.integrity.checksums import SUM_LINE, check_digest, current_umask

SUFFIX = ".sha256"
FIX = "restore the checkpoint from a backup, or train again without --resume into a new --run-dir"


def sidecar(path: str | Path) -> Path:
    """The ``sha256sum``-format file recording ``path``'s digest."""
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def verify_checkpoint(path: str | Path) -> None:
    """Checks a checkpoint against the sha256 recorded when it was written.

    A checkpoint without a sidecar (written before checkpoints were checksummed) is let
    through with a warning: ``weights_only=True`` loading still unpickles nothing.

    Raises:
        IntegrityError: naming the checkpoint, the expected and the found digest
            (or why the sidecar cannot be read), and what to do.
    """
    path = Path(path)
    sums_file = sidecar(path)
    if not sums_file.is_file():
        warnings.warn(
            f"{path}: no recorded sha256 ({sums_file.name} is missing); loading it unchecked",
            stacklevel=3,
        )
        return
    recorded = _recorded(sums_file, path.name)
    try:
        check_digest(path, recorded[-1] if recorded else None, FIX)
    except IntegrityError:
        # Written while the checkpoint was being replaced: either file is whole.
        if len(recorded) < 2 or file_sha256(path) not in recorded:
            raise


def _recorded(sums_file: Path, name: str) -> list[str]:
    """The digests a sidecar records for ``name``, in order.

    Raises:
        IntegrityError: the sidecar cannot be read or a line is not ``<hex>  <name>``.
    """
    try:
        lines = sums_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise IntegrityError(f"checksum file unreadable ({err})", sums_file, FIX) from err
    found = [SUM_LINE.match(line) for line in lines]
    if not lines or not all(found):
        raise IntegrityError("checksum file damaged", sums_file, FIX)
    return [m.group(1) for m in found if m.group(2) == name]


def _write_sums(path: Path, name: str, digests: list[str]) -> None:
    """``sha256sum`` lines for ``name``, written in place (see the module docstring)."""
    with open(sidecar(path), "w") as f:
        f.write("".join(f"{digest}  {name}\n" for digest in digests))


def _write_replacing(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file in the system temporary directory, then moves
    it to ``path`` (a rename on the same file system), with the user's file mode."""
    fd, tmp = tempfile.mkstemp(prefix=".clinfuse-ckpt-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())
        shutil.move(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A verified checkpoint (``verify_checkpoint``), loaded on the CPU with
    ``weights_only=True``."""
    verify_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` that records each checkpoint's sha256 in a
    sidecar when it saves and checks it when it loads (local paths)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():  # the sidecar accepts both files while the old one is replaced
            _write_sums(path, path.name, [file_sha256(path), digest])
        _write_replacing(path, data)
        _write_sums(path, path.name, [digest])

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if Path(path).is_file():  # a missing file: Lightning's own error
            verify_checkpoint(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        sidecar(path).unlink(missing_ok=True)
