from __future__ import annotations

from pathlib import Path

import pytest

from clinfuse.datasets.simulator import SimConfig, simulate_cohort
from clinfuse.training.config import RunConfig, load_run_config

TINY_OVERRIDES = [
    "data.batch_size=32",
    "data.image_size=32",
    "data.max_steps=48",
    "model.encoders.timm_image.embed_dim=16",
    "model.encoders.gru_d.hidden=16",
    "model.encoders.gru_d.embed_dim=16",
    "model.encoders.sgl_mlp.embed_dim=16",
    "model.encoders.sgl_mlp.hidden=[16]",
    "model.fusion.cfg.dim=16",
    "model.fusion.cfg.heads=2",
    "optim.max_epochs=2",
    "optim.progress_bar=false",
]
DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort") / "cohort"
    simulate_cohort(out, SimConfig(n_subjects=120, image_size=32, seed=3, progress=False))
    return out


def _tiny_config(cohort: Path, *extra: str) -> RunConfig:
    return load_run_config(DEMO, [*TINY_OVERRIDES, f"cohort={cohort}", *extra])


@pytest.fixture(scope="session")
def tiny_config():
    """Builds the tiny demo config for a cohort, with extra key=value overrides."""
    return _tiny_config


@pytest.fixture(scope="session")
def tiny_run(tiny_cohort, tmp_path_factory) -> tuple[Path, dict]:
    from clinfuse.training.run import train

    run_dir = tmp_path_factory.mktemp("run") / "run"
    summary = train(_tiny_config(tiny_cohort), run_dir)
    return run_dir, summary
