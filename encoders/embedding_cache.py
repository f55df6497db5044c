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
import uuid
from pathlib import Path
from typing import Any

import numpy as np
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


class FileFeatureStore:
    """Frozen-backbone features keyed by image FILE, in shards read as memory maps.

    The content-hash ``EmbeddingCache`` needs the decoded pixels to find an entry;
    this store is keyed by the file itself (the ``ImageLoader`` key: resolved path,
    size, mtime and image size) under a folder per settings fingerprint, so a
    scoring chunk whose films are all stored skips decoding entirely. Each ``put``
    writes one shard ``<id>.pooled.npy`` (n, F), optionally ``<id>.tokens.npy``
    (n, N, F), then ``<id>.keys.npy`` (n,) last: a shard exists once its keys file
    does (each file is moved into place with ``os.replace``), so concurrent writers
    and readers need no locks. A lookup reads rows from memory maps, one per shard.

    Args:
        root: the embedding-cache directory (the store lives in ``root/files/``).
        fingerprint: ``settings_fingerprint`` of the model and preprocessing.
    """

    def __init__(self, root: str | Path, fingerprint: str) -> None:
        self.dir = Path(root) / "files" / fingerprint[:32]
        self.fingerprint = fingerprint
        self._index: dict[str, tuple[int, int]] = {}  # key -> (shard, row)
        self._shards: list[tuple[np.ndarray, np.ndarray | None]] = []  # (pooled, tokens)
        self._loaded: set[str] = set()

    def contains(self, keys: list[str | None], tokens: bool) -> np.ndarray:
        """(n,) bool: which keys are stored (with tokens, when ``tokens``); None is not."""
        return self._locate(keys, tokens)[0] >= 0

    def gather(
        self, keys: list[str | None], tokens: bool
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The stored rows in ``keys`` order, zeros where a key is None or not stored.

        Returns:
            pooled (n, F) and tokens (n, N, F) (None when not asked for); both None
            when no key is stored.
        """
        shard, row = self._locate(keys, tokens)
        if not (shard >= 0).any():
            return None, None
        return self._gather(shard, row, 0), self._gather(shard, row, 1) if tokens else None

    def lookup(
        self, keys: list[str | None], tokens: bool
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``contains`` and ``gather`` from one index pass: (present (n,), pooled, tokens)."""
        shard, row = self._locate(keys, tokens)
        present = shard >= 0
        if not present.any():
            return present, None, None
        toks = self._gather(shard, row, 1) if tokens else None
        return present, self._gather(shard, row, 0), toks

    def _locate(self, keys: list[str | None], tokens: bool) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) per key as two (n,) int64 arrays; shard -1 where not stored."""
        if any(k is not None and k not in self._index for k in keys):
            self._refresh()
        found = [self._index.get(k, _NOWHERE) if k is not None else _NOWHERE for k in keys]
        where = np.array(found, dtype=np.int64).reshape(len(keys), 2)
        shard, row = where[:, 0], where[:, 1]
        if tokens:  # a shard written without tokens cannot serve a token lookup
            has_tokens = np.array([t is not None for _, t in self._shards] + [False])
            shard = np.where(has_tokens[shard], shard, -1)  # index -1 reads the False
        return shard, row

    def put(self, keys: list[str], pooled: np.ndarray, tokens: np.ndarray | None) -> None:
        """Stores one shard: ``pooled (n, F)`` and optionally ``tokens (n, N, F)``."""
        if not keys:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        _save_npy(self.dir / f"{name}.pooled.npy", np.ascontiguousarray(pooled, np.float32))
        if tokens is not None:
            _save_npy(self.dir / f"{name}.tokens.npy", np.ascontiguousarray(tokens, np.float32))
        _save_npy(self.dir / f"{name}.keys.npy", np.array(keys, dtype="S64"))

    def _refresh(self) -> None:
        if not self.dir.is_dir():
            return
        for keys_file in sorted(self.dir.glob("*.keys.npy")):
            name = keys_file.name[: -len(".keys.npy")]
            if name not in self._loaded:
                self._load_shard(name, keys_file)

    def _load_shard(self, name: str, keys_file: Path) -> None:
        keys = np.load(keys_file)
        pooled = np.load(self.dir / f"{name}.pooled.npy", mmap_mode="r")
        tokens_file = self.dir / f"{name}.tokens.npy"
        tokens = np.load(tokens_file, mmap_mode="r") if tokens_file.is_file() else None
        shard = len(self._shards)
        self._shards.append((pooled, tokens))
        self._loaded.add(name)
        for row, key in enumerate(keys.tolist()):
            self._index[key.decode()] = (shard, row)

    def _gather(self, shard: np.ndarray, row: np.ndarray, part: int) -> np.ndarray:
        """Rows of ``part`` (0 pooled, 1 tokens) in key order; zeros where shard is -1."""
        stored = np.unique(shard[shard >= 0])
        template = self._shards[int(stored[0])][part]
        if len(stored) == 1 and (shard >= 0).all():  # one shard holds every row: one copy
            return np.asarray(template[row], dtype=np.float32)
        out = np.zeros((len(shard), *template.shape[1:]), dtype=np.float32)
        for s in stored.tolist():  # one gather per shard
            dst = np.flatnonzero(shard == s)
            out[dst] = self._shards[s][part][row[dst]]
        return out


_NOWHERE = (-1, -1)


def _save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".shard-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
