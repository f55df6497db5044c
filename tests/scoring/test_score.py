from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pydicom
import pytest
import torch

from clinfuse.datasets.datamodule import build_batch_tensors, config_from_dict
from clinfuse.datasets.samples import latest_images, load_samples
from clinfuse.scoring.inputs import scoring_samples
from clinfuse.scoring.ood import MahalanobisOOD
from clinfuse.scoring.parts import MANIFEST
from clinfuse.scoring.plan import OUTPUT_SCHEMA, chunk_bounds
from clinfuse.scoring.score import read_scores, score_cohort
from clinfuse.scoring.scorer import ChunkScorer
from clinfuse.training.provenance import file_sha256

from .conftest import N_SUBJECTS


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _copy_cohort(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _reference_outputs(artifact, cohort: Path) -> tuple[pl.DataFrame, dict]:
    """The training data path (load_samples + build_batch_tensors) through the model."""
    samples = load_samples(cohort)
    cfg = config_from_dict(artifact.data_config)
    batch = build_batch_tensors(cohort, samples, artifact.spec, cfg)
    with torch.no_grad():
        out = artifact.model(batch)
        loo = {m: artifact.model(batch, absent=[m])["logit"] for m in artifact.model.modalities}
    return samples, {"out": out, "loo": loo, "batch": batch}


# ------------------------------------------------------------------------------ basics


def test_chunks_never_split_a_subject():
    ids = np.array([1, 1, 2, 3, 3, 3, 4, 5, 5])
    bounds = chunk_bounds(ids, 2)
    assert bounds == [0, 3, 7, 9]  # rows of {1, 2}, {3, 4}, {5}
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        assert len(set(ids[lo:hi])) <= 2
        assert lo == 0 or ids[lo] != ids[lo - 1]
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_bounds(ids, 0)


def test_scores_match_the_training_data_path_and_calibration(scoring_run, artifact, tmp_path):
    out = tmp_path / "scores"
    summary = score_cohort(scoring_run.run_dir, scoring_run.cohort, out, chunk_size=40,
                           progress=False)  # fmt: skip
    scores = read_scores(out)
    assert summary["n_chunks"] == 3 and sorted(p.name for p in out.glob("part-*")) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"
    ]  # fmt: skip
    assert dict(scores.schema) == OUTPUT_SCHEMA
    samples, ref = _reference_outputs(artifact, scoring_run.cohort)
    assert scores.height == samples.height == N_SUBJECTS
    assert scores["subject_id"].to_list() == samples["subject_id"].to_list()
    assert scores["prediction_time"].to_list() == samples["prediction_time"].to_list()
    assert scores["error"].null_count() == N_SUBJECTS

    logit = ref["out"]["logit"].double().numpy()
    # float32 forward passes over differently padded batches: agree to ~1e-5 in logit.
    np.testing.assert_allclose(_logit(scores["risk_raw"].to_numpy()), logit, atol=1e-4)
    # Calibration: undo the class weighting of the loss, then the tuning-split temperature.
    assert artifact.logit_offset == pytest.approx(-np.log(artifact.spec.pos_weight))
    expected = 1 / (1 + np.exp(-(logit + artifact.logit_offset) / artifact.temperature))
    np.testing.assert_allclose(scores["risk"].to_numpy(), expected, atol=1e-4)
    ood = MahalanobisOOD(**artifact.ood)
    ref_ood = ood.score(ref["out"]["fused"].numpy())
    np.testing.assert_allclose(scores["ood_score"].to_numpy(), ref_ood, rtol=1e-3, atol=1e-3)
    assert (scores["ood_flag"].to_numpy() == (scores["ood_score"].to_numpy() > ood.threshold)).all()
    _check_top_modality(scores, ref, artifact.model.modalities)


def _check_top_modality(scores: pl.DataFrame, ref: dict, modalities: list[str]) -> None:
    full = ref["out"]["logit"]
    present = {m: ref["out"]["embeddings"][m][1].numpy() for m in modalities}
    for m in modalities:
        np.testing.assert_array_equal(scores[f"{m}_present"].to_numpy(), present[m])
    deltas = np.stack([(full - ref["loo"][m]).numpy() for m in modalities], axis=1)
    size = np.where(np.stack([present[m] for m in modalities], 1), np.abs(deltas), -1)
    best = size.argmax(axis=1)
    assert scores["top_modality"].to_list() == [modalities[i] for i in best]
    np.testing.assert_allclose(
        scores["top_modality_delta"].to_numpy(), deltas[np.arange(len(best)), best], atol=1e-4
    )


def test_prior_shift_moves_every_logit_by_the_log_odds_difference(scoring_run, artifact):
    samples = scoring_samples(scoring_run.cohort).head(20)
    base = ChunkScorer(artifact, scoring_run.cohort).score(samples)
    shifted = ChunkScorer(artifact, scoring_run.cohort, target_prevalence=0.05).score(samples)
    p0 = artifact.train_prevalence
    expected = math.log(0.05 / 0.95) - math.log(p0 / (1 - p0))
    moved = _logit(shifted["risk"].to_numpy()) - _logit(base["risk"].to_numpy())
    np.testing.assert_allclose(moved, expected, atol=1e-9)
    np.testing.assert_array_equal(shifted["risk_raw"].to_numpy(), base["risk_raw"].to_numpy())


def test_image_fingerprints_are_the_latest_image_file(scoring_run, artifact, tmp_path):
    samples = scoring_samples(scoring_run.cohort).head(30)
    scores = ChunkScorer(artifact, scoring_run.cohort).score(samples)
    fingerprint = ["image_sop_instance_uid", "image_sha256", "image_present"]
    for _ in range(2):  # first run fills the pixel and header caches, the next reads them
        cached = ChunkScorer(artifact, scoring_run.cohort, image_cache=tmp_path / "pixels")
        assert cached.score(samples).select(fingerprint).equals(scores.select(fingerprint))
    assert len(list((tmp_path / "pixels" / "headers").glob("*.jsonl"))) == 1  # one shard
    paths = latest_images(scoring_run.cohort, samples)["path"].to_list()
    assert any(paths) and not all(paths)  # the cohort has subjects with and without films
    for path, row in zip(paths, scores.iter_rows(named=True), strict=True):
        if path is None:
            assert row["image_sha256"] is None and not row["image_present"]
            continue
        assert row["image_sha256"] == file_sha256(path)
        assert row["image_sop_instance_uid"] == str(pydicom.dcmread(path).SOPInstanceUID)
        assert row["image_present"]


# --------------------------------------------------------------------- fingerprints


def test_events_sha256_is_stable_and_sees_only_window_events(scoring_run, artifact, tmp_path):
    cohort = _copy_cohort(scoring_run.cohort, tmp_path / "cohort")
    samples = scoring_samples(cohort).head(10)
    before = ChunkScorer(artifact, cohort).score(samples)
    again = ChunkScorer(artifact, cohort).score(samples)
    assert before["events_sha256"].to_list() == again["events_sha256"].to_list()
    assert before["events_sha256"].n_unique() == 10

    events = pl.read_parquet(cohort / "events.parquet")
    a, b = samples.row(0, named=True), samples.row(1, named=True)
    late = (
        events.filter(pl.col("subject_id") == a["subject_id"])
        .head(1)
        .with_columns(
            time=pl.lit(a["prediction_time"]) + pl.duration(hours=1),
            numeric_value=pl.lit(1e4, pl.Float32),
        )
    )  # after prediction_time: must not reach the model
    in_window = (
        (pl.col("subject_id") == b["subject_id"])
        & (pl.col("time") <= b["prediction_time"])
        & pl.col("numeric_value").is_not_null()
    )
    last = events.with_row_index("i").filter(in_window)["i"].max()
    changed = events.with_columns(
        numeric_value=pl.when(pl.int_range(pl.len()) == last)
        .then(pl.col("numeric_value") + 1.0)
        .otherwise(pl.col("numeric_value"))
        .cast(pl.Float32)
    )
    pl.concat([changed, late]).write_parquet(cohort / "events.parquet")
    after = ChunkScorer(artifact, cohort).score(samples)
    assert after["events_sha256"][0] == before["events_sha256"][0]
    assert after["risk"][0] == pytest.approx(before["risk"][0], abs=1e-7)
    assert after["events_sha256"][1] != before["events_sha256"][1]
    assert after["events_sha256"][2:].to_list() == before["events_sha256"][2:].to_list()


# ----------------------------------------------------------------------- robustness


def _break_cohort(cohort: Path, ids: list[int]) -> dict[str, int]:
    """Corrupt a film, drop a subject's events, add unknown codes and NaNs, a bad dosage."""
    corrupt, no_events, unknown, nan, bad_geno = ids
    images = pl.read_parquet(cohort / "images.parquet").filter(pl.col("subject_id") == corrupt)
    for rel in images["path"]:
        (cohort / rel).write_bytes(b"DICM not really" * 8)
    events = pl.read_parquet(cohort / "events.parquet")
    events = events.filter(pl.col("subject_id") != no_events)
    labels = pl.read_parquet(cohort / "labels.parquet").filter(pl.col("subject_id") == unknown)
    extra = (
        events.filter(pl.col("subject_id") == unknown)
        .tail(3)
        .with_columns(
            time=pl.lit(labels["prediction_time"][0]) - pl.duration(hours=1),  # inside the window
            code=pl.lit("LAB//NEVER_SEEN"),
            numeric_value=pl.lit(3.0, pl.Float32),
        )
    )
    events = events.with_columns(
        numeric_value=pl.when(
            (pl.col("subject_id") == nan) & pl.col("code").str.starts_with("VITAL//HR")
        )
        .then(float("nan"))
        .otherwise(pl.col("numeric_value"))
    )
    pl.concat([events, extra]).write_parquet(cohort / "events.parquet")
    genotypes = pl.read_parquet(cohort / "genotypes.parquet")
    marker = genotypes.columns[1]
    genotypes.with_columns(
        pl.when(pl.col("subject_id") == bad_geno).then(7).otherwise(pl.col(marker))
        .cast(genotypes.schema[marker]).alias(marker)
    ).write_parquet(cohort / "genotypes.parquet")  # fmt: skip
    return {"corrupt": corrupt, "no_events": no_events, "unknown": unknown, "nan": nan,
            "bad_geno": bad_geno, "marker": marker}  # fmt: skip


def test_bad_inputs_never_stop_the_run(scoring_run, artifact, tmp_path):
    cohort = _copy_cohort(scoring_run.cohort, tmp_path / "cohort")
    images = pl.read_parquet(cohort / "images.parquet")
    with_film = sorted(set(images["subject_id"].to_list()))
    ids = [with_film[0], with_film[1], with_film[2], with_film[3], with_film[4]]
    broken = _break_cohort(cohort, ids)
    baseline = ChunkScorer(artifact, scoring_run.cohort).score(scoring_samples(cohort))

    out = tmp_path / "scores"
    summary = score_cohort(artifact_dir := scoring_run.model_dir, cohort, out, chunk_size=50,
                           progress=False)  # fmt: skip
    assert artifact_dir.is_dir()
    scores = read_scores(out)
    assert scores.height == N_SUBJECTS and summary["error_rows"] == 1
    rows = {r["subject_id"]: r for r in scores.iter_rows(named=True)}

    bad = rows[broken["bad_geno"]]
    assert bad["risk"] is None and bad["risk_raw"] is None
    assert f"subject_id {broken['bad_geno']}" in bad["error"] and broken["marker"] in bad["error"]

    corrupt = rows[broken["corrupt"]]
    assert corrupt["risk"] is not None and not corrupt["image_present"]
    assert "image_unreadable" in corrupt["flags"] and corrupt["image_sha256"] is None

    gone = rows[broken["no_events"]]
    assert "no_events_in_window" in gone["flags"] and not gone["timeseries_present"]
    assert gone["risk"] is not None
    assert "unknown_codes" in rows[broken["unknown"]]["flags"]
    assert "nan_values" in rows[broken["nan"]]["flags"]

    # Unknown codes are ignored by the model; untouched subjects keep their risk.
    base = {r["subject_id"]: r["risk"] for r in baseline.iter_rows(named=True)}
    assert rows[broken["unknown"]]["risk"] == pytest.approx(base[broken["unknown"]], abs=1e-6)
    untouched = [s for s in rows if s not in ids]
    got = np.array([rows[s]["risk"] for s in untouched])
    np.testing.assert_allclose(got, [base[s] for s in untouched], atol=1e-6)
    clean = [rows[s]["flags"] for s in untouched]
    assert not any("image_unreadable" in f or "no_events_in_window" in f for f in clean)


# --------------------------------------------------------------------------- resume


def test_resume_refuses_a_different_run_and_overwrite(scoring_run, tmp_path):
    cohort = _copy_cohort(scoring_run.cohort, tmp_path / "cohort")
    labels = pl.read_parquet(cohort / "labels.parquet").head(12)
    labels.write_parquet(cohort / "labels.parquet")
    out = tmp_path / "scores"
    score_cohort(scoring_run.run_dir, cohort, out, chunk_size=5, progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["n_samples"] == 12 and manifest["n_chunks"] == 3
    with pytest.raises(FileExistsError, match="--resume"):
        score_cohort(scoring_run.run_dir, cohort, out, chunk_size=5, progress=False)
    with pytest.raises(ValueError, match="chunk_size: 5 there, 4 now"):
        score_cohort(scoring_run.run_dir, cohort, out, chunk_size=4, resume=True, progress=False)
    summary = score_cohort(scoring_run.run_dir, cohort, out, chunk_size=5, resume=True,
                           progress=False)  # fmt: skip
    assert summary["chunks_skipped"] == 3 and summary["chunks_scored"] == 0


def test_at_scores_every_subject_at_that_time(scoring_run, artifact):
    samples = scoring_samples(scoring_run.cohort, at=datetime(2150, 6, 1, 12))
    assert samples.height == N_SUBJECTS and samples["subject_id"].is_unique().all()
    scores = ChunkScorer(artifact, scoring_run.cohort).score(samples.head(30))
    assert set(scores["prediction_time"].to_list()) == {datetime(2150, 6, 1, 12)}
    assert scores["error"].null_count() == 30 and scores["risk"].is_not_null().all()


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_scores_every_sample_once(scoring_run, tmp_path):
    out = tmp_path / "scores"
    cmd = [
        sys.executable, "-m", "clinfuse.cli", "score", str(scoring_run.run_dir),
        "--cohort", str(scoring_run.cohort), "--out", str(out), "--chunk-size", "4",
        "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no part file after 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("part-*.parquet")))
    assert done < N_SUBJECTS // 4, "the run finished before the kill; nothing was tested"

    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"({done} already done)" in resumed.stdout
    scores = read_scores(out)
    labels = pl.read_parquet(scoring_run.cohort / "labels.parquet")
    assert scores.height == labels.height
    key = ["subject_id", "prediction_time"]
    assert scores.select(key).sort(key).equals(labels.select(key).sort(key))
    assert not list(out.glob(".part-*"))  # no temporaries left behind


def test_embedding_cache_gives_the_same_scores(scoring_run, artifact, tmp_path):
    from clinfuse.training.artifact import load_artifact

    cohort = _copy_cohort(scoring_run.cohort, tmp_path / "cohort")
    samples = scoring_samples(cohort).head(24)
    plain = ChunkScorer(artifact, cohort).score(samples)
    cached_art = load_artifact(scoring_run.model_dir)  # the cache setting is per model
    scorer = ChunkScorer(cached_art, cohort, embedding_cache=tmp_path / "features")
    first, second = scorer.score(samples), scorer.score(samples)
    n_images = int(plain["image_present"].sum())
    assert n_images > 0
    for run in (first, second):
        np.testing.assert_allclose(run["risk"].to_numpy(), plain["risk"].to_numpy(), atol=1e-6)
        assert run["image_present"].to_list() == plain["image_present"].to_list()
    # Next night: features come from the file-keyed store, no film is decoded. Garbage
    # pixels under the same size and mtime would be unreadable if they were decoded.
    _scramble_pixels_keep_stat(latest_images(cohort, samples)["path"].drop_nulls().unique())
    night = load_artifact(scoring_run.model_dir)
    third = ChunkScorer(night, cohort, embedding_cache=tmp_path / "features").score(samples)
    assert night.model.encoders["image"]._cache is None  # the content-hash cache never ran
    assert third["image_present"].to_list() == plain["image_present"].to_list()
    np.testing.assert_array_equal(third["risk"].to_numpy(), first["risk"].to_numpy())


def _scramble_pixels_keep_stat(paths: pl.Series) -> None:
    rng = np.random.default_rng(0)
    for path in paths.to_list():
        stat = os.stat(path)
        data = bytearray(Path(path).read_bytes())
        data[-256:] = rng.integers(0, 256, 256, dtype=np.uint8).tobytes()  # pixel data
        Path(path).write_bytes(bytes(data[:132]) + b"garbage!" + bytes(data[140:]))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_worker_processes_write_the_same_dataset(scoring_run, tmp_path):
    # Two spawned processes, each loading the model once, score different chunks;
    # the dataset equals the in-process one row for row.
    one, two = tmp_path / "one", tmp_path / "two"
    score_cohort(scoring_run.run_dir, scoring_run.cohort, one, chunk_size=30, progress=False)
    summary = score_cohort(scoring_run.run_dir, scoring_run.cohort, two, chunk_size=30,
                           progress=False, workers=2)  # fmt: skip
    assert summary["chunks_scored"] == math.ceil(N_SUBJECTS / 30)
    a, b = read_scores(one), read_scores(two)
    assert a.height == b.height == N_SUBJECTS
    assert a.drop("risk", "risk_raw", "ood_score", "top_modality_delta").equals(
        b.drop("risk", "risk_raw", "ood_score", "top_modality_delta")
    )
    np.testing.assert_allclose(a["risk"].to_numpy(), b["risk"].to_numpy(), atol=1e-6)


def test_prefetch_thread_gives_the_same_rows_as_one_thread(scoring_run, artifact, tmp_path):
    # The helper thread reads chunk i + 1 while chunk i runs the model; rows, flags,
    # fingerprints and per-subject errors must not depend on it.
    cohort = _copy_cohort(scoring_run.cohort, tmp_path / "cohort")
    with_film = sorted(set(pl.read_parquet(cohort / "images.parquet")["subject_id"].to_list()))
    _break_cohort(cohort, with_film[:5])  # an error row, a corrupt film, unknown codes...
    samples = scoring_samples(cohort)
    chunks = [(i, samples.slice(lo, 25)) for i, lo in enumerate(range(0, samples.height, 25))]
    scorer = ChunkScorer(artifact, cohort)
    plain = dict(scorer.score_chunks(chunks, prefetch=False))
    threaded = list(scorer.score_chunks(iter(chunks), prefetch=True))
    assert [i for i, _ in threaded] == [i for i, _ in chunks]  # in order
    for index, frame in threaded:
        assert frame.equals(plain[index])
    errors = pl.concat([f for _, f in threaded])["error"].drop_nulls()
    assert errors.len() == 1
