"""A real two-node Ray cluster on this machine: a sweep survives losing its worker node,
and the preflight stops a sweep the cluster cannot run before anything is written.

The head and the worker are ``ray start --block`` processes, each in its own session
(process group), with its own ``--temp-dir`` and private ports. They are stopped by
those process groups and the trial processes their raylets started, never with
``ray stop`` (which would stop every Ray on the machine). Where this process may
make mount namespaces (root), the worker starts in one with an empty tmpfs over one
folder, so it cannot see what the head puts there, as a node without a share.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from clinfuse.simulation.simulator import SimConfig, simulate_cohort
from clinfuse.training.local_cluster import free_ports, process_table

pytestmark = [pytest.mark.cluster, pytest.mark.ray]

RAY = str(Path(sys.executable).with_name("ray"))
EPOCHS = 12  # long enough that a trial is caught mid-way, with checkpoints behind it
CONFIG = {
    "seed": 0,
    "data": {"batch_size": 32, "image_size": 32, "max_steps": 16},
    "model": {
        "encoders": {
            "timm_image": {"model_name": "efficientnet_lite0", "embed_dim": 8},
            "gru_d": {"hidden": 8, "embed_dim": 8},
            "sgl_mlp": {"hidden": [8], "embed_dim": 8},
        },
        "fusion": {"name": "attention", "cfg": {"dim": 16, "heads": 2}},
    },
    "optim": {"max_epochs": EPOCHS, "patience": EPOCHS, "progress_bar": False},
}


def _can_hide_folders() -> bool:
    """Whether this process may start a node in a mount namespace of its own (root)."""
    probe = ["unshare", "--mount", "--propagation", "private", "true"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Node:
    """One ``ray start --block`` in its own process group, and what it started.

    ``hidden``: a folder this node must not see (an empty tmpfs is mounted over it
    in a mount namespace of the node's own, as on a machine without that share).
    """

    def __init__(
        self, args: list[str], temp: Path, log: Path, env: dict, hidden: Path | None = None
    ) -> None:
        ports = iter(free_ports(7))
        private = [
            "--temp-dir", str(temp), "--num-cpus", "1", "--disable-usage-stats", "--block",
            "--node-manager-port", str(next(ports)), "--object-manager-port", str(next(ports)),
            "--dashboard-agent-grpc-port", str(next(ports)),
            "--dashboard-agent-listen-port", str(next(ports)),
            "--metrics-export-port", str(next(ports)),
            "--runtime-env-agent-port", str(next(ports)),
            "--min-worker-port", "0", "--max-worker-port", "0",
        ]  # fmt: skip
        command = [RAY, "start", *args, *private]
        if hidden is not None:  # unshare and sh exec: the pid stays the ray start's
            mount = f'mount -t tmpfs none {shlex.quote(str(hidden))} && exec "$@"'
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount,
                       "sh", *command]  # fmt: skip
        self.log, self.temp = log, temp
        self.proc = subprocess.Popen(
            command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def wait_started(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.3)

    def started_pids(self) -> tuple[set[int], set[int]]:
        """(this node's process group, the processes its members started: Ray workers
        run in sessions of their own)."""
        procs = process_table()
        group = {p for p, (_, pgid) in procs.items() if pgid == self.proc.pid}
        return group, {p for p, (ppid, _) in procs.items() if ppid in group} - group

    def kill(self) -> None:
        group, children = self.started_pids()
        for pid in group | children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and a worker node, one CPU each; yields (address, head, worker, hidden).

    ``hidden`` is a folder the head sees and the worker does not (None where this
    process may not make mount namespaces).
    """
    root = tmp_path_factory.mktemp("cluster")
    hidden = root / "not-on-the-worker" if _can_hide_folders() else None
    if hidden is not None:
        hidden.mkdir()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    gcs, client, dashboard = free_ports(3)
    head_args = ["--head", "--port", str(gcs), "--ray-client-server-port", str(client),
                 "--dashboard-port", str(dashboard), "--include-dashboard=false"]  # fmt: skip
    nodes = [Node(head_args, root / "head", root / "head.log", env)]
    try:
        nodes[0].wait_started()
        join = ["--address", f"127.0.0.1:{gcs}"]
        nodes.append(Node(join, root / "w", root / "w.log", env, hidden))
        nodes[1].wait_started()
        yield f"127.0.0.1:{gcs}", nodes[0], nodes[1], hidden
    finally:
        for node in reversed(nodes):
            node.kill()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    cfg = SimConfig(
        n_subjects=120, image_size=32, n_groups=5, markers_per_group=4, n_causal_groups=2,
        progress=False,
    )  # fmt: skip
    return simulate_cohort(tmp_path_factory.mktemp("cohort") / "cohort", cfg)


def _tune(address: str, cohort: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "clinfuse.cli", "tune", "--config", str(config),
            "--cohort", str(cohort), "--out", str(out), "--address", address,
            "--space", "tiny", *extra]  # fmt: skip


def _env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def test_gpu_request_no_node_can_meet_fails_before_anything_is_written(
    cluster, cohort: Path, tmp_path: Path
) -> None:
    address, _, _, _ = cluster
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "sweep"
    run = subprocess.run(
        _tune(address, cohort, out, config, "--gpus-per-trial", "0.25"),
        env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert (
        "clinfuse tune: error: no alive node can hold one trial, which needs 1 CPU and "
        "0.25 GPU" in run.stderr
    ), run.stderr[-2000:]
    assert re.search(r"node \S+ \([0-9a-f]{12}\): 1 CPU, 0 GPU", run.stderr)  # what each offers
    assert not out.exists()


def test_a_node_that_cannot_see_the_cohort_stops_the_sweep_before_it_starts(
    cluster, cohort: Path, tmp_path: Path
) -> None:
    address, _, worker, hidden = cluster
    if hidden is None:
        pytest.skip("hiding a folder from one node needs a mount namespace (root)")
    shared = Path(shutil.copytree(cohort, hidden / "cohort"))  # the head sees it
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "sweep"
    run = subprocess.run(
        _tune(address, shared, out, config), env=_env(), capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    # The worker names each file it cannot read; the head (same IP here) reads them all.
    missing = re.findall(r"node \S+ \(([0-9a-f]{12})\): cannot read (?:image )?(\S+)", run.stderr)
    assert {node for node, _ in missing} == {_node_id(worker)[:12]}, run.stderr[-3000:]
    assert str(shared / "labels.parquet") in {path for _, path in missing}
    # Every Parquet file and the 8 sampled films, each a problem; 8 lines shown.
    n = len(list(shared.glob("*.parquet"))) + 8
    assert f"preflight: {n} problem(s)" in run.stderr and f"and {n - 8} more" in run.stderr
    assert "clinfuse tune: error: preflight:" in run.stderr
    assert not out.exists()


def test_a_node_that_cannot_see_the_sweep_folder_stops_the_sweep_before_it_starts(
    cluster, cohort: Path, tmp_path: Path
) -> None:
    address, _, worker, hidden = cluster
    if hidden is None:
        pytest.skip("hiding a folder from one node needs a mount namespace (root)")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = hidden / "sweep"  # the worker has a folder at this path, but not the head's
    run = subprocess.run(
        _tune(address, cohort, out, config), env=_env(), capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    worker_id = _node_id(worker)[:12]
    # --out, and Tune's storage under it: the driver's marker files are not there.
    for folder in (out, out / "ray"):
        assert f"({worker_id}): does not see the driver's {folder}: its marker" in run.stderr
    assert "preflight: 2 problem(s)" in run.stderr, run.stderr[-3000:]
    assert not out.exists()


def _node_id(node: Node) -> str:
    """The node id the node's raylet logged when it started."""
    log = (node.temp / "session_latest" / "logs" / "raylet.out").read_text()
    found = re.search(r"Setting node ID node_id=([0-9a-f]{56})", log)
    assert found, log[:3000]
    return found.group(1)


def _trial_on(node: Node, experiment: Path) -> dict | None:
    """A result a trial running on ``node`` reported, with epochs still to go."""
    _, workers = node.started_pids()
    for path in glob.glob(str(experiment / "*" / "result.json")):
        for line in Path(path).read_text().splitlines():
            try:
                result = json.loads(line)
            except ValueError:  # a line being written
                continue
            if result["pid"] in workers and result["training_iteration"] <= EPOCHS - 4:
                return result
    return None


def _results(out: Path, trial_id: str) -> list[dict]:
    (path,) = glob.glob(str(out / "ray" / "sweep" / f"train_fn_{trial_id}_*" / "result.json"))
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_sweep_finishes_every_trial_when_the_worker_node_dies(
    cluster, cohort: Path, tmp_path: Path
) -> None:
    address, _, worker, _ = cluster
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "sweep"
    log = tmp_path / "sweep.log"
    args = ["--num-samples", "3", "--max-concurrent", "2", "--grace-period", str(EPOCHS)]
    proc = subprocess.Popen(
        _tune(address, cohort, out, config, *args), env=_env(), stdout=log.open("w"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        # One CPU per node and two trials at once: one trial runs on the worker.
        deadline = time.monotonic() + 120
        killed = None
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            killed = _trial_on(worker, out / "ray" / "sweep")
            time.sleep(0.2)
        assert killed is not None, log.read_text()[-3000:]
        worker.kill()
        assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    table = pl.read_parquet(out / "results.parquet")
    assert table.height == 3 and table["trial_id"].n_unique() == 3
    assert set(table["status"]) <= {"completed", "stopped"}, table
    row = table.filter(pl.col("trial_id") == killed["trial_id"]).row(0, named=True)
    # It failed with its node, restarted on the head from a checkpoint and finished.
    assert row["failures"] >= 1 and row["retries"] == row["failures"], row
    assert row["node_id"] != killed["node_id"] and row["epochs"] == EPOCHS, row
    after = [r for r in _results(out, killed["trial_id"]) if r["node_id"] != killed["node_id"]]
    assert after[0]["training_iteration"] > 1, after[0]  # not from scratch
    assert (out / "best" / "model" / "artifact.json").is_file()
