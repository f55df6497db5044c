"""A damaged finished part is never read back as risks: read_scores refuses it, verify
names it, and --resume scores it again (risks equal to the clean run)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from clinfuse.cli import main as cli_main
from clinfuse.errors import IntegrityError
from clinfuse.scoring.parts import MANIFEST, PART
from clinfuse.scoring.score import read_scores, score_cohort

from .conftest import CHUNK, assert_same_risks, flip_bits, truncate

PART1 = PART.format(1)


def _risk_column_bytes(path) -> tuple[int, int]:
    """[start, stop) of the ``risk`` column chunk's pages in a part file."""
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    col = meta.row_group(0).column(names.index("risk"))
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    return start, start + col.total_compressed_size


def _resume(clean, out):
    return score_cohort(clean.run_dir, clean.cohort, out, chunk_size=CHUNK, resume=True,
                        progress=False)  # fmt: skip


def test_the_manifest_records_every_part_s_sha256_and_rows(clean):
    from clinfuse.hashing import file_sha256

    manifest = json.loads((clean.scores / MANIFEST).read_text())
    assert sorted(manifest["parts"]) == [PART.format(i) for i in range(3)]
    for name, record in manifest["parts"].items():
        assert record["sha256"] == file_sha256(clean.scores / name)
        assert record["rows"] == pq.ParquetFile(clean.scores / name).metadata.num_rows


@pytest.mark.parametrize("fault", ["risk_bytes_flipped", "truncated", "unrecorded"])
def test_resume_rescores_a_damaged_part_and_says_so(clean, scores_copy, capsys, fault):
    part = scores_copy / PART1
    if fault == "risk_bytes_flipped":  # the 16 bytes inside the risk column
        start, stop = _risk_column_bytes(part)
        flip_bits(part, n=16, seed=7, start=start, stop=stop)
    elif fault == "truncated":
        truncate(part, part.stat().st_size // 2)
    else:  # a part the manifest has no digest for (e.g. from an older clinfuse)
        manifest = json.loads((scores_copy / MANIFEST).read_text())
        del manifest["parts"][PART1]
        (scores_copy / MANIFEST).write_text(json.dumps(manifest))
    if fault != "unrecorded":
        with pytest.raises(IntegrityError, match=PART1):
            read_scores(scores_copy)  # never silently different risks
    code = cli_main(["score", str(clean.run_dir), "--cohort", str(clean.cohort), "--out",
                     str(scores_copy), "--chunk-size", str(CHUNK), "--resume", "--no-progress"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "2 already done, 1 failed their checksum and were re-scored" in out
    assert_same_risks(read_scores(scores_copy), clean)


def test_resume_of_an_intact_run_rescores_nothing(clean, scores_copy):
    summary = _resume(clean, scores_copy)
    assert summary["chunks_skipped"] == 3 and summary["parts_rescored"] == 0


def test_verify_names_the_damaged_part_and_exits_1(clean, scores_copy, capsys):
    assert cli_main(["verify", str(scores_copy)]) == 0
    assert "3 intact, 0 damaged or missing" in capsys.readouterr().out
    start, stop = _risk_column_bytes(scores_copy / PART1)
    flip_bits(scores_copy / PART1, n=1, seed=8, start=start, stop=stop)
    (scores_copy / PART.format(2)).unlink()
    assert cli_main(["verify", str(scores_copy)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  {scores_copy / PART1}: sha256 differs" in out
    assert f"FAIL  {scores_copy / PART.format(2)}: missing" in out
    assert "1 intact, 2 damaged or missing" in out


def test_a_page_checksum_catches_a_flip_without_the_manifest(scores_copy):
    """Copied away from its manifest, a part still proves itself."""
    from clinfuse.integrity.checksums import parquet_problem

    lone = scores_copy / "lone.parquet"
    lone.write_bytes((scores_copy / PART1).read_bytes())
    assert parquet_problem(lone) is None
    start, stop = _risk_column_bytes(lone)
    flip_bits(lone, n=1, seed=9, start=start + 16, stop=stop)
    assert "CRC" in parquet_problem(lone) or "checksum" in parquet_problem(lone).lower()


def test_verify_checks_a_run_directory(clean, capsys):
    assert cli_main(["verify", str(clean.run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"ok    {clean.model_dir}: artifact.json and model.safetensors match" in out
    assert "last.ckpt: loads" in out
