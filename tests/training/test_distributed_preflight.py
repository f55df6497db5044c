"""``train --ray-address`` and ``tune --address`` check the cluster before anything is
written (no cluster here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clinfuse.training.local_cluster import free_ports


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("train", ["--config", "demo", "--run-dir", "{out}", "--num-workers", "2",
                   "--ray-address"]),
        ("tune", ["--config", "sweep", "--out", "{out}", "--address"]),
    ],
)  # fmt: skip
def test_an_unreachable_cluster_is_one_clear_error_and_nothing_is_written(
    command: str, options: list[str], tiny_cohort: Path, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_ports(1)[0]}"  # bound, then released: nothing listens
    out = tmp_path / "out"
    args = [a.format(out=out) for a in options]
    cmd = [sys.executable, "-m", "clinfuse.cli", command, "--cohort", str(tiny_cohort),
           *args, address]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    prefix = f"clinfuse {command}:"
    lines = [line for line in done.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, done.stderr[-2000:]
    assert f"error: cannot reach the Ray cluster at {address}" in lines[0]
    assert "ray start --head" in lines[0]
    assert not out.exists() or not any(out.iterdir())  # no config, no lock left
