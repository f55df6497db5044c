"""A damaged model artifact is refused at every load, naming the file; nothing is written."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from clinfuse.cli import main as cli_main
from clinfuse.errors import IntegrityError, NotFoundError
from clinfuse.scoring.score import read_scores, score_cohort
from clinfuse.training.artifact import META, SUMS, WEIGHTS, load_artifact

from .conftest import (
    CHUNK,
    assert_same_risks,
    flip_bits,
    flip_exponent_bit_of_largest_tensor,
    one_error_line,
    tensor_data_start,
    truncate,
)


def _score_cli(model: Path, cohort: Path, out: Path, *extra: str) -> int:
    args = ["score", str(model), "--cohort", str(cohort), "--out", str(out), "--no-progress"]
    return cli_main([*args, "--chunk-size", str(CHUNK), *extra])


def test_export_records_both_files_in_sha256sum_format(clean):
    lines = (clean.model_dir / SUMS).read_text().splitlines()
    names = [line.split("  ", 1)[1] for line in lines]
    assert names == [META, WEIGHTS]
    meta = json.loads((clean.model_dir / META).read_text())
    assert lines[1].split("  ")[0] == meta["model_id"]


def test_weight_rot_is_refused_naming_the_file_and_both_digests(
    clean, model_copy, tmp_path, capsys
):
    expected = json.loads((model_copy / META).read_text())["model_id"]
    flip_exponent_bit_of_largest_tensor(model_copy / WEIGHTS)
    out = tmp_path / "out"
    assert _score_cli(model_copy, clean.cohort, out) == 2
    line = one_error_line(capsys.readouterr().err, "score")
    assert str(model_copy / WEIGHTS) in line and f"expected {expected}" in line
    assert "found " in line and "retrain" in line
    assert not out.exists()  # nothing written, not even the directory


def test_one_flipped_bit_in_the_weights_is_refused(model_copy):
    weights = model_copy / WEIGHTS
    flip_bits(weights, n=1, seed=1, start=tensor_data_start(weights))  # one weight's bit
    with pytest.raises(IntegrityError, match=WEIGHTS):
        load_artifact(model_copy)


def test_truncated_weights_are_refused_before_safetensors_parses_them(
    model_copy, clean, tmp_path, capsys
):
    truncate(model_copy / WEIGHTS, 1000)
    assert _score_cli(model_copy, clean.cohort, tmp_path / "out") == 2
    line = one_error_line(capsys.readouterr().err, "score")
    assert str(model_copy / WEIGHTS) in line and "sha256 differs" in line


def test_a_flipped_digit_in_artifact_json_is_refused(model_copy, clean, tmp_path, capsys):
    text = (model_copy / META).read_text()
    at = text.index('"temperature": ') + len('"temperature": ') + 2  # a digit, JSON stays valid
    digit = text[at]
    assert digit.isdigit()
    (model_copy / META).write_text(text[:at] + str((int(digit) + 1) % 10) + text[at + 1 :])
    assert _score_cli(model_copy, clean.cohort, tmp_path / "out") == 2
    line = one_error_line(capsys.readouterr().err, "score")
    assert str(model_copy / META) in line and "expected" in line


@pytest.mark.parametrize("fault", ["bit_flip", "truncated"])
def test_damaged_artifact_json_fails_evaluate_and_the_python_api(model_copy, fault):
    if fault == "bit_flip":
        flip_bits(model_copy / META, n=1, seed=2)
    else:
        truncate(model_copy / META, 200)
    with pytest.raises(IntegrityError, match=META):
        load_artifact(model_copy)


def test_evaluate_refuses_a_damaged_artifact(clean, tmp_path, capsys):
    import shutil

    run = Path(shutil.copytree(clean.run_dir, tmp_path / "run"))
    weights = run / "model" / WEIGHTS
    flip_bits(weights, n=1, seed=3, start=tensor_data_start(weights))
    code = cli_main(["evaluate", str(run), "--cohort", str(clean.cohort), "--bootstrap", "10"])
    assert code == 2
    assert str(run / "model" / WEIGHTS) in one_error_line(capsys.readouterr().err, "evaluate")
    assert not (run / "evaluation").exists()


def test_ray_scoring_actor_verifies_the_artifact(model_copy, clean, tmp_path):
    from clinfuse.scoring.ray_scoring import ChunkActor

    flip_bits(model_copy / WEIGHTS, n=1, seed=4, start=tensor_data_start(model_copy / WEIGHTS))
    with pytest.raises(IntegrityError, match=WEIGHTS):
        ChunkActor(str(model_copy), str(clean.cohort), str(tmp_path), plan=None, scorer_kwargs={})


def test_a_deleted_checksum_file_is_refused(model_copy):
    (model_copy / SUMS).unlink()
    with pytest.raises(IntegrityError, match=f"{SUMS} is missing"):
        load_artifact(model_copy)


def test_a_damaged_checksum_file_is_refused(model_copy):
    flip_bits(model_copy / SUMS, n=1, seed=5, stop=64)  # in the artifact.json digest
    with pytest.raises(IntegrityError):
        load_artifact(model_copy)


def test_an_artifact_from_before_checksums_loads_with_a_warning_and_scores_the_same(
    clean, model_copy, tmp_path
):
    meta = json.loads((model_copy / META).read_text())
    del meta["checksums"]
    (model_copy / META).write_text(json.dumps(meta, indent=2))
    (model_copy / SUMS).unlink()
    with pytest.warns(UserWarning, match="exported before clinfuse wrote artifact.sha256"):
        score_cohort(model_copy, clean.cohort, tmp_path / "out", chunk_size=CHUNK, progress=False)
    assert_same_risks(read_scores(tmp_path / "out"), clean)
    # Its weights are still held to model_id.
    flip_bits(model_copy / WEIGHTS, n=1, seed=6, start=tensor_data_start(model_copy / WEIGHTS))
    with warnings.catch_warnings(), pytest.raises(IntegrityError, match=WEIGHTS):
        warnings.simplefilter("ignore")
        load_artifact(model_copy)


def test_a_directory_without_an_artifact_is_one_line(clean, tmp_path, capsys):
    assert _score_cli(tmp_path, clean.cohort, tmp_path / "out") == 2
    assert "not a model artifact" in one_error_line(capsys.readouterr().err, "score")
    with pytest.raises(NotFoundError):
        load_artifact(tmp_path)
