"""Image tensors: DICOM -> unit grayscale -> square ``image_size``, cached on disk.

Decoding DICOM is the slow part of an epoch, so each image is decoded once per
(path, file size, mtime, image_size) and stored in a cache folder as ``<key>.npyc``:
the ``.npy`` bytes followed by their sha256 (``integrity.checksums.seal``). Later
epochs (and DataLoader workers) read the array back and check it on every read (a
32 px film costs microseconds to hash); an entry that fails is dropped, decoded
again and counted (``integrity.checksums.cache_failures``). A file that cannot be
read makes that sample's ``image_present`` False with a warning naming the file;
it never stops the epoch.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clinfuse.datasets.dicom import DicomReader
from clinfuse.integrity.checksums import cache_entry_failed, seal, unseal, write_bytes_atomic

CACHE_SUFFIX = ".npyc"  # not .npy: entries from before checksums are left unread


def read_unit(path: str | Path) -> np.ndarray:
    """Reads one DICOM file as float32 (H, W) in [0, 1] with the project's DICOM reader.

    Raises:
        DicomReadError: naming the file, when it cannot be read or decoded.
    """
    return read_film(path)[0]


def read_film(path: str | Path) -> tuple[np.ndarray, str | None]:
    """``read_unit`` and the file's SOPInstanceUID from the same single parse.

    Raises:
        DicomReadError: naming the file, when it cannot be read or decoded.
    """
    image = DicomReader(window="auto").read(path)
    return image.to_unit(), image.meta.get("SOPInstanceUID")


def resize_square(image: Tensor, size: int) -> Tensor:
    """Pads to a square (centred, zeros) then resizes with antialiasing, keeping aspect.

    Shapes:
        image: (H, W) -> (1, size, size)
    """
    h, w = image.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    padded = F.pad(image[None, None], (left, side - w - left, top, side - h - top))
    out = F.interpolate(padded, size=(size, size), mode="bilinear", antialias=True)
    return out[0].clamp_(0.0, 1.0)  # bilinear stays in range; clamp guards rounding


def file_identity(path: str | Path) -> str:
    """``"<resolved path>|<size>|<mtime ns>"``: what names one version of a file.

    Raises:
        OSError: the file cannot be stat-ed.
    """
    stat = os.stat(path)
    return f"{_realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}"


def _realpath(path: str | Path) -> str:
    """``os.path.realpath`` with the folder part resolved once per folder: a file
    that is not itself a symlink lies in its folder's real path."""
    if os.path.islink(path):
        return os.path.realpath(path)
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(_real_folder(head), tail)


@functools.lru_cache(maxsize=1024)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


class ImageLoader:
    """Loads square image tensors through a per-file cache.

    Args:
        image_size: side of the output square.
        cache_dir: folder for checked ``.npyc`` entries; None keeps them in memory only.

    Attributes:
        decoded_uids: key -> SOPInstanceUID of every file this loader decoded (read
            in the same parse as the pixels, so callers need no second header read).
    """

    def __init__(self, image_size: int, cache_dir: str | Path | None = None) -> None:
        self.image_size = int(image_size)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[str, np.ndarray] = {}
        self._failed: set[str] = set()
        self.decoded_uids: dict[str, str | None] = {}

    def load(self, path: str | Path | None, key: str | None = None) -> Tensor | None:
        """The (1, S, S) tensor for ``path``, or None when absent or unreadable.

        ``key``: ``self.key(path)`` when the caller already has it.
        """
        if path is None:
            return None
        key = key or self.key(path)
        if key is None or key in self._failed:
            return None
        array = self._cached(key)
        if array is None:
            array = self._decode(path, key)
        return None if array is None else torch.from_numpy(np.array(array, dtype=np.float32))

    def load_many(
        self, paths: Sequence[str | None], keys: Sequence[str | None] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Stacks ``paths``; absent or unreadable ones are zeros with present False.

        ``keys``: ``self.key(p)`` per path when the caller already has them.

        Shapes:
            -> image (B, 1, S, S), image_present (B,)
        """
        size = self.image_size
        images = torch.zeros(len(paths), 1, size, size)
        present = torch.zeros(len(paths), dtype=torch.bool)
        keys = [None] * len(paths) if keys is None else keys
        for i, (path, key) in enumerate(zip(paths, keys, strict=True)):
            image = self.load(path, key)
            if image is not None:
                images[i], present[i] = image, True
        return images, present

    def warm(self, paths: Sequence[str | None]) -> int:
        """Decodes every distinct path into the cache; returns how many are readable."""
        return sum(self.load(p) is not None for p in dict.fromkeys(p for p in paths if p))

    def key(self, path: str | Path, identity: str | None = None) -> str | None:
        """The cache key of ``path`` (``file_identity`` and image size); None (with a
        warning naming the file) when it cannot be stat-ed.

        ``identity``: ``file_identity(path)`` when the caller already has it.
        """
        if identity is None:
            try:
                identity = file_identity(path)
            except OSError as err:
                self._warn(path, err)
                return None
        return hashlib.sha1(f"{identity}|{self.image_size}".encode()).hexdigest()

    def _cached(self, key: str) -> np.ndarray | None:
        if self.cache_dir is None:
            return self._memory.get(key)
        path = self.cache_dir / f"{key}{CACHE_SUFFIX}"
        try:  # one small read; a memory map costs more than it saves at these sizes
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        payload = unseal(data)
        if payload is None:
            path.unlink(missing_ok=True)
            cache_entry_failed(path, "failed its sha256")
            return None
        return np.load(io.BytesIO(payload))

    def _decode(self, path: str | Path, key: str) -> np.ndarray | None:
        try:
            unit, uid = read_film(path)
            array = resize_square(torch.from_numpy(np.asarray(unit, np.float32)), self.image_size)
        except Exception as err:  # any unreadable file: mask the sample, keep the epoch
            self._failed.add(key)
            self._warn(path, err)
            return None
        array = array.numpy()
        self.decoded_uids[key] = uid
        self._store(key, array)
        return array

    def _store(self, key: str, array: np.ndarray) -> None:
        if self.cache_dir is None:
            self._memory[key] = array
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, array)
        # Write then rename: DataLoader workers may race on the same entry.
        write_bytes_atomic(self.cache_dir / f"{key}{CACHE_SUFFIX}", seal(buffer.getvalue()))

    @staticmethod
    def _warn(path: str | Path, err: Exception) -> None:
        warnings.warn(
            f"{path}: image unreadable, sample gets image_present=False "
            f"({type(err).__name__}: {err})",
            stacklevel=3,
        )
