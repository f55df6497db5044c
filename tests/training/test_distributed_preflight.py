"""``train --ray-address`` checks the cluster before anything is written (no cluster here)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_cluster_is_one_clear_error_and_nothing_is_written(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "clinfuse.cli", "train", "--config", "demo",
           "--cohort", str(tiny_cohort), "--run-dir", str(run_dir),
           "--ray-address", address, "--num-workers", "2"]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("clinfuse train:")]
    assert len(lines) == 1, done.stderr[-2000:]
    assert f"error: cannot reach the Ray cluster at {address}" in lines[0]
    assert "ray start --head" in lines[0]
    assert not run_dir.exists() or not any(run_dir.iterdir())  # no config, no lock left


def test_a_sweep_on_an_unreachable_cluster_is_one_clear_error(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "clinfuse.cli", "tune", "--config", "sweep",
           "--cohort", str(tiny_cohort), "--out", str(out), "--address", address]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("clinfuse tune:")]
    assert len(lines) == 1, done.stderr[-2000:]
    assert f"error: cannot reach the Ray cluster at {address}" in lines[0]
