"""No silent loss in ``score``: rows that failed for a reason other than their input
make the chunk not done, the run exit 1 with the count and the ``--resume`` command,
and ``--resume`` scores them again (``scoring.failures``)."""

from __future__ import annotations

import json
import shlex
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clinfuse.cli import main
from clinfuse.errors import InputError
from clinfuse.scoring.failures import CohortUnreadable, is_input_fault
from clinfuse.scoring.parts import MANIFEST
from clinfuse.scoring.score import read_scores, score_cohort
from clinfuse.scoring.scorer import ChunkScorer

from .conftest import N_SUBJECTS, read, write

CHUNK = 8  # 24 subjects: 3 chunks


def _cli(model: Path, cohort: Path, out: Path, *extra: str) -> list[str]:
    return ["score", str(model), "--cohort", str(cohort), "--out", str(out), "--chunk-size",
            str(CHUNK), "--no-progress", *extra]  # fmt: skip


def _clean_scores(trained, tmp_path: Path) -> pl.DataFrame:
    score_cohort(trained.model_dir, trained.cohort, tmp_path / "clean", chunk_size=CHUNK,
                 progress=False)  # fmt: skip
    return read_scores(tmp_path / "clean")


def test_classes_of_failure() -> None:
    assert is_input_fault(InputError("events.parquet: cannot be read (InvalidOperationError"))
    assert not is_input_fault(CohortUnreadable("events.parquet: cannot be read (FileNotFound"))
    assert not is_input_fault(RuntimeError("CUDA out of memory"))
    assert not is_input_fault(MemoryError())


def test_unreadable_events_fail_the_run_and_resume_scores_them(
    trained, cohort_copy, tmp_path, capsys
) -> None:
    """events.parquet missing (a node or machine that cannot see it): exit 1 with the
    count and the resume command; once the file is back, --resume gives the clean run."""
    events = cohort_copy / "events.parquet"
    events.rename(tmp_path / "events-elsewhere.parquet")
    out = tmp_path / "scores"
    assert main(_cli(trained.model_dir, cohort_copy, out)) == 1
    err = capsys.readouterr().err
    assert f"clinfuse score: error: {N_SUBJECTS} of {N_SUBJECTS} rows were not scored" in err
    assert "in 3 chunk(s) recorded as failed" in err
    assert f"{events}: cannot be read (NotFoundError: {events}: no such file" in err
    resume = err.split("score them with: ")[1].strip()
    assert shlex.split(resume) == ["clinfuse", *_resume_words(trained, cohort_copy, out)]
    parts = json.loads((out / MANIFEST).read_text())["parts"]
    assert [p["failed"] for p in parts.values()] == [CHUNK] * 3
    with pytest.warns(UserWarning, match=f"{N_SUBJECTS} row\\(s\\) in 3 part\\(s\\) were not"):
        failed = read_scores(out)
    assert failed.height == N_SUBJECTS and failed["risk"].null_count() == N_SUBJECTS

    (tmp_path / "events-elsewhere.parquet").rename(events)
    assert main(shlex.split(resume)[1:]) == 0
    out_text = capsys.readouterr().out
    assert (
        "scored 24 samples in 3 chunks (0 already done, 3 with failed rows scored again)"
        in out_text
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no failed part left to warn about
        resumed = read_scores(out)
    clean = _clean_scores(trained, tmp_path)
    assert resumed["subject_id"].to_list() == clean["subject_id"].to_list()
    np.testing.assert_allclose(resumed["risk"].to_numpy(), clean["risk"].to_numpy(), atol=1e-6)
    assert "failed" not in json.dumps(json.loads((out / MANIFEST).read_text())["parts"])


def _resume_words(trained, cohort: Path, out: Path) -> list[str]:
    return ["score", str(trained.model_dir), "--cohort", str(cohort), "--out", str(out),
            "--chunk-size", str(CHUNK), "--no-progress", "--resume"]  # fmt: skip


def test_bad_input_rows_stay_row_errors_and_exit_0(trained, cohort_copy, tmp_path, capsys):
    """A broken genotype row and a truncated film: per-row error or flag, the run is done."""
    genotypes = read(cohort_copy, "genotypes")
    marker = genotypes.columns[1]
    bad = int(genotypes["subject_id"][0])
    write(cohort_copy, "genotypes", genotypes.with_columns(
        pl.when(pl.col("subject_id") == bad).then(7).otherwise(pl.col(marker))
        .cast(genotypes.schema[marker]).alias(marker)
    ))  # fmt: skip
    out = tmp_path / "scores"
    assert main(_cli(trained.model_dir, cohort_copy, out)) == 0
    assert "1 error rows" in capsys.readouterr().out
    assert "failed" not in (out / MANIFEST).read_text()
    scores = read_scores(out)
    assert scores.filter(pl.col("error").is_not_null())["subject_id"].to_list() == [bad]


def test_an_unexpected_error_fails_only_its_subject_and_resume_retries_it(
    trained, cohort_copy, tmp_path, monkeypatch
) -> None:
    """An exception clinfuse does not know as bad input (a bug, out of memory) is narrowed
    down to its subject, counted as failed, and the chunk is scored again on resume."""
    real = ChunkScorer._prepare_strict
    victim = 10

    def flaky(self, samples):
        if victim in samples["subject_id"].to_list():
            raise RuntimeError("simulated out of memory")
        return real(self, samples)

    out = tmp_path / "scores"
    monkeypatch.setattr(ChunkScorer, "_prepare_strict", flaky)
    summary = score_cohort(trained.model_dir, cohort_copy, out, chunk_size=CHUNK, progress=False)
    assert (summary["failed_rows"], summary["failed_chunks"], summary["error_rows"]) == (1, 1, 1)
    assert summary["failure"].startswith(
        "part-00001.parquet: subject_id 10: RuntimeError: simulated out of memory"
    )
    monkeypatch.setattr(ChunkScorer, "_prepare_strict", real)
    again = score_cohort(trained.model_dir, cohort_copy, out, chunk_size=CHUNK, resume=True,
                         progress=False)  # fmt: skip
    assert (again["chunks_scored"], again["parts_retried"], again["failed_rows"]) == (1, 1, 0)
    scores = read_scores(out)
    assert scores.height == N_SUBJECTS and scores["error"].null_count() == N_SUBJECTS
