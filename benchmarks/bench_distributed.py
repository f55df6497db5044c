"""Data-parallel scaling: training samples/s and peak memory per worker for 1, 2, 4 workers.

One table, one run: the same model and cohort trained in this process without Ray
(the alternative), then with N data-parallel workers on a Ray cluster for each N
of ``--workers``. Per row: samples/s of the whole run (samples of all workers over
the slowest worker's training time), samples/s per worker, the largest peak
resident memory of a worker, and the scaling efficiency
``samples/s(N) / (N * samples/s(1 worker))``. Times are training batches only
(validation excluded), averaged over every epoch but the first (which fills the
image caches, shared by all runs). ``data.batch_size`` is the global batch.

Without ``--address`` a private cluster starts on this machine
(``training.local_cluster``, ``--node-cpus`` logical CPUs per node); on a GPU
cluster pass its address and ``--gpus-per-worker 1``, with ``--out`` on storage
every node sees:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_distributed.py
    .venv/bin/python benchmarks/bench_distributed.py --address auto --gpus-per-worker 1 \\
        --workers 1 2 4 8 --subjects 20000 --out /shared/bench
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import clinfuse
from clinfuse.datasets.datamodule import CohortDataModule
from clinfuse.training.config import load_run_config
from clinfuse.training.distributed import THROUGHPUT_FILE, ThroughputRecord, worker_throughput
from clinfuse.training.local_cluster import LocalCluster
from clinfuse.training.module import RiskModule
from clinfuse.training.run import build_trainer, prepare_run


def overrides(root: Path, args: argparse.Namespace) -> list[str]:
    """The preset overrides of every run: epochs, global batch, shared caches."""
    return [
        f"optim.max_epochs={args.epochs}", f"optim.patience={args.epochs}",
        "optim.progress_bar=false", f"data.batch_size={args.batch_size}",
        f"data.cache_dir={root / 'image_cache'}",
        f"model.encoders.timm_image.cache_dir={root / 'embedding_cache'}",
        *args.overrides,
    ]  # fmt: skip


def local_run(cohort: Path, run: Path, items: list[str]) -> list[dict[str, Any]]:
    """A single-process run with the throughput callback; its per-epoch records."""
    cfg = load_run_config("demo", [*items, f"cohort={cohort}"])
    prepare_run(cfg, run)
    dm = CohortDataModule(cfg.cohort, cfg.data, run_dir=run)
    dm.setup("fit")
    module = RiskModule.create(cfg.model, dm.spec, cfg.optim, cfg.seed)
    trainer, _ = build_trainer(cfg, run, [ThroughputRecord(run / THROUGHPUT_FILE)])
    trainer.fit(module, datamodule=dm)
    return worker_throughput(run)


def summarize(epochs: list[dict[str, Any]]) -> dict[str, float]:
    """samples/s (all workers, per worker) and peak RSS over epochs after the first."""
    measured = [e for e in epochs if e["epoch"] > 0] or epochs
    total, per_worker = [], []
    for e in measured:
        workers = e["workers"]
        total.append(sum(w["samples"] for w in workers) / max(w["seconds"] for w in workers))
        per_worker.append(statistics.mean(w["samples"] / w["seconds"] for w in workers))
    peak = max(w["peak_rss_mb"] for e in epochs for w in e["workers"])
    return {"total": statistics.mean(total), "per_worker": statistics.mean(per_worker),
            "peak_rss_mb": peak, "epochs": len(measured)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--subjects", type=int, default=400)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (64)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--address", help="an existing Ray cluster (default: a local one)")
    p.add_argument("--node-cpus", type=int, nargs="+", default=[2, 2],
                   help="logical CPUs of each local node, head first (2 2)")  # fmt: skip
    p.add_argument("--cohort", help="an existing cohort (default: simulate --subjects)")
    p.add_argument("--out", help="working folder (default: a temporary one)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="demo preset overrides")
    args = p.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-distributed-"))
    cohort = Path(args.cohort) if args.cohort else root / "cohort"
    if not (cohort / "labels.parquet").is_file():
        clinfuse.simulate(cohort, subjects=args.subjects, image_size=64, progress=False)
    items = overrides(root, args)

    rows = []
    start = time.perf_counter()
    local = summarize(local_run(cohort, root / "local", items))
    rows.append(("local, no Ray", 1, local, time.perf_counter() - start))
    cluster = (
        contextlib.nullcontext(argparse.Namespace(address=args.address))
        if args.address
        else LocalCluster(root / "cluster", cpus=args.node_cpus)
    )
    with cluster as c:
        for n in args.workers:
            run, start = root / f"ddp-{n}", time.perf_counter()
            clinfuse.train(
                cohort, "demo", run_dir=run, overrides=items, ray_address=c.address,
                num_workers=n, gpus_per_worker=args.gpus_per_worker or None,
            )  # fmt: skip
            rows.append((f"Ray Train, {n} worker(s)", n, summarize(worker_throughput(run)),
                         time.perf_counter() - start))  # fmt: skip
    one = next((r[2]["total"] for r in rows if r[1] == 1 and r[0].startswith("Ray")), None)
    print(f"\n{args.subjects} subjects, demo preset, global batch {args.batch_size}, "
          f"{args.epochs} epochs; {'GPU' if args.gpus_per_worker else 'CPU'}")  # fmt: skip
    print(f"{'run':<24} | {'samples/s':>9} | {'per worker':>10} | {'peak RSS/worker':>15} | "
          f"{'efficiency':>10} | {'wall s':>6}")  # fmt: skip
    for name, n, s, wall in rows:
        eff = f"{s['total'] / (n * one):.2f}" if one and name.startswith("Ray") else "-"
        print(f"{name:<24} | {s['total']:>9.1f} | {s['per_worker']:>10.1f} | "
              f"{s['peak_rss_mb']:>12.0f} MB | {eff:>10} | {wall:>6.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
