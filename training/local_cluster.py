"""A private multi-node Ray cluster on this machine, for tests, benchmarks and trials.

Each node is a ``ray start --block`` process in its own session (process group),
with its own ``--temp-dir`` and free ports, so it never meets another Ray on the
machine. Nodes are stopped by killing the processes they started (their group and
the workers their raylets spawned), never with ``ray stop``, which would stop
every Ray on the machine.

    with LocalCluster(tmp, cpus=[2, 1]) as cluster:
        clinfuse.train(..., ray_address=cluster.address, num_workers=2)
        cluster.kill(1)  # the second node dies
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def free_ports(n: int) -> list[int]:
    """``n`` ports free on the loopback interface right now."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def process_table() -> dict[int, tuple[int, int]]:
    """{pid: (ppid, pgid)} of every process on the machine."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(name)] = (int(stat[1]), int(stat[2]))
    return out


class LocalNode:
    """One ``ray start --block`` in its own process group, and what it started."""

    def __init__(self, args: list[str], temp: Path, cpus: int, env: dict[str, str]) -> None:
        ports = iter(free_ports(7))
        private = [
            "--temp-dir", str(temp), "--num-cpus", str(cpus), "--disable-usage-stats",
            "--block", "--node-manager-port", str(next(ports)),
            "--object-manager-port", str(next(ports)),
            "--dashboard-agent-grpc-port", str(next(ports)),
            "--dashboard-agent-listen-port", str(next(ports)),
            "--metrics-export-port", str(next(ports)),
            "--runtime-env-agent-port", str(next(ports)),
            "--min-worker-port", "0", "--max-worker-port", "0",
        ]  # fmt: skip
        ray = str(Path(sys.executable).with_name("ray"))
        temp.mkdir(parents=True, exist_ok=True)
        self.temp, self.log = temp, temp.with_suffix(".log")
        self.proc = subprocess.Popen(
            [ray, "start", *args, *private],
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_started(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def node_id(self) -> str:
        """The Ray node id this node's raylet logged when it started."""
        log = (self.temp / "session_latest" / "logs" / "raylet.out").read_text()
        found = re.search(r"Setting node ID node_id=([0-9a-f]{56})", log)
        if not found:
            raise RuntimeError(f"no node id in {self.temp}/session_latest/logs/raylet.out")
        return found.group(1)

    def pids(self) -> set[int]:
        """This node's process group and the processes its members started (Ray
        workers run in sessions of their own)."""
        procs = process_table()
        group = {p for p, (_, pgid) in procs.items() if pgid == self.proc.pid}
        return group | {p for p, (ppid, _) in procs.items() if ppid in group}

    def kill(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)


class LocalCluster:
    """A head node and worker nodes on this machine, ``cpus[i]`` logical CPUs each.

    Args:
        root: a folder for the nodes' temp dirs and logs.
        cpus: logical CPUs of the head, then of each worker node.
        env: extra environment of the nodes (and so of their workers).
    """

    def __init__(self, root: str | Path, cpus: list[int], env: dict[str, str] | None = None):
        self.root, self.cpus = Path(root), list(cpus)
        self.env = {**os.environ, **RAY_ENV, "OMP_NUM_THREADS": "1", **(env or {})}
        self.nodes: list[LocalNode] = []
        self.address = ""

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        gcs, client, dashboard = free_ports(3)
        head = ["--head", "--port", str(gcs), "--ray-client-server-port", str(client),
                "--dashboard-port", str(dashboard), "--include-dashboard=false"]  # fmt: skip
        self.nodes.append(LocalNode(head, self.root / "head", self.cpus[0], self.env))
        self.nodes[0].wait_started()
        self.address = f"127.0.0.1:{gcs}"
        for i, cpus in enumerate(self.cpus[1:], start=1):
            node = LocalNode(["--address", self.address], self.root / f"w{i}", cpus, self.env)
            self.nodes.append(node)
            node.wait_started()

    def kill(self, index: int) -> None:
        """Kills node ``index`` (0 is the head) and every process it started."""
        self.nodes[index].kill()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
        self.nodes = []
