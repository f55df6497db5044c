"""Files written atomically get the mode the user's umask gives, not mkstemp's 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import polars as pl
import pytest

from clinfuse.integrity.checksums import write_bytes_atomic, write_text_atomic
from clinfuse.scoring.parts import stage_part, write_part
from clinfuse.training.artifact import _write_json_atomic


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writers_follow_the_umask(tmp_path, umask):
    expected = 0o666 & ~umask
    write_text_atomic(tmp_path / "manifest.json", "{}")
    write_bytes_atomic(tmp_path / "entry.bin", b"x")
    _write_json_atomic(tmp_path / "artifact.json", {"a": 1})
    part = write_part(tmp_path, 0, pl.DataFrame({"risk": [0.5]}))
    staged = stage_part(tmp_path, 1, pl.DataFrame({"risk": [0.5]}))
    written = ["manifest.json", "entry.bin", "artifact.json", part.name]
    assert {name: oct(_mode(tmp_path / name)) for name in written} == dict.fromkeys(
        written, oct(expected)
    )
    assert _mode(Path(staged.tmp)) == expected  # the staged part is renamed as it is
