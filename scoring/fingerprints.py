"""Fingerprints of what a score was computed from: a digest of each sample's window
events, and the SOPInstanceUID and sha256 of each image file (cached in ``HeaderStore``).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np
import polars as pl

from clinfuse.integrity.checksums import temp_file_beside
from clinfuse.training.provenance import file_sha256

# One fixed-size record per window event; a sample's digest is sha256 of its records.
EVENT_RECORD = np.dtype([("time", "<i8"), ("code", "S16"), ("null", "u1"), ("value", "<u4")])
_NAN_BITS = np.uint32(0x7FC00000)


def events_digests(windowed: pl.DataFrame, n_samples: int) -> list[str]:
    """sha256 per sample of its window events, stable across runs, chunkings and machines.

    Canonical bytes: one 29-byte little-endian ``EVENT_RECORD`` per event, ``time``
    (int64 microseconds since the epoch), ``code`` (the first 16 bytes of
    sha256(code as UTF-8); null counts as ""), ``null`` (1 when numeric_value is
    null) and ``value`` (float32 bits; every NaN as 0x7FC00000; 0 when null). A
    sample's records are sorted by (time, code, null, value), as unsigned byte and
    integer comparisons, and concatenated. A sample with no window event gets
    sha256(b""). Everything is vectorized: one sort for the chunk, then one
    ``hashlib`` call per sample over a slice of one buffer.

    Args:
        windowed: ``sample`` (row index), ``time``, ``code``, ``numeric_value``.
    """
    sample = windowed["sample"].to_numpy()
    records, minor = _event_records(windowed)
    order = _record_order(sample, np.ascontiguousarray(records["time"]), minor)
    buffer = memoryview(np.take(records, order).view(np.uint8))  # take: no per-field copy
    rows = np.searchsorted(sample[order], np.arange(n_samples + 1))  # (B + 1,) bounds
    bounds = (rows * EVENT_RECORD.itemsize).tolist()
    pairs = zip(bounds[:-1], bounds[1:], strict=True)
    return [hashlib.sha256(buffer[a:b]).hexdigest() for a, b in pairs]


def _event_records(windowed: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The unsorted records and an int64 key ordering (code, null, value) within a time."""
    values = windowed["numeric_value"].cast(pl.Float32)
    null = values.is_null().to_numpy()
    raw = values.fill_null(0.0).to_numpy()
    bits = np.where(null, 0, np.where(np.isnan(raw), _NAN_BITS, raw.view(np.uint32)))
    code = windowed["code"].fill_null("")
    digests = sorted((hashlib.sha256(c.encode()).digest()[:16], c) for c in code.unique())
    rank = code.cast(pl.Enum([c for _, c in digests])).to_physical().to_numpy()  # digest order
    records = np.empty(len(code), EVENT_RECORD)
    records["time"] = windowed["time"].dt.epoch("us").to_numpy()
    records["code"] = np.array([d for d, _ in digests], dtype="S16")[rank]
    records["null"] = null
    records["value"] = bits
    minor = (rank.astype(np.int64) << 33) | (null.astype(np.int64) << 32) | bits.astype(np.int64)
    return records, minor


def _record_order(sample: np.ndarray, time: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """Argsort by (sample, time, minor): two int64 sorts, or a lexsort when keys do not pack.

    Equal keys mean equal records, so the sort need not be stable.
    """
    if len(time) == 0:
        return np.zeros(0, dtype=np.int64)
    rel = time - time.min()
    time_bits = int(rel.max(initial=0)).bit_length()
    if int(sample.max(initial=0)).bit_length() + time_bits > 62:
        return np.lexsort((minor, time, sample))
    major = (sample << time_bits) | rel
    first = np.argsort(major)  # by (sample, time)
    major = major[first]
    group = np.cumsum(np.r_[False, major[1:] != major[:-1]])  # dense rank of (sample, time)
    minor_bits = int(minor.max(initial=0)).bit_length()
    if int(group.max(initial=0)).bit_length() + minor_bits > 62:
        return np.lexsort((minor, time, sample))
    return first[np.argsort((group << minor_bits) | minor[first])]


def image_header(path: str) -> tuple[str | None, str | None]:
    """(SOPInstanceUID, file sha256) of a DICOM file; (None, None) when unreadable.

    Only SOPInstanceUID is parsed (``specific_tags``, ``stop_before_pixels``): no
    patient identifier is ever read.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        uid = ds.get("SOPInstanceUID")
        return (None if uid is None else str(uid)), file_sha256(path)
    except Exception:  # noqa: BLE001 - unreadable header: the image row is flagged
        return None, None


Header = tuple[str | None, str | None]  # (SOPInstanceUID, file sha256)


class HeaderStore:
    """Image headers keyed by ``file_identity``, in JSON-lines shards read once.

    The key is the identity (resolved path, size, mtime) under which ``ImageLoader``
    caches the pixels, so a fingerprint always describes the file whose pixels were
    used. Each ``put`` writes one shard ``<uuid>.jsonl`` (a temporary name, then
    ``os.replace``), so concurrent runs need no locks; a lookup that misses re-reads
    the folder for shards written since. Unreadable files are never stored (they are
    retried next run). ``folder`` None: nothing is stored, every lookup misses.
    """

    def __init__(self, folder: str | Path | None) -> None:
        self.dir = None if folder is None else Path(folder)
        self._entries: dict[str, list] = {}
        self._loaded: set[str] = set()

    def lookup(self, identities: list[str]) -> dict[str, Header]:
        """The stored headers among ``identities``."""
        if self.dir is None:
            return {}
        if any(i not in self._entries for i in identities):
            self._refresh()
        return {i: tuple(self._entries[i]) for i in identities if i in self._entries}

    def put(self, headers: dict[str, Header]) -> None:
        """Stores ``identity -> header`` for the readable ones (sha256 not None)."""
        lines = [json.dumps([i, *h]) for i, h in headers.items() if h[1] is not None]
        if self.dir is None or not lines:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{uuid.uuid4().hex}.jsonl"
        fd, tmp = temp_file_beside(self.dir, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, self.dir / name)
        self._loaded.add(name)
        self._entries.update({i: list(h) for i, h in headers.items() if h[1] is not None})

    def _refresh(self) -> None:
        if not self.dir.is_dir():
            return
        for shard in sorted(self.dir.glob("*.jsonl")):
            if shard.name not in self._loaded:
                self._loaded.add(shard.name)
                for line in shard.read_text().splitlines():
                    identity, uid, sha = json.loads(line)
                    self._entries[identity] = [uid, sha]


def decoded_image_header(path: str, uid: str | None) -> Header:
    """(uid, file sha256) of a file whose pixels were just decoded (``uid`` from that
    parse, so the header is not read a second time); (None, None) when unreadable."""
    try:
        return uid, file_sha256(path)
    except OSError:
        return None, None
