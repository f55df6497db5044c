"""Same model, more workers: held-out AUROC of local runs and of 2-worker DDP runs.

Trains the demo preset on one simulated cohort with seeds 0..S-1, once in this
process and once with 2 data-parallel workers on a private two-node Ray cluster
on this machine (``training.local_cluster``: a head and a worker node, one worker
on each), evaluates every run on the held-out split and prints one table: AUROC
per seed, mean and spread (max - min) of each column. ``data.batch_size`` is the
global batch, so both see the same number of optimiser steps per epoch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_distributed_auroc.py \\
        --subjects 2000 --seeds 3

Pass ``--address`` to use an existing cluster instead (the cohort and the output
folder must be on storage every node sees).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import clinfuse
from clinfuse.training.local_cluster import LocalCluster


def train_and_evaluate(cohort: Path, run_dir: Path, seed: int, overrides: list[str],
                       address: str | None) -> tuple[float, float]:  # fmt: skip
    """Held-out AUROC of one run, and its training wall time in seconds."""
    start = time.perf_counter()
    cluster = {"ray_address": address, "num_workers": 2, "placement_strategy": "SPREAD"}
    run = clinfuse.train(
        cohort, "demo", run_dir=run_dir, overrides=[f"seed={seed}", *overrides],
        **(cluster if address else {}),
    )  # fmt: skip
    seconds = time.perf_counter() - start
    report = clinfuse.evaluate(run, cohort, run_dir / "evaluation", bootstrap=50, baseline=False)
    return report.metrics["auroc"], seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--subjects", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", help="working folder (default: a temporary one)")
    p.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="demo preset overrides")
    args = p.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-distributed-auroc-"))
    cohort = root / "cohort"
    if not (cohort / "labels.parquet").is_file():
        clinfuse.simulate(cohort, subjects=args.subjects, image_size=64, progress=False)
    rows = []
    with LocalCluster(root / "cluster", cpus=[1, 1]) if not args.address else _Given(
        args.address
    ) as cluster:  # fmt: skip
        for seed in range(args.seeds):
            local = train_and_evaluate(cohort, root / f"local-{seed}", seed, args.overrides, None)
            ddp = train_and_evaluate(
                cohort, root / f"ddp-{seed}", seed, args.overrides, cluster.address
            )
            rows.append((seed, local, ddp))
            print(f"seed {seed}: local {local[0]:.4f} ({local[1]:.0f} s), "
                  f"2 workers {ddp[0]:.4f} ({ddp[1]:.0f} s)", flush=True)  # fmt: skip
    print(f"\n{args.subjects} subjects, demo preset {' '.join(args.overrides)}")
    print(
        f"{'seed':>6} | {'local AUROC':>11} | {'2-worker AUROC':>14} | {'local s':>7} | {'2-worker s':>10}"
    )
    for seed, (la, ls), (da, ds) in rows:
        print(f"{seed:>6} | {la:>11.4f} | {da:>14.4f} | {ls:>7.0f} | {ds:>10.0f}")
    for name, values in (("mean", statistics.mean), ("spread", _spread)):
        local, ddp = values([r[1][0] for r in rows]), values([r[2][0] for r in rows])
        print(f"{name:>6} | {local:>11.4f} | {ddp:>14.4f} |")


def _spread(values: list[float]) -> float:
    return max(values) - min(values)


class _Given:
    """An existing cluster, in place of ``LocalCluster``."""

    def __init__(self, address: str) -> None:
        self.address = address

    def __enter__(self) -> _Given:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


if __name__ == "__main__":
    main()
