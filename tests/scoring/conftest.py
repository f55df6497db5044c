"""A tiny simulated cohort and a model trained on it for one epoch, built once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

N_SUBJECTS = 120


@dataclass(frozen=True)
class ScoringRun:
    cohort: Path
    run_dir: Path

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


@pytest.fixture(scope="session")
def scoring_run(tmp_path_factory: pytest.TempPathFactory, tiny_run_config) -> ScoringRun:
    """120 subjects with 32 px films, attention fusion of all three modalities, 1 epoch."""
    from clinfuse.simulation.simulator import SimConfig, simulate_cohort
    from clinfuse.training.run import train

    root = tmp_path_factory.mktemp("scoring")
    cohort, run_dir = root / "cohort", root / "run"
    simulate_cohort(
        cohort,
        SimConfig(
            n_subjects=N_SUBJECTS, image_size=32, seed=0, n_groups=4, markers_per_group=5,
            n_causal_groups=2, progress=False,
        ),
    )  # fmt: skip
    train(tiny_run_config(cohort), run_dir)
    return ScoringRun(cohort, run_dir)


@pytest.fixture(scope="session")
def artifact(scoring_run: ScoringRun):
    from clinfuse.training.artifact import load_artifact

    return load_artifact(scoring_run.model_dir)
