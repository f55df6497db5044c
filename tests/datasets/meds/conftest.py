"""Shared MEDS fixtures: the simulator's cohort written both ways, and a trained MEDS run.

The static sample of ``meds-testing-helpers`` comes from that package's own pytest
plugin (fixture ``simple_static_MEDS_dataset_with_task``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from clinfuse.api import Cohort
from clinfuse.simulation.simulator import SimConfig

SIM = dict(n_subjects=120, image_size=32, seed=3, progress=False)


@pytest.fixture(scope="session")
def sim_meds(tmp_path_factory) -> Cohort:
    """``simulate --format meds``: OUT/meds, OUT/labels, OUT/sidecars."""
    from clinfuse.datasets.meds.export import simulate_meds

    out = tmp_path_factory.mktemp("sim_meds") / "out"
    root, labels, sidecars = simulate_meds(out, SimConfig(**SIM))
    return Cohort(root, labels, sidecars)


@pytest.fixture(scope="session")
def sim_cohort(tmp_path_factory) -> Path:
    """The same simulated subjects as a cohort directory."""
    from clinfuse.simulation.simulator import simulate_cohort

    return simulate_cohort(tmp_path_factory.mktemp("sim_cohort") / "cohort", SimConfig(**SIM))


def train_tiny(tiny_run_config, cohort: Cohort | Path, run_dir: Path):
    """The shared tiny demo run (one epoch) on a cohort directory or a MEDS Cohort."""
    from clinfuse.api import Run
    from clinfuse.training.run import train

    cohort = cohort if isinstance(cohort, Cohort) else Cohort(Path(cohort))
    cfg = tiny_run_config(cohort.path)
    cfg.labels = str(cohort.labels or "")
    cfg.sidecars = str(cohort.sidecars or "")
    train(cfg, run_dir)
    return Run.load(run_dir)


@pytest.fixture(scope="session")
def meds_run(sim_meds, tiny_run_config, tmp_path_factory):
    """The tiny demo run trained on ``sim_meds`` through the MEDS path."""
    return train_tiny(tiny_run_config, sim_meds, tmp_path_factory.mktemp("meds_run") / "run")


@pytest.fixture(scope="session")
def cohort_run(sim_cohort, tiny_run_config, tmp_path_factory):
    """The same run trained on ``sim_cohort`` through the cohort layout."""
    return train_tiny(tiny_run_config, sim_cohort, tmp_path_factory.mktemp("cohort_run") / "run")
