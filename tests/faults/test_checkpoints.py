"""A damaged Lightning checkpoint is refused before ``train --resume`` reads it, naming
the file and both digests; an intact one resumes."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from clinfuse.cli import main as cli_main
from clinfuse.hashing import file_sha256
from clinfuse.integrity.checksums import read_sums
from clinfuse.integrity.locks import LOCK_FILE
from clinfuse.training.checkpoints import sidecar

from .conftest import flip_bits, one_error_line, truncate


def _run_copy(clean, tmp_path: Path) -> Path:
    return Path(shutil.copytree(clean.run_dir, tmp_path / "run"))


def _resume(run: Path, cohort: Path) -> int:
    """``train --resume`` with one epoch more than the clean run trained."""
    return cli_main(["train", "--config", str(run / "config.yaml"), "--cohort", str(cohort),
                     "--run-dir", str(run), "--resume", "optim.max_epochs=2"])  # fmt: skip


def _files(run: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file of a run directory but its lock marker."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE}  # fmt: skip


def test_training_records_each_checkpoint_sha256_beside_it(clean):
    checkpoints = sorted((clean.run_dir / "checkpoints").glob("*.ckpt"))
    assert {"best.ckpt", "last.ckpt"} <= {p.name for p in checkpoints}
    for ckpt in checkpoints:  # sha256sum format: `sha256sum -c last.ckpt.sha256` checks it
        assert read_sums(sidecar(ckpt)) == {ckpt.name: file_sha256(ckpt)}


@pytest.mark.parametrize("fault", ["one flipped bit", "truncated"])
def test_a_damaged_last_checkpoint_stops_resume_naming_it_and_both_digests(
    clean, tmp_path, capsys, fault
):
    run = _run_copy(clean, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    expected = read_sums(sidecar(last))[last.name]
    if fault == "truncated":
        truncate(last, 1000)
    else:
        flip_bits(last, n=1, seed=7)
    found = file_sha256(last)
    before = _files(run)
    assert _resume(run, clean.cohort) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert str(last) in line and f"expected {expected}" in line and f"found {found}" in line
    assert "without --resume" in line  # what to do
    assert _files(run) == before  # nothing in the run directory was touched


def test_verify_reports_the_damaged_checkpoint(clean, tmp_path, capsys):
    run = _run_copy(clean, tmp_path)
    flip_bits(run / "checkpoints" / "best.ckpt", n=1, seed=11)
    assert cli_main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  " + str(run / "checkpoints" / "best.ckpt") + ": sha256 differs" in out
    assert f"ok    {run / 'checkpoints' / 'last.ckpt'}: loads; sha256 matches" in out


@pytest.mark.parametrize("sidecar_kept", [True, False], ids=["intact", "written before checksums"])
def test_an_undamaged_checkpoint_resumes(clean, tmp_path, sidecar_kept):
    run = _run_copy(clean, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    if not sidecar_kept:
        sidecar(last).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _resume(run, clean.cohort) == 0
    unchecked = [w for w in caught if "no recorded sha256" in str(w.message)]
    assert bool(unchecked) != sidecar_kept
    # The second epoch was trained and its checkpoints recorded (in a copied run
    # directory Lightning writes them under new names, last-v1.ckpt...).
    saved = sorted((run / "checkpoints").glob("*.ckpt"))
    assert max(torch.load(p, weights_only=True)["epoch"] for p in saved) == 1
    for ckpt in saved:
        if ckpt != last or sidecar_kept:
            assert read_sums(sidecar(ckpt)) == {ckpt.name: file_sha256(ckpt)}


def test_a_save_cut_short_leaves_a_checkpoint_its_sidecar_accepts(tmp_path):
    """Mid-replace the sidecar lists the old and the new digest: either whole file
    passes, a damaged one does not."""
    from clinfuse.errors import IntegrityError
    from clinfuse.training.checkpoints import VerifiedCheckpointIO, verify_checkpoint

    path = tmp_path / "last.ckpt"
    io = VerifiedCheckpointIO()
    io.save_checkpoint({"epoch": 0}, path)
    old, old_bytes = file_sha256(path), path.read_bytes()
    io.save_checkpoint({"epoch": 1}, path)
    new = file_sha256(path)
    sidecar(path).write_text(f"{old}  last.ckpt\n{new}  last.ckpt\n")  # the window
    verify_checkpoint(path)  # the new file
    path.write_bytes(old_bytes)
    verify_checkpoint(path)  # the old file
    flip_bits(path, n=1, seed=5)
    with pytest.raises(IntegrityError, match=f"expected {new}"):
        verify_checkpoint(path)
