"""``make demo``: simulate a small cohort, train the default (confound-free) preset, evaluate."""

from __future__ import annotations

import time
from importlib.resources import files
from pathlib import Path

from clinfuse.config import save_yaml

DEMO_CONFIG = files("clinfuse") / "configs" / "demo.yaml"  # package data


def run_demo(out: str | Path, subjects: int, config: str | None, overrides: list[str]) -> int:
    from clinfuse.api import evaluate, simulate, train
    from clinfuse.training.commands import _summary_line
    from clinfuse.training.config import best_score_text, load_run_config

    root = Path(out)
    cohort, run_dir = root / "cohort", root / "run"
    start = time.perf_counter()
    config = config or "demo"
    cfg = load_run_config(config, [*overrides, f"cohort={cohort}"])
    print(f"[1/3] simulating {subjects} subjects into {cohort}")
    simulate(cohort, subjects=subjects, seed=cfg.seed, image_size=cfg.data.image_size)
    print(f"[2/3] training {cfg.model.fusion.name} fusion -> {run_dir}")
    save_yaml(cfg, root / "demo_config.yaml")
    summary = train(cohort, config, run_dir=run_dir, overrides=overrides).summary
    print(f"      best {best_score_text(summary)} after {summary['epochs']} epochs")
    print("[3/3] evaluating on the held-out split")
    metrics = evaluate(run_dir, cohort, run_dir / "evaluation", bootstrap=200).metrics
    print(_summary_line(metrics))
    print(f"done in {time.perf_counter() - start:.0f} s")
    print(f"report:  {run_dir / 'evaluation' / 'report.html'}")
    print(f"metrics: {run_dir / 'evaluation' / 'metrics.json'}")
    print(f"model:   {run_dir / 'model'}")
    return 0
