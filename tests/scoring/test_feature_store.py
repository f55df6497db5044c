"""FileFeatureStore lookups: rows in key order across shards, zeros and False elsewhere."""

from __future__ import annotations

import numpy as np

from clinfuse.encoders.embedding_cache import FileFeatureStore


def _store(tmp_path) -> tuple[FileFeatureStore, dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    writer = FileFeatureStore(tmp_path, "f" * 64)
    pooled = {k: rng.normal(size=3).astype(np.float32) for k in ("a", "b", "c", "d")}
    tokens = {k: rng.normal(size=(2, 3)).astype(np.float32) for k in ("a", "b")}
    writer.put(
        ["a", "b"], np.stack([pooled["a"], pooled["b"]]), np.stack([tokens["a"], tokens["b"]])
    )
    writer.put(["c", "d"], np.stack([pooled["c"], pooled["d"]]), None)  # a shard without tokens
    return FileFeatureStore(tmp_path, "f" * 64), pooled, tokens  # a fresh reader


def test_lookup_gathers_rows_in_key_order_across_shards(tmp_path):
    store, pooled, _ = _store(tmp_path)
    keys = ["d", None, "a", "missing", "c", "a"]
    present, got, toks = store.lookup(keys, tokens=False)
    assert present.tolist() == [True, False, True, False, True, True]
    assert toks is None
    for i, k in enumerate(keys):
        expected = pooled[k] if present[i] else np.zeros(3, np.float32)
        np.testing.assert_array_equal(got[i], expected)
    assert store.contains(keys, tokens=False).tolist() == present.tolist()
    present, got, toks = store.lookup(["b", "a", "b"], tokens=True)  # all from one shard
    assert present.all()
    np.testing.assert_array_equal(got, np.stack([pooled["b"], pooled["a"], pooled["b"]]))


def test_token_lookup_skips_shards_written_without_tokens(tmp_path):
    store, pooled, tokens = _store(tmp_path)
    present, got, toks = store.lookup(["c", "b", "a"], tokens=True)
    assert present.tolist() == [False, True, True]
    np.testing.assert_array_equal(got[0], np.zeros(3, np.float32))
    np.testing.assert_array_equal(toks[1], tokens["b"])
    np.testing.assert_array_equal(got[2], pooled["a"])
    pooled_only, _ = store.gather(["c"], tokens=True)
    assert pooled_only is None  # nothing stored with tokens for "c"


def test_empty_and_unknown_lookups(tmp_path):
    store, _, _ = _store(tmp_path)
    present, got, toks = store.lookup([], tokens=False)
    assert present.shape == (0,) and got is None and toks is None
    assert store.gather([None, "zzz"], tokens=False) == (None, None)
