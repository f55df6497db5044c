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

Writing order: the old sidecar is removed, the checkpoint is written to a temporary
name and moved into place, then the new sidecar is written. A crash in between
leaves a whole checkpoint without a sidecar (loaded with a warning), never a sidecar
that wrongly condemns a good file. Loading always uses ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from clinfuse.integrity.checksums import check_digest, read_sums, write_bytes_atomic, write_sums

SUFFIX = ".sha256"
FIX = "restore the checkpoint from a backup, or train again without --resume into a new --run-dir"


def sidecar(path: str | Path) -> Path:
    """The ``sha256sum``-format file recording ``path``'s digest."""
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def verify_checkpoint(path: str | Path) -> None:
    """Checks a checkpoint against the sha256 recorded when it was written.

    A checkpoint without a sidecar (written before checkpoints were checksummed, or
    by a process killed between the two writes) is let through with a warning:
    ``weights_only=True`` loading still unpickles nothing.

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
    check_digest(path, read_sums(sums_file).get(path.name), FIX)


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
        path.parent.mkdir(parents=True, exist_ok=True)
        sidecar(path).unlink(missing_ok=True)
        write_bytes_atomic(path, data)
        write_sums(sidecar(path), {path.name: hashlib.sha256(data).hexdigest()})

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
