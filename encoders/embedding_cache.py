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

Integrity: caches are checked, never trusted. Each ``EmbeddingCache`` file carries
the sha256 of its tensors in its safetensors metadata, checked on every read (the
files are small); each ``FileFeatureStore`` shard has a ``sha256sum``-format file
over its arrays, checked when a process first loads the shard. An entry that fails
is deleted, counted (``integrity.checksums.cache_failures``) and recomputed by the
caller as a miss. Entries written before checksums (no digest at all) are misses,
not failures; shards live under a versioned folder so old ones are never read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from clinfuse.errors import IntegrityError
from clinfuse.hashing import file_sha256
from clinfuse.integrity.checksums import (
    cache_entry_failed,
    checking_caches,
    read_sums,
    write_bytes_atomic,
    write_sums,
)

_DIGEST_KEY = "sha256"  # safetensors metadata: sha256 of the tensors (``tensors_digest``)
STORE_VERSION = "v2"  # v2: shards carry a .sha256 file


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
        """The stored tensors for ``key``, or None: a missing, torn or unreadable file is a
        miss; a file whose tensors fail their sha256 is also deleted and counted."""
        path = self._path(key)
        try:
            with safe_open(str(path), framework="pt") as f:
                recorded = (f.metadata() or {}).get(_DIGEST_KEY)
                value = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        except (OSError, RuntimeError, ValueError, SafetensorError):
            self.misses += 1
            return None
        if recorded is None or (checking_caches() and recorded != tensors_digest(value)):
            self.misses += 1
            if recorded is not None:  # None: written before checksums, a plain miss
                path.unlink(missing_ok=True)
                cache_entry_failed(path, "failed its sha256")
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
            save_file(plain, tmp, metadata={_DIGEST_KEY: tensors_digest(plain)})
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
    (n, N, F), ``<id>.sha256`` (the three files' digests), then ``<id>.keys.npy``
    (n,) last: a shard exists once its keys file does (each file is moved into place
    with ``os.replace``), so concurrent writers and readers need no locks. A process
    checks a shard's files against ``<id>.sha256`` when it first loads the shard; a
    shard that fails is deleted and its keys become misses (recomputed by the
    caller). A lookup reads rows from memory maps, one per shard.

    Args:
        root: the embedding-cache directory (the store lives in ``root/files/``).
        fingerprint: ``settings_fingerprint`` of the model and preprocessing.
    """

    def __init__(self, root: str | Path, fingerprint: str) -> None:
        self.dir = Path(root) / "files" / f"{STORE_VERSION}-{fingerprint[:32]}"
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
        arrays = {f"{name}.pooled.npy": np.ascontiguousarray(pooled, np.float32)}
        if tokens is not None:
            arrays[f"{name}.tokens.npy"] = np.ascontiguousarray(tokens, np.float32)
        arrays[f"{name}.keys.npy"] = np.array(keys, dtype="S64")  # last: marks the shard whole
        data = {file: _npy_bytes(array) for file, array in arrays.items()}
        sums = {file: hashlib.sha256(raw).hexdigest() for file, raw in data.items()}
        for file, raw in data.items():
            if file.endswith(".keys.npy"):  # the digests are in place before the shard is
                write_sums(self.dir / f"{name}.sha256", sums)
            write_bytes_atomic(self.dir / file, raw)

    def _refresh(self) -> None:
        if not self.dir.is_dir():
            return
        for keys_file in sorted(self.dir.glob("*.keys.npy")):
            name = keys_file.name[: -len(".keys.npy")]
            if name not in self._loaded:
                self._load_shard(name, keys_file)

    def _load_shard(self, name: str, keys_file: Path) -> None:
        if not self._shard_intact(name):
            for file in self.dir.glob(f"{name}.*"):
                file.unlink(missing_ok=True)
            cache_entry_failed(self.dir / f"{name}.keys.npy", "shard failed its sha256")
            return
        keys = np.load(keys_file)
        pooled = np.load(self.dir / f"{name}.pooled.npy", mmap_mode="r")
        tokens_file = self.dir / f"{name}.tokens.npy"
        tokens = np.load(tokens_file, mmap_mode="r") if tokens_file.is_file() else None
        shard = len(self._shards)
        self._shards.append((pooled, tokens))
        self._loaded.add(name)
        for row, key in enumerate(keys.tolist()):
            self._index[key.decode()] = (shard, row)

    def _shard_intact(self, name: str) -> bool:
        """Whether every file of shard ``name`` matches its ``<name>.sha256`` line."""
        if not checking_caches():
            return True
        try:
            sums = read_sums(self.dir / f"{name}.sha256")
            return bool(sums) and all(
                file_sha256(self.dir / file) == digest for file, digest in sums.items()
            )
        except (OSError, IntegrityError):
            return False

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


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
