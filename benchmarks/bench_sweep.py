"""What a sweep costs next to its parts: one CNN pass plus N head-only trainings.

With a frozen backbone every trial reads the image features from the sweep's
shared cache, so a sweep of N trials should cost about one CNN pass over the
cohort's images plus N trainings of everything but the CNN, divided by the
trials running at once, plus Ray's start-up and per-trial overhead. This
measures each part on a simulated cohort:

* ``cnn_pass``: the warm-up, every image through the frozen backbone once;
* ``head_trainings``: N in-process trainings of sampled configs on the warm cache;
* ``uncached_training``: one training of the same model with the cache off
  (the CNN runs every epoch), to show what each trial would cost without it;
* ``sweep``: ``run_sweep`` with N trials on local Ray (fresh sweep directory,
  its own warm-up included).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sweep.py --trials 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import optuna

from clinfuse.config import from_dict
from clinfuse.simulation.simulator import SimConfig, simulate_cohort
from clinfuse.training.config import RunConfig
from clinfuse.training.module import RiskModule
from clinfuse.training.run import build_trainer
from clinfuse.tune.space import get_space, sample_config
from clinfuse.tune.sweep import (
    SweepOptions,
    prepare_data,
    run_sweep,
    sweep_base_config,
    warm_embedding_cache,
)
from clinfuse.tune.trainable import trial_config


def base_config(cohort: Path, image_size: int, epochs: int) -> RunConfig:
    data = {
        "cohort": str(cohort),
        "data": {"batch_size": 32, "image_size": image_size, "max_steps": 32},
        "model": {
            "encoders": {
                "timm_image": {"model_name": "efficientnet_lite0", "embed_dim": 16},
                "gru_d": {"hidden": 16, "embed_dim": 16},
                "sgl_mlp": {"hidden": [16], "embed_dim": 16},
            },
        },
        "optim": {"max_epochs": epochs, "patience": epochs, "progress_bar": False},
    }
    return from_dict(RunConfig, data)


def sampled_configs(space: str, n: int) -> list[dict]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    return [sample_config(get_space(space), study.ask()) for _ in range(n)]


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def train_once(base: dict, sampled: dict, dm, run: Path) -> None:
    cfg = trial_config(base, sampled)
    module = RiskModule.create(cfg.model, dm.spec, cfg.optim)
    trainer, _ = build_trainer(cfg, run, enable_checkpointing=False, callbacks=[], logger=False)
    trainer.fit(module, datamodule=dm)


def measure_parts(cfg: RunConfig, work: Path, trials: int, space: str) -> dict[str, float]:
    base = sweep_base_config(cfg, work / "parts")
    dm = prepare_data(base, work / "parts")
    t_cnn, images = timed(warm_embedding_cache, base, dm)
    configs = sampled_configs(space, trials)
    t_heads = sum(timed(train_once, base, c, dm, work / f"h{i}")[0] for i, c in enumerate(configs))
    uncached = {**base, "model": {**base["model"], "encoders": {**base["model"]["encoders"]}}}
    uncached["model"]["encoders"]["timm_image"] = {
        **base["model"]["encoders"]["timm_image"], "cache_dir": ""
    }  # fmt: skip
    t_uncached, _ = timed(train_once, uncached, configs[0], dm, work / "uncached")
    return {"images": images, "cnn": t_cnn, "heads": t_heads, "uncached": t_uncached}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--subjects", type=int, default=200)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--space", default="tiny")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sim = SimConfig(n_subjects=args.subjects, image_size=args.image_size, progress=False)
        cohort = simulate_cohort(work / "cohort", sim)
        cfg = base_config(cohort, args.image_size, args.epochs)
        parts = measure_parts(cfg, work, args.trials, args.space)
        opts = SweepOptions(
            space=args.space, num_samples=args.trials, max_concurrent=args.max_concurrent,
            num_cpus=args.max_concurrent,
        )  # fmt: skip
        t_sweep, _ = timed(run_sweep, cfg, work / "sweep", opts)
    report(args, parts, t_sweep)


def report(args: argparse.Namespace, p: dict[str, float], t_sweep: float) -> None:
    n, k = args.trials, args.max_concurrent
    rows = [
        (f"CNN pass over {p['images']} images (once)", p["cnn"]),
        (f"{n} head-only trainings, sequential", p["heads"]),
        ("CNN pass + head trainings", p["cnn"] + p["heads"]),
        (f"  same, heads {k} at a time (ideal)", p["cnn"] + p["heads"] / k),
        (f"one training without the cache (x{n} = {n * p['uncached']:.1f} s)", p["uncached"]),
        (f"sweep: {n} trials on local Ray, {k} concurrent", t_sweep),
    ]
    print(f"\n{args.subjects} subjects, {args.image_size} px, {args.epochs} epochs per trial")
    print(f"{'part':<58} {'seconds':>8}")
    for name, seconds in rows:
        print(f"{name:<58} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
