"""Errors of one line: a user's error exits 2 with ``clinfuse <command>: error: <what>,
<file>, <what to do>``; --debug and CLINFUSE_DEBUG=1 show the traceback; a bug keeps it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clinfuse.cli import main as cli_main
from clinfuse.errors import OutputExistsError

from .conftest import CHUNK, one_error_line


def _args(clean, *extra: str) -> list[str]:
    return ["score", str(clean.run_dir), "--cohort", str(clean.cohort), "--out",
            str(clean.scores), "--chunk-size", str(CHUNK), "--no-progress", *extra]  # fmt: skip


def test_an_existing_output_is_one_line_from_a_real_process(clean):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CLINFUSE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "clinfuse.cli", *_args(clean)], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    line = one_error_line(proc.stderr, "score")
    assert line == (
        f"clinfuse score: error: the output directory already holds a scoring run, "
        f"{clean.scores}, pass --resume to finish it or use a new --out"
    )


@pytest.mark.parametrize("how", ["--debug after the command", "--debug before", "env"])
def test_debug_shows_the_traceback(clean, monkeypatch, how):
    args = _args(clean)
    if how == "--debug after the command":
        args = [*args, "--debug"]
    elif how == "--debug before":
        args = ["--debug", *args]
    else:
        monkeypatch.setenv("CLINFUSE_DEBUG", "1")
    with pytest.raises(OutputExistsError, match="already holds a scoring run"):
        cli_main(args)


def test_a_programming_error_keeps_its_traceback(clean, monkeypatch):
    import clinfuse.scoring.score as score

    def broken(*args, **kwargs):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(score, "score_cohort", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli_main(_args(clean, "--resume"))


def test_a_bad_config_value_is_one_line(clean, tmp_path, capsys):
    code = cli_main(["train", "--cohort", str(clean.cohort), "--run-dir", str(tmp_path / "r"),
                     "data.image_size=0"])  # fmt: skip
    assert code == 2
    assert "invalid config" in one_error_line(capsys.readouterr().err, "train")
    assert not (tmp_path / "r").exists()
