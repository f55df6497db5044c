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


_OVERRIDES = [
    "data.image_size=32", "data.batch_size=32", "data.max_steps=32", "optim.max_epochs=1",
    "optim.progress_bar=false", "model.encoders.timm_image.embed_dim=16",
    "model.encoders.gru_d.hidden=16", "model.encoders.gru_d.embed_dim=16",
    "model.encoders.sgl_mlp.hidden=[16]", "model.encoders.sgl_mlp.embed_dim=16",
    "model.fusion.cfg.dim=16", "model.fusion.cfg.heads=2",
]  # fmt: skip


@pytest.fixture(scope="session")
def scoring_run(tmp_path_factory: pytest.TempPathFactory) -> ScoringRun:
    """120 subjects with 32 px films, attention fusion of all three modalities, 1 epoch."""
    from clinfuse.datasets.simulator import SimConfig, simulate_cohort
    from clinfuse.training.config import load_run_config
    from clinfuse.training.demo import DEMO_CONFIG
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
    cfg = load_run_config(DEMO_CONFIG, [*_OVERRIDES, f"cohort={cohort}"])
    train(cfg, run_dir)
    return ScoringRun(cohort, run_dir)


@pytest.fixture(scope="session")
def artifact(scoring_run: ScoringRun):
    from clinfuse.training.artifact import load_artifact

    return load_artifact(scoring_run.model_dir)
