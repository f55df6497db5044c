from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory, tiny_run_config) -> tuple[Path, dict]:
    """A tiny real run (simulate -> train -> evaluate); returns the evaluation dir and metrics."""
    from clinfuse.evaluation.evaluate import evaluate
    from clinfuse.simulation.simulator import SimConfig, simulate_cohort
    from clinfuse.training.run import train

    root = tmp_path_factory.mktemp("card")
    cohort = root / "cohort"
    simulate_cohort(cohort, SimConfig(n_subjects=120, image_size=32, seed=5, progress=False))
    train(tiny_run_config(cohort, "optim.max_epochs=2"), root / "run")
    evaluate(root / "run", cohort, n_bootstrap=50, gradcam_images=0)
    out = root / "run" / "evaluation"
    return out, json.loads((out / "metrics.json").read_text())
