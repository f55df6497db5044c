"""One writer per output: a second writer exits 2 at once naming the holder; a lock
left by a killed writer is taken over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from clinfuse.cli import main as cli_main
from clinfuse.errors import LockHeldError
from clinfuse.integrity.locks import LOCK_FILE, lock_holder, output_lock
from clinfuse.scoring.score import read_scores

from .conftest import CHUNK, assert_same_risks, one_error_line

_HOLD = """
import sys
from clinfuse.integrity.locks import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills us)
"""


@pytest.fixture
def holder(tmp_path):
    """Starts a process that holds the lock of a directory; yields (process, directory)."""
    procs = []

    def start(directory: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(directory)], text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"  # blocks until the lock is taken
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _score_args(clean, out: Path) -> list[str]:
    return ["score", str(clean.run_dir), "--cohort", str(clean.cohort), "--out", str(out),
            "--chunk-size", str(CHUNK), "--no-progress"]  # fmt: skip


def test_a_second_scorer_exits_2_naming_the_holder(clean, tmp_path, holder, capsys):
    out = tmp_path / "out"
    proc = holder(out)
    assert cli_main(_score_args(clean, out)) == 2
    line = one_error_line(capsys.readouterr().err, "score")
    assert f"pid {proc.pid} on host {socket.gethostname()}" in line and str(out) in line
    assert not list(out.glob("part-*")) and not (out / "_manifest.json").exists()
    proc.stdin.close()  # the holder finishes and releases the lock
    proc.wait()
    assert not (out / LOCK_FILE).exists()
    assert cli_main(_score_args(clean, out)) == 0
    assert_same_risks(read_scores(out), clean)


def test_a_lock_left_by_a_killed_scorer_is_taken_over(clean, tmp_path, holder):
    out = tmp_path / "out"
    proc = holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock_holder(out / LOCK_FILE)[0] == proc.pid  # the marker outlived its writer
    with pytest.warns(UserWarning, match=f"took over the lock of pid {proc.pid}"):
        assert cli_main(_score_args(clean, out)) == 0
    assert_same_risks(read_scores(out), clean)
    assert not (out / LOCK_FILE).exists()


def test_train_and_tune_take_the_same_lock(clean, tmp_path, holder, tiny_run_config, capsys):
    from clinfuse.training.run import train
    from clinfuse.tune.sweep import SweepOptions, run_sweep

    run_dir, sweep = tmp_path / "run", tmp_path / "sweep"
    holder(run_dir)
    holder(sweep)
    with pytest.raises(LockHeldError, match="another clinfuse process is writing"):
        train(tiny_run_config(clean.cohort), run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing written
    with pytest.raises(LockHeldError):
        run_sweep(None, sweep, SweepOptions())
    code = cli_main(["train", "--cohort", str(clean.cohort), "--run-dir", str(run_dir)])
    assert code == 2 and str(run_dir) in one_error_line(capsys.readouterr().err, "train")


def test_the_lock_is_released_on_an_error_and_a_refused_run_leaves_no_directory(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), output_lock(out):
        assert (out / LOCK_FILE).is_file() and lock_holder(out / LOCK_FILE)[0] == os.getpid()
        raise RuntimeError("boom")
    assert not out.exists()  # created for the lock, left empty: removed
    # Free again; and a second writer in this same process is refused like any other.
    with output_lock(out), pytest.raises(LockHeldError), output_lock(out):
        pass
