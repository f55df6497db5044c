from __future__ import annotations

from pathlib import Path

import pytest

from clinfuse.simulation.simulator import SimConfig, simulate_cohort
from clinfuse.training.config import RunConfig

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "cohort"
    simulate_cohort(out, SimConfig(n_subjects=120, image_size=32, seed=3, progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_config(tiny_run_config):
    """The shared tiny run config, trained for two epochs (early stopping has a choice)."""

    def build(cohort: Path, *extra: str) -> RunConfig:
        return tiny_run_config(cohort, "data.max_steps=48", "optim.max_epochs=2", *extra)

    return build


@pytest.fixture(scope="session")
def tiny_run(tiny_cohort, tiny_config, tmp_path_factory) -> tuple[Path, dict]:
    from clinfuse.training.run import train

    run_dir = tmp_path_factory.mktemp("run") / "run"
    summary = train(tiny_config(tiny_cohort), run_dir)
    return run_dir, summary
