"""Checksums of the files clinfuse writes and later reads back.

Two layers, because they catch different things:

* a **sha256 per file**, recorded when the file is written (in a ``sha256sum``-format
  sidecar or a manifest), catches any change to any byte and can be checked with
  standard tools (``sha256sum -c model/artifact.sha256``);
* **Parquet page checksums** (a CRC32 per data page, pyarrow's ``write_page_checksum``)
  make every Parquet file we write check itself, with no record kept anywhere: a
  reader that verifies them (``read_parquet_verified``) refuses a flipped byte where
  polars would return a risk of 1e194.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from clinfuse.errors import IntegrityError
from clinfuse.hashing import file_sha256

SUM_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


def write_sums(path: str | Path, digests: dict[str, str]) -> None:
    """Writes ``name -> sha256`` as ``sha256sum`` lines (``<hex>  <name>``), atomically.

    Names are relative to the sidecar's folder, so ``cd folder && sha256sum -c NAME``
    checks them.
    """
    text = "".join(f"{digest}  {name}\n" for name, digest in digests.items())
    write_text_atomic(Path(path), text)


def read_sums(path: str | Path) -> dict[str, str]:
    """The ``name -> sha256`` lines of a ``sha256sum``-format file.

    Raises:
        IntegrityError: the file cannot be read or a line is not ``<hex>  <name>``.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise IntegrityError(f"checksum file unreadable ({err})", path, RESTORE) from err
    sums = {}
    for number, line in enumerate(lines, start=1):
        match = SUM_LINE.match(line)
        if match is None:
            raise IntegrityError(f"checksum file damaged at line {number}", path, RESTORE)
        sums[match.group(2)] = match.group(1)
    return sums


RESTORE = "restore the directory from a backup or produce it again"


def check_digest(path: Path, expected: str | None, fix: str = RESTORE) -> str:
    """Compares a file's sha256 with the recorded one; returns the digest.

    Raises:
        IntegrityError: the file is missing, unreadable or differs, naming the file
            and both digests.
    """
    try:
        found = file_sha256(path)
    except OSError as err:
        raise IntegrityError(f"cannot read the file ({err.strerror})", path, fix) from err
    if found != expected:
        raise IntegrityError(
            f"sha256 differs from the one recorded when it was written "
            f"(expected {expected}, found {found})",
            path,
            fix,
        )
    return found


def temp_file_beside(folder: str | Path, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``folder``, with the mode ``open(path, "w")`` would give.

    mkstemp creates files 0600; ours are renamed into place as outputs (artifacts,
    score parts, cache entries), so they get ``0666 & ~umask`` like any other file
    the user writes.

    Returns:
        The open file descriptor and the temporary file's path.
    """
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:  # Linux: no window in which another thread would create files with umask 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path``, then ``os.replace``."""
    fd, tmp = temp_file_beside(path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------- Parquet


def write_parquet(frame: pl.DataFrame, path: str | Path) -> None:
    """Writes ``frame`` with a CRC32 checksum in every data page header.

    polars' own writer has no page-checksum option, so the frame goes through pyarrow
    (``write_page_checksum=True``); zstd keeps polars' default compression.
    """
    frame.write_parquet(
        path, compression="zstd", use_pyarrow=True, pyarrow_options={"write_page_checksum": True}
    )


def parquet_problem(path: str | Path) -> str | None:
    """What is wrong with a Parquet file, or None: reads every page, verifying page
    checksums where the writer stored them (footer, dictionary and values too).
    """
    import pyarrow.parquet as pq

    try:
        pq.read_table(path, page_checksum_verification=True)
    except (OSError, ValueError) as err:  # OSError: CRC and I/O; ArrowInvalid is a ValueError
        return _first_line(err)
    return None


def read_parquet_verified(paths: list[Path], fix: str = RESTORE) -> pl.DataFrame:
    """Reads Parquet files into one frame, verifying every page checksum first.

    Raises:
        IntegrityError: naming the first file that fails.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for path in paths:
        try:
            tables.append(pq.read_table(path, page_checksum_verification=True))
        except (OSError, ValueError) as err:
            raise IntegrityError(f"Parquet file damaged ({_first_line(err)})", path, fix) from err
    return pl.from_arrow(pa.concat_tables(tables))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# -------------------------------------------------------------------------- caches

DIGEST_BYTES = 32  # sha256
_failures_lock = threading.Lock()
_failures = [0]  # cache entries that failed their checksum in this process


def cache_entry_failed(path: str | Path, why: str) -> None:
    """Counts a cache entry that failed its check (the caller drops and recomputes it)."""
    with _failures_lock:
        _failures[0] += 1
    warnings.warn(f"{path}: cache entry {why}; dropped and recomputed", stacklevel=3)


def cache_failures() -> int:
    """Cache entries that failed their checksum in this process so far."""
    return _failures[0]


_checking = [True]  # process-wide: the prefetch thread reads caches too


def checking_caches() -> bool:
    """Whether cache entries read now are checked against their checksum (always, except
    inside ``unchecked_caches``)."""
    return _checking[0]


@contextmanager
def unchecked_caches() -> Iterator[None]:
    """Reads cache entries without checking their checksum inside the block (they are
    still written with one).

    For ``benchmarks/bench_scoring.py`` only, which measures what the checks cost by
    scoring with and without them in one run; nothing in clinfuse turns them off.
    """
    before, _checking[0] = _checking[0], False
    try:
        yield
    finally:
        _checking[0] = before


def seal(payload: bytes) -> bytes:
    """``payload`` followed by its 32-byte sha256: a cache entry that checks itself."""
    return payload + hashlib.sha256(payload).digest()


def unseal(data: bytes) -> bytes | None:
    """The payload of a ``seal``-ed entry, or None when its trailing sha256 does not match."""
    payload, digest = data[:-DIGEST_BYTES], data[-DIGEST_BYTES:]
    if len(data) <= DIGEST_BYTES:
        return None
    if checking_caches() and hashlib.sha256(payload).digest() != digest:
        return None
    return payload


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, then ``os.replace``: readers
    see the old file, or the whole new one."""
    fd, tmp = temp_file_beside(path.parent, prefix=f".{path.name[:16]}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
