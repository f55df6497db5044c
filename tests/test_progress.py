"""Progress output: bars on a terminal, one plain line per step in a log file."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

from clinfuse.progress import LineProgress, format_seconds, interactive, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_interactive_only_on_a_terminal(tmp_path):
    with open(tmp_path / "log", "w") as f:
        assert not interactive(f)
    assert interactive(_Terminal())
    assert not interactive(io.StringIO())


def test_a_log_gets_one_line_per_step_with_rate_and_eta():
    log = io.StringIO()
    items = list(progress(range(4), total=4, desc="scoring", unit="chunk", stream=log))
    assert items == [0, 1, 2, 3]
    lines = log.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        f"scoring: {k}/4 chunks" for k in (1, 2, 3, 4)
    ]
    assert "\r" not in log.getvalue()
    assert all("ETA" in line for line in lines[:-1]) and "done in" in lines[-1]


def test_line_text_from_elapsed_time():
    bar = LineProgress(total=4, desc="scoring", unit="chunk", stream=io.StringIO())
    bar.n = 2
    assert bar.line(10.0) == "scoring: 2/4 chunks, 0.2 chunks/s, ETA 10s"
    assert format_seconds(185) == "3m05s" and format_seconds(7620) == "2h07m"


def test_a_terminal_keeps_the_bar_and_disabled_prints_nothing():
    from tqdm.auto import tqdm

    assert isinstance(progress(total=3, desc="x", unit="chunk", stream=_Terminal()), tqdm)
    log = io.StringIO()
    for _ in progress(range(3), total=3, desc="x", unit="chunk", enabled=False, stream=log):
        pass
    assert log.getvalue() == ""


def test_train_and_score_write_plain_lines_when_redirected(tmp_path):
    """A real run with its output redirected to a file, as under nohup or CI."""
    script = textwrap.dedent(f"""
        import clinfuse
        cohort = clinfuse.simulate({str(tmp_path / "c")!r}, subjects=120, seed=3,
                                   image_size=32)
        overrides = ["data.image_size=32", "data.max_steps=16", "optim.max_epochs=2",
                     "model.encoders.timm_image=null", "model.encoders.sgl_mlp=null",
                     "model.encoders.gru_d={{hidden: 8, embed_dim: 8}}",
                     "model.fusion.cfg.dim=8", "model.fusion.cfg.heads=2"]
        run = clinfuse.train(cohort, run_dir={str(tmp_path / "run")!r}, overrides=overrides)
        clinfuse.score(run, cohort, chunk_size=40)
    """)
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT,
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    text = log.read_text()
    assert "\r" not in text, text[-2000:]
    lines = text.splitlines()
    assert sum(line.startswith("epoch 1/2: ") for line in lines) == 1, text[-2000:]
    epoch2 = [line for line in lines if line.startswith("epoch 2/2: ")]
    assert len(epoch2) == 1 and "val_auroc" in epoch2[0] and "/epoch" in epoch2[0]
    chunks = [line for line in lines if line.startswith("scoring (0/3 chunks done before): ")]
    assert [line.split(": ")[1].split(",")[0] for line in chunks] == [
        "1/3 chunks",
        "2/3 chunks",
        "3/3 chunks",
    ]
    assert any(line.startswith("films: ") for line in lines)
