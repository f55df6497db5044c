"""Preflight: before any trial (or scoring task) starts, every node that may run one
shows it can.

A sweep on a cluster fails in ways a laptop never shows: a node that does not mount
the cohort trains its trials without images, one that cannot write the storage path
fails its trials again and again, and a GPU request no node can meet leaves trials
PENDING forever. ``preflight`` first checks the request against what the alive
nodes offer, then runs one tiny task pinned to each node that can hold a trial
(``NodeAffinitySchedulingStrategy``, no CPU reserved) that

* reads the footer of the cohort's Parquet files;
* decodes a sample of the cohort's images that the driver itself could decode
  (a broken film is the data's problem, reported by ``clinfuse validate``; a film
  the driver reads and a node cannot is the node's);
* finds the marker file the driver just wrote in each shared folder (``--out`` and
  a local ``--storage-path``) and writes one of its own beside it, so a node that
  has its own local folder at that path, not the shared one, is caught too.

Every problem names the node and the path or resource; they are raised together as
one ``PreflightError`` before anything of the sweep is written (the markers, and
folders created only to hold them, are removed again).

``clinfuse score --ray-address`` runs the same checks for the nodes its actors may
land on, and ``clinfuse train --ray-address`` for the nodes its workers may land on
(``Work`` says what the work is called in the messages: ``TRIAL``, ``SCORING``,
``TRAINING``). ``connect`` joins a cluster only after a plain TCP connection to its
address succeeded: ``ray.init`` on an address where nothing listens retries for
minutes before it gives up.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from clinfuse.datasets.schema import IMAGES, has_table, scan
from clinfuse.errors import UserError

PROBE_IMAGES = 8  # images each node decodes
PROBE_FILES = 8  # Parquet files per table folder (events/*.parquet) each node opens
ANSWER_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 10.0  # a TCP connection to the cluster's address
SHOWN_PROBLEMS = 8  # lines of a preflight error; the rest are counted
_MARKER = ".clinfuse-preflight-"


@dataclass(frozen=True)
class Work:
    """What the checked nodes will run, as the messages name it.

    Attributes:
        unit: one piece of work, e.g. ``trial``.
        options: the options that set one unit's resources.
        without_images: what happens when no image can be read.
    """

    unit: str
    options: str
    without_images: str


TRIAL = Work("trial", "--cpus-per-trial, --gpus-per-trial", "the sweep would train without images")
SCORING = Work(
    "scoring task", "one CPU per actor, --gpus-per-actor",
    "every sample would be scored without its image",
)  # fmt: skip
TRAINING = Work(
    "training worker", "one CPU per worker, --gpus-per-worker",
    "the model would train without images",
)  # fmt: skip


class PreflightError(UserError, RuntimeError):
    """A node cannot do a trial's work; the message names the node and path or resource.

    A ``UserError``: the CLI prints it as ``clinfuse tune: error: ...`` and exits 2.
    """


def preflight(
    cohort_dir: str | Path,
    shared_dirs: Sequence[str | Path],
    image_size: int,
    cpus: float,
    gpus: float,
    cluster: bool,
    needs_images: bool = True,
    work: Work = TRIAL,
) -> list[str]:
    """Checks resources and every trial node; returns the sampled images the driver read.

    Args:
        cohort_dir: the cohort.
        shared_dirs: local folders every node must share with the driver (created
            for the check when missing, and removed again if the check fails).
        image_size: the side images are decoded to, as in training.
        cpus, gpus: one unit of work's request (a trial's, an actor's).
        cluster: False for a Ray started inside this process: its only node is
            this machine, so the checks run here without a task.
        needs_images: the model has an image encoder (a cohort whose sampled images
            the driver cannot read at all is then an error too).
        work: what the nodes will run, for the messages.

    Raises:
        PreflightError: listing every problem, each naming its node.
    """
    nodes = trial_nodes(cpus, gpus, work)
    images = sample_images(cohort_dir, PROBE_IMAGES)
    broken = image_problems(images, image_size)
    if needs_images and images and len(broken) == len(images):
        path, reason = next(iter(broken.items()))
        raise PreflightError(
            f"{node_label()} (driver): none of {len(images)} sampled images of the cohort "
            f"can be read, e.g. {path} ({reason}); {work.without_images}"
        )
    readable = [p for p in images if p not in broken]
    files = cohort_files(cohort_dir)
    with shared_markers(shared_dirs) as markers:
        args = (files, readable, markers, image_size)
        problems = _on_nodes(nodes, args) if cluster else check_node(*args)
        if problems:
            shown = problems[:SHOWN_PROBLEMS]
            more = len(problems) - len(shown)
            raise PreflightError(
                f"preflight: {len(problems)} problem(s) before any {work.unit} started "
                "(nothing was written):\n  "
                + "\n  ".join(shown + ([f"... and {more} more"] if more else []))
            )
    return readable


# ------------------------------------------------------------------------- cluster


def connect(address: str) -> None:
    """Joins the Ray cluster at ``address`` (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``).

    A no-op when Ray is already initialized in this process.

    Raises:
        PreflightError: naming the address, when nothing answers there or Ray
            cannot join it.
    """
    import ray

    if ray.is_initialized():
        return
    hint = "start it (`ray start --head`) or pass the head's HOST:6379 or ray://HOST:10001"
    reason = unreachable(address)
    if reason:
        raise PreflightError(f"cannot reach the Ray cluster at {address} ({reason}); {hint}")
    try:
        ray.init(address=address)
    except (ConnectionError, ValueError) as err:  # no cluster at 'auto', a bad address
        raise PreflightError(
            f"cannot join the Ray cluster at {address} ({_reason(err)}); {hint}"
        ) from err


def unreachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why a TCP connection to ``HOST:PORT`` (or ``ray://HOST:PORT``) fails, or None.

    None too for ``auto`` and other addresses without a port: Ray resolves those itself.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        return f"no answer at {host}:{port}: {err.strerror or type(err).__name__}"
    return None


# ----------------------------------------------------------------------- resources


def trial_nodes(cpus: float, gpus: float, work: Work = TRIAL) -> list[dict[str, Any]]:
    """The alive nodes whose resources can hold one trial (or other unit of ``work``).

    Raises:
        PreflightError: when none can, listing what each node offers; Ray would
            otherwise keep the trials PENDING forever.
    """
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    fit = [n for n in alive if _offers(n, "CPU") >= cpus and _offers(n, "GPU") >= gpus]
    if fit:
        return fit
    offered = "; ".join(
        f"{_label(n)}: {_offers(n, 'CPU'):g} CPU, {_offers(n, 'GPU'):g} GPU" for n in alive
    )
    raise PreflightError(
        f"no alive node can hold one {work.unit}, which needs {cpus:g} CPU and {gpus:g} GPU "
        f"({work.options}); the cluster offers: {offered or 'no node'}"
    )


def _offers(node: dict[str, Any], resource: str) -> float:
    return float(node.get("Resources", {}).get(resource, 0.0))


def _label(node: dict[str, Any]) -> str:
    return f"node {node.get('NodeManagerAddress')} ({str(node.get('NodeID'))[:12]})"


def node_label() -> str:
    """``node <ip> (<node id prefix>)`` of the calling process's Ray node."""
    import ray

    if not ray.is_initialized():
        return "this machine"
    context = ray.get_runtime_context()
    return f"node {ray.util.get_node_ip_address()} ({context.get_node_id()[:12]})"


# --------------------------------------------------------------------- what to read


def sample_images(cohort_dir: str | Path, n: int) -> list[str]:
    """Up to ``n`` distinct image paths of the cohort, evenly spread, absolute."""
    if not has_table(cohort_dir, IMAGES):
        return []
    paths = scan(cohort_dir, IMAGES).select(pl.col("path").cast(pl.String)).collect()
    unique = sorted(set(paths["path"].drop_nulls().to_list()))
    if not unique:
        return []
    picks = sorted({round(i) for i in _spread(len(unique), n)})
    root = Path(cohort_dir).resolve()
    return [str(root / unique[i]) for i in picks]


def _spread(length: int, n: int) -> Iterator[float]:
    step = max(length - 1, 0) / max(n - 1, 1)
    return (i * step for i in range(min(n, length)))


def cohort_files(cohort_dir: str | Path) -> list[str]:
    """The cohort's Parquet files: every top-level table, up to PROBE_FILES per folder."""
    root = Path(cohort_dir).resolve()
    files = sorted(root.glob("*.parquet"))
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        parts = sorted(folder.glob("*.parquet"))
        files += [parts[round(i)] for i in _spread(len(parts), PROBE_FILES)]
    return [str(p) for p in files]


# ----------------------------------------------------------------- checks on a node


def check_node(
    files: Sequence[str], images: Sequence[str], markers: dict[str, str], image_size: int
) -> list[str]:
    """Everything this node cannot do, one line each naming the node and path."""
    where = node_label()
    problems = [f"{where}: cannot read {p} ({why})" for p, why in file_problems(files).items()]
    problems += [
        f"{where}: cannot read image {p} ({why})"
        for p, why in image_problems(images, image_size).items()
    ]
    problems += [f"{where}: {line}" for line in unshared_dirs(markers)]
    return problems


def file_problems(paths: Sequence[str]) -> dict[str, str]:
    """{path: reason} for each Parquet file whose footer cannot be read here."""
    import pyarrow.parquet as pq

    out = {}
    for path in paths:
        try:
            pq.read_metadata(path)
        except Exception as err:  # noqa: BLE001 - any reason is the node's problem
            out[path] = _reason(err)
    return out


def image_problems(paths: Sequence[str], image_size: int) -> dict[str, str]:
    """{path: reason} for each image that cannot be decoded and resized here, as in training."""
    import numpy as np
    import torch

    from clinfuse.datasets.images import read_unit, resize_square

    out = {}
    for path in paths:
        try:
            resize_square(torch.from_numpy(np.asarray(read_unit(path), np.float32)), image_size)
        except Exception as err:  # noqa: BLE001 - the loader masks any failure in training
            out[path] = _reason(err).replace(f"{path}: ", "")  # the reader names the file
    return out


def unshared_dirs(markers: dict[str, str]) -> list[str]:
    """A line for each folder where the driver's marker is not seen here, or that
    cannot be written here."""
    out = []
    for marker, token in markers.items():
        folder = os.path.dirname(marker)
        try:
            seen = Path(marker).read_text()
        except OSError as err:
            seen = _reason(err)
        if seen != token:
            out.append(
                f"does not see the driver's {folder}: its marker {os.path.basename(marker)} "
                f"is not readable here ({seen}); put it on storage every node mounts"
            )
            continue
        own = f"{marker}.{uuid.uuid4().hex}"
        try:
            Path(own).write_text(token)
            os.remove(own)
        except OSError as err:
            out.append(f"cannot write {folder} ({_reason(err)})")
    return out


def _reason(err: BaseException) -> str:
    """``Type: first line``; for a Ray task error, the remote exception's last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if type(err).__name__.startswith("RayTaskError") and lines:
        return lines[-1]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


@contextmanager
def shared_markers(folders: Sequence[str | Path]) -> Iterator[dict[str, str]]:
    """A marker file with a fresh token in each folder; yields {marker path: token}.

    Folders are created when missing; on exit the markers go, and so does every
    folder this created if it is still empty (a failed preflight leaves no trace).

    Raises:
        PreflightError: naming the folder the driver itself cannot write.
    """
    created: list[Path] = []
    markers: dict[str, str] = {}
    try:
        for folder in dict.fromkeys(Path(f).resolve() for f in folders):
            try:
                created += _make_dirs(folder)
                token = uuid.uuid4().hex
                marker = folder / f"{_MARKER}{token}"
                marker.write_text(token)
            except OSError as err:
                raise PreflightError(
                    f"{node_label()} (driver): cannot write {folder} ({_reason(err)})"
                ) from err
            markers[str(marker)] = token
        yield markers
    finally:
        for marker in markers:
            Path(marker).unlink(missing_ok=True)
        for folder in reversed(created):
            with suppress(OSError):  # not empty: something else was written there meanwhile
                folder.rmdir()


def _make_dirs(folder: Path) -> list[Path]:
    """Creates ``folder`` and missing parents; returns the ones it created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    for path in missing:
        path.mkdir()
    return missing


# ---------------------------------------------------------------------- Ray tasks


def _on_nodes(nodes: list[dict[str, Any]], args: tuple) -> list[str]:
    """``check_node(*args)`` on every node, each pinned there; problems of all nodes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(check_node)
    pending = {
        task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(*args): node
        for node in nodes
    }
    done, late = ray.wait(list(pending), num_returns=len(pending), timeout=ANSWER_TIMEOUT_S)
    problems: list[str] = []
    for ref in done:
        try:
            problems += ray.get(ref)
        except Exception as err:  # noqa: BLE001 - e.g. clinfuse not installed on that node
            problems.append(f"{_label(pending[ref])}: the check failed ({_reason(err)})")
    for ref in late:
        ray.cancel(ref, force=True)
        problems.append(f"{_label(pending[ref])}: no answer within {ANSWER_TIMEOUT_S:g} s")
    return problems
