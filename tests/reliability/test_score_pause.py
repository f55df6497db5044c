"""Ctrl-C is a pause for ``score``: a real ``clinfuse score`` process gets SIGINT or
SIGTERM mid-run, keeps what it finished, exits 130/143 naming the ``--resume`` command
(no traceback), and that command finishes the run with every sample once."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from clinfuse.cli import main
from clinfuse.hashing import file_sha256
from clinfuse.scoring.parts import MANIFEST
from clinfuse.scoring.score import read_scores

from .conftest import simulate

# Scored one subject per chunk: with the shared 24-subject cohort a loaded machine let
# the run finish between the first part file and the signal; 480 chunks leave time to
# spare at load average 8 on 2 cores.
N_SCORED = 480


@pytest.fixture(scope="module")
def larger_cohort(tmp_path_factory) -> Path:
    """A cohort of the trained model's world (same sites, channels, markers), more subjects."""
    return simulate(tmp_path_factory.mktemp("pause") / "cohort", n_subjects=N_SCORED, seed=1)


def _default_stop_signals() -> None:
    """In the child before exec: SIGINT and SIGTERM back to their default dispositions."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_pauses_score_and_resume_finishes(
    trained, larger_cohort, tmp_path, capsys, signum
) -> None:
    out = tmp_path / "scores"
    args = ["score", str(trained.run_dir), "--cohort", str(larger_cohort), "--out", str(out),
            "--chunk-size", "1", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The run starts as from a terminal: SIGINT and SIGTERM at their defaults. A suite
    # launched from `nohup` or `cmd &` passes SIGINT down ignored, and the scorer keeps an
    # inherited ignore by design (scoring/stops.py), which made this case finish with
    # exit 0 and no output in some runs of the suite.
    proc = subprocess.Popen([sys.executable, "-m", "clinfuse.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_stop_signals)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(out.glob("part-*.parquet")):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no part file after 120 s"
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    found = re.search(r"paused by (\w+) with (\d+) of (\d+) chunks done", err)
    assert found, err[-2000:]
    done = int(found[2])
    assert (found[1], found[3]) == (signal.Signals(signum).name, str(N_SCORED))
    assert 0 < done < N_SCORED, "the run finished before the signal; nothing was tested"
    # What is on disk is consistent: exactly the reported parts, each with its digest.
    parts = json.loads((out / MANIFEST).read_text())["parts"]
    files = sorted(p.name for p in out.glob("part-*.parquet"))
    assert sorted(parts) == files and len(files) == done
    assert all(parts[f]["sha256"] == file_sha256(out / f) for f in files)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    resume = err.split("Continue with: ")[1].strip()
    assert shlex.split(resume) == ["clinfuse", *args, "--resume"]
    assert main(shlex.split(resume)[1:]) == 0
    assert f"({done} already done)" in capsys.readouterr().out
    scores = read_scores(out)
    key = ["subject_id", "prediction_time"]
    labels = pl.read_parquet(larger_cohort / "labels.parquet").select(key).sort(key)
    assert scores.select(key).equals(labels)
    assert scores["error"].null_count() == scores.height
