"""An on-disk cache of frozen-backbone features, so epochs and tuning trials skip the CNN.

A frozen backbone in eval mode is a pure function of (image, model, weights,
preprocessing). The cache keys each image by sha256 over its tensor bytes and
shape plus a fingerprint of everything else (model name, weights sha256,
grayscale handling, normalization statistics), and stores the pooled features
(and optionally the spatial tokens) in one safetensors file per image.

Concurrency: a file is written to a unique temporary name in the same directory
and moved into place with ``os.replace`` (atomic on POSIX), so readers see either
no file or a whole file, and two writers of the same key both write the same
bytes. No locks are needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of a JSON-serializable settings dict (key order does not matter)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def image_key(image: Tensor, fingerprint: str) -> str:
    """sha256 over one image's float32 bytes, its shape and the settings fingerprint.

    Shapes:
        image: (C, H, W)
    """
    data = image.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(fingerprint.encode())
    digest.update(str(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    """A directory of ``<key[:2]>/<key>.safetensors`` feature files.

    Args:
        root: cache directory (created if missing).
        fingerprint: ``settings_fingerprint`` of the model and preprocessing.

    Attributes:
        hits, misses: lookup counters since construction.
    """

    def __init__(self, root: str | Path, fingerprint: str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.hits = 0
        self.misses = 0

    def keys(self, images: Tensor) -> list[str]:
        """One key per image of a (B, C, H, W) batch."""
        return [image_key(img, self.fingerprint) for img in images]

    def get(self, key: str) -> dict[str, Tensor] | None:
        """The stored tensors for ``key``, or None (a torn or unreadable file is a miss)."""
        path = self._path(key)
        try:
            value = load_file(str(path))
        except (OSError, RuntimeError, ValueError, SafetensorError):
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, tensors: dict[str, Tensor]) -> None:
        """Writes ``tensors`` for ``key`` atomically."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}-", suffix=".tmp")
        os.close(fd)
        try:
            plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            save_file(plain, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.safetensors"))

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"
