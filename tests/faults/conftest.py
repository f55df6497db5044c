"""Fault injection: a tiny trained model and its clean score output, built once per
session; each test damages a fresh copy of what clinfuse wrote, on a fixed seed.

Every test asserts one of two outcomes: a clear one-line error naming the damaged
file, or a correct recompute (risks equal to the clean run within 1e-6). Never
silently different risks.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest

N_SUBJECTS = 24
CHUNK = 8  # subjects per part: 3 parts


@dataclass(frozen=True)
class Clean:
    """The clean cohort, run directory and score output every fault is compared with."""

    cohort: Path
    run_dir: Path
    scores: Path
    risks: pl.DataFrame  # subject_id, prediction_time, risk of the clean run

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


@pytest.fixture(scope="session")
def clean(tmp_path_factory: pytest.TempPathFactory, tiny_run_config) -> Clean:
    from clinfuse.scoring.score import read_scores, score_cohort
    from clinfuse.simulation.simulator import SimConfig, simulate_cohort
    from clinfuse.training.run import train

    root = tmp_path_factory.mktemp("faults")
    cohort = simulate_cohort(
        root / "cohort",
        SimConfig(
            n_subjects=N_SUBJECTS, image_size=32, seed=0, n_groups=4, markers_per_group=5,
            n_causal_groups=2, progress=False,
        ),
    )  # fmt: skip
    train(tiny_run_config(cohort), root / "run")
    score_cohort(root / "run", cohort, root / "scores", chunk_size=CHUNK, progress=False)
    risks = read_scores(root / "scores").select("subject_id", "prediction_time", "risk")
    return Clean(cohort, root / "run", root / "scores", risks)


@pytest.fixture
def model_copy(clean: Clean, tmp_path: Path) -> Path:
    """A writable copy of the clean model artifact directory."""
    return Path(shutil.copytree(clean.model_dir, tmp_path / "model"))


@pytest.fixture
def scores_copy(clean: Clean, tmp_path: Path) -> Path:
    """A writable copy of the clean score output."""
    return Path(shutil.copytree(clean.scores, tmp_path / "scores"))


# --------------------------------------------------------------------------- faults


def flip_bits(path: Path, n: int = 1, seed: int = 0, start: int = 0, stop: int | None = None):
    """Flips ``n`` random bits of ``path`` within bytes [start, stop), on a fixed seed."""
    data = bytearray(path.read_bytes())
    stop = len(data) if stop is None else stop
    rng = np.random.default_rng(seed)
    for offset in rng.choice(np.arange(start, stop), size=n, replace=False):
        data[int(offset)] ^= 1 << int(rng.integers(0, 8))
    path.write_bytes(bytes(data))


def flip_exponent_bit_of_largest_tensor(weights: Path) -> str:
    """The issue's weight rot: the lowest exponent bit of every float32 of the largest
    tensor flipped (each value doubled or halved). Returns the tensor's name."""
    data = bytearray(weights.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    name = max(
        (k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32"),
        key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0],
    )
    lo, hi = (8 + header_len + o for o in header[name]["data_offsets"])
    words = np.frombuffer(bytes(data[lo:hi]), dtype="<u4") ^ np.uint32(1 << 23)
    data[lo:hi] = words.tobytes()
    weights.write_bytes(bytes(data))
    return name


def tensor_data_start(weights: Path) -> int:
    """Offset of the first tensor byte of a safetensors file (after its JSON header)."""
    (header_len,) = struct.unpack("<Q", weights.read_bytes()[:8])
    return 8 + header_len


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def assert_same_risks(got: pl.DataFrame, clean: Clean) -> None:
    """One row per clean sample, in order, with the clean run's risk within 1e-6."""
    assert got["subject_id"].to_list() == clean.risks["subject_id"].to_list()
    assert got["prediction_time"].to_list() == clean.risks["prediction_time"].to_list()
    np.testing.assert_allclose(got["risk"].to_numpy(), clean.risks["risk"].to_numpy(), atol=1e-6)


def one_error_line(err: str, command: str) -> str:
    """The single ``clinfuse <command>: error:`` line of stderr (warnings may precede it)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"clinfuse {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]
