"""Damaged cache entries are dropped, recomputed and counted, never used: the risks
equal the clean run's (scored without any cache) within 1e-6.

Scoring reports the count in its summary (``cache_entries_recomputed``; the CLI prints
it); the per-entry warning is silenced there with the image-reading warnings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clinfuse.scoring.score import read_scores, score_cohort

from .conftest import CHUNK, assert_same_risks, flip_bits


def _score(clean, out: Path, **caches) -> dict:
    return score_cohort(clean.run_dir, clean.cohort, out, chunk_size=CHUNK, progress=False,
                        **caches)  # fmt: skip


@pytest.fixture
def features(clean, tmp_path) -> Path:
    """An --embedding-cache folder filled by one clean run (content-hash files and shards)."""
    cache = tmp_path / "features"
    _score(clean, tmp_path / "warm", embedding_cache=cache)
    assert_same_risks(read_scores(tmp_path / "warm"), clean)
    return cache


def _shard_files(cache: Path, kind: str) -> list[Path]:
    files = sorted((cache / "files").glob(f"*/*.{kind}.npy"))
    assert files, f"no {kind} shard was written"
    return files


def test_scaled_feature_shards_are_recomputed(clean, features, tmp_path):
    """The issue's cache rot: every stored vector scaled by 1.5 (a valid .npy file)."""
    shards = _shard_files(features, "pooled")
    for shard in shards:
        np.save(shard, np.load(shard) * 1.5)
    summary = _score(clean, tmp_path / "out", embedding_cache=features)
    assert summary["cache_entries_recomputed"] == len(shards)
    assert_same_risks(read_scores(tmp_path / "out"), clean)
    again = _score(clean, tmp_path / "again", embedding_cache=features)  # rebuilt, intact
    assert again["cache_entries_recomputed"] == 0
    assert_same_risks(read_scores(tmp_path / "again"), clean)


def test_a_deleted_keys_file_makes_its_shard_a_miss(clean, features, tmp_path):
    for keys in _shard_files(features, "keys"):
        keys.unlink()
    summary = _score(clean, tmp_path / "out", embedding_cache=features)
    assert summary["cache_entries_recomputed"] == 0  # not damage: the shard never existed
    assert_same_risks(read_scores(tmp_path / "out"), clean)


def test_flipped_embedding_cache_files_are_recomputed(clean, features, tmp_path):
    """The content-hash cache behind the shards (read when a shard misses)."""
    for store in (features / "files").iterdir():
        for file in store.iterdir():
            file.unlink()
    files = sorted(features.glob("*/*.safetensors"))
    assert files
    for i, file in enumerate(files):
        size = file.stat().st_size
        flip_bits(file, n=1, seed=10 + i, start=size - 64)  # in the tensor data
    summary = _score(clean, tmp_path / "out", embedding_cache=features)
    assert summary["cache_entries_recomputed"] == len(files)
    assert_same_risks(read_scores(tmp_path / "out"), clean)


def test_flipped_image_cache_entries_are_decoded_again(clean, tmp_path):
    pixels = tmp_path / "pixels"
    _score(clean, tmp_path / "warm", image_cache=pixels)
    entries = sorted(pixels.glob("*.npyc"))
    assert entries
    for i, entry in enumerate(entries):
        flip_bits(entry, n=1, seed=100 + i, start=128, stop=entry.stat().st_size - 32)
    summary = _score(clean, tmp_path / "out", image_cache=pixels)
    assert summary["cache_entries_recomputed"] == len(entries)
    assert_same_risks(read_scores(tmp_path / "out"), clean)
