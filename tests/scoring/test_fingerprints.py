"""events_sha256 against its documented canonical bytes, built by hand with struct."""

from __future__ import annotations

import hashlib
import struct
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from clinfuse.scoring.fingerprints import EVENT_RECORD, events_digests
from clinfuse.scoring.scorer import flag_lists

T0 = datetime(2024, 3, 1, 8, 0)


def _record(time: datetime, code: str | None, value: float | None) -> bytes:
    """One record as the docstring defines it, independent of the implementation."""
    us = (time - datetime(1970, 1, 1)) // timedelta(microseconds=1)
    code_digest = hashlib.sha256((code or "").encode()).digest()[:16]
    if value is None:
        null, bits = 1, 0
    elif np.isnan(value):
        null, bits = 0, 0x7FC00000
    else:
        null, bits = 0, struct.unpack("<I", struct.pack("<f", value))[0]
    return struct.pack("<q16sBI", us, code_digest, null, bits)


def _sort_key(record: bytes) -> tuple:
    """(time, code digest, null, value bits) as signed/unsigned integers and bytes."""
    time, code, null, bits = struct.unpack("<q16sBI", record)
    return time, code, null, bits


def _windowed(rows: list[tuple[int, datetime, str | None, float | None]]) -> pl.DataFrame:
    sample, time, code, value = zip(*rows, strict=True)
    return pl.DataFrame(
        {"sample": list(sample), "time": list(time), "code": list(code),
         "numeric_value": list(value)},
        schema={"sample": pl.Int64, "time": pl.Datetime("us"), "code": pl.String,
                "numeric_value": pl.Float32},
    )  # fmt: skip


def test_digest_is_sha256_of_sorted_records():
    h = timedelta(hours=1)
    events = [  # sample 0 gets ties at one time (sorted by code digest, then value)
        (0, T0 + h, "HR", 80.0), (0, T0, "SBP", 120.5), (0, T0 + h, "HR", 79.0),
        (0, T0 + h, "SPO2", None), (0, T0 + h, None, float("nan")), (2, T0, "LAC", -1.25),
    ]  # fmt: skip
    got = events_digests(_windowed(events), n_samples=3)
    ordered = sorted(
        (_record(t, c, v) for s, t, c, v in events if s == 0),
        key=_sort_key,
    )
    assert len(ordered) == 5 and EVENT_RECORD.itemsize == 29
    assert got[0] == hashlib.sha256(b"".join(ordered)).hexdigest()
    assert got[1] == hashlib.sha256(b"").hexdigest()  # no window event
    assert got[2] == hashlib.sha256(_record(T0, "LAC", -1.25)).hexdigest()


def test_digest_ignores_row_order_and_chunking():
    rng = np.random.default_rng(0)
    n = 400
    frame = pl.DataFrame(
        {
            "sample": rng.integers(0, 40, n),
            "time": [T0 + timedelta(minutes=int(m)) for m in rng.integers(0, 600, n)],
            "code": rng.choice(["HR", "RR", "TEMP", "LAB//K"], n).tolist(),
            "numeric_value": rng.normal(size=n).astype(np.float32),
        }
    )
    whole = events_digests(frame, 40)
    shuffled = events_digests(frame.sample(fraction=1.0, shuffle=True, seed=1), 40)
    assert shuffled == whole
    # The second half scored as its own chunk (sample indices restart at 0).
    half = frame.filter(pl.col("sample") >= 20).with_columns(pl.col("sample") - 20)
    assert events_digests(half, 20) == whole[20:]
    assert len(set(whole)) == 40


def test_a_changed_value_changes_only_its_sample():
    frame = _windowed([(0, T0, "HR", 80.0), (1, T0, "HR", 80.0)])
    before = events_digests(frame, 2)
    assert before[0] == before[1]  # same records, same digest
    after = events_digests(frame.with_columns(numeric_value=pl.Series([80.0, 80.5])), 2)
    assert after[0] == before[0] and after[1] != before[1]


def test_flag_lists_keep_name_order_and_empty_rows():
    marks = {"b_flag": np.array([True, False, True]), "a_flag": np.array([True, False, False])}
    assert flag_lists(marks).to_list() == [["b_flag", "a_flag"], [], ["b_flag"]]


def test_header_store_shares_entries_across_runs_and_skips_unreadable(tmp_path):
    from clinfuse.scoring.fingerprints import HeaderStore

    first = HeaderStore(tmp_path / "headers")
    assert first.lookup(["/a|1|2"]) == {}
    first.put({"/a|1|2": ("1.2.3", "ab" * 32), "/bad|1|2": (None, None)})
    first.put({"/b|3|4": (None, "cd" * 32)})  # a readable file without SOPInstanceUID
    second = HeaderStore(tmp_path / "headers")  # another run (or process) later
    got = second.lookup(["/a|1|2", "/b|3|4", "/bad|1|2", "/c|5|6"])
    assert got == {"/a|1|2": ("1.2.3", "ab" * 32), "/b|3|4": (None, "cd" * 32)}
    assert HeaderStore(None).lookup(["/a|1|2"]) == {}
