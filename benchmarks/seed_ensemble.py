"""What averaging independently trained seeds of one model adds, beside a peer.

A deep ensemble (the same model trained from different seeds, its logits averaged) is
the standard way to buy AUROC and calibration with compute alone. This script takes
runs of one configuration that ``bench_fusion.py`` already trained (each run's
``evaluation/predictions.parquet``, or an evaluation directory of ``clinfuse evaluate
--out``, e.g. of the runs scored on a shifted cohort) and, on one split of the cohort
(``--split``: held_out by default, or ``all``):

* each member's AUROC, their mean and standard deviation;
* the ensemble of the first k members for every k (the mean of their logits), and its
  gain over the members' mean AUROC;
* with ``--peer DIR``, the paired difference of the full ensemble and of each member
  against the peer, with a paired bootstrap 95% interval. The peer is a
  ``bench_fusion.py`` peer row's run directory holding ``held_out_logits.npy`` (e.g.
  ``gbdt_features``), or any run or evaluation directory the members could be (e.g.
  the default's run of the same seed, to pair one edit with it).

Predictions are matched to the cohort's samples of the split by subject and prediction
time (predictions that do not cover them are refused, naming their file). A peer row's
logits (``held_out_logits.npy``) are the held-out split's, so ``--peer`` needs the
held-out split.

    .venv/bin/python benchmarks/seed_ensemble.py --cohort COHORT_DIR \\
        --peer OUT/runs/gbdt_features OUT/runs/NAME OUT/runs/NAME_seed1 OUT/runs/NAME_seed2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl

from clinfuse.datasets.samples import load_samples
from clinfuse.evaluation.metrics import auroc, paired_auroc_delta

KEYS = ["subject_id", "prediction_time"]


def split_logits(run: Path, rows: pl.DataFrame, split: str = "held_out") -> np.ndarray:
    """A run's logits (N,) in the order of ``rows`` (the cohort's samples of ``split``):
    ``run`` a run directory (its ``evaluation/``) or an evaluation directory."""
    path = run / "predictions.parquet"
    if not path.is_file():
        path = run / "evaluation" / "predictions.parquet"
    if not path.is_file():
        raise SystemExit(f"{path}: no predictions (train and evaluate the run first)")
    preds = pl.read_parquet(path)
    if split != "all":
        preds = preds.filter(pl.col("split") == split)
    preds = preds.select(*KEYS, "logit")
    joined = rows.select(KEYS).join(preds, on=KEYS, how="left", maintain_order="left")
    if preds.height != rows.height or joined["logit"].null_count():
        raise SystemExit(
            f"{path}: {preds.height} predictions of split {split}, "
            f"{joined['logit'].null_count()} of the cohort's {rows.height} samples without "
            f"one (another cohort or split?)"
        )
    return joined["logit"].to_numpy()


def peer_logits(peer: Path, rows: pl.DataFrame) -> np.ndarray:
    """The peer's held-out logits (N,) in the order of ``rows``: a peer row's
    ``held_out_logits.npy``, else a run's (or evaluation directory's) predictions."""
    path = peer / "held_out_logits.npy"
    if not path.is_file():
        return split_logits(peer, rows)
    logits = np.load(path)
    if logits.shape != (rows.height,):
        raise SystemExit(f"{path}: {logits.shape[0]} logits for {rows.height} held-out samples")
    return logits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "runs", nargs="+", type=Path, help="run (or evaluation) directories of one configuration"
    )
    ap.add_argument("--cohort", type=Path, required=True, help="the runs' cohort directory")
    ap.add_argument("--peer", type=Path, default=None, help="a peer row's run directory")
    ap.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples")
    ap.add_argument("--split", default="held_out", help="held_out (default), tuning, train or all")
    args = ap.parse_args(argv)
    if args.peer is not None and args.split != "held_out":
        raise SystemExit("--peer: the peer's logits are the held-out split's (--split held_out)")

    rows = load_samples(args.cohort)
    if args.split != "all":
        rows = rows.filter(pl.col("split") == args.split)
    y = rows["label"].cast(int).to_numpy()
    logits = np.stack([split_logits(run, rows, args.split) for run in args.runs])  # (K, N)
    members = np.array([auroc(y, row) for row in logits])
    print(f"{args.split} samples: {y.size}, prevalence {y.mean():.3f}")
    print("| member | AUROC |\n|---|---|")
    for run, value in zip(args.runs, members, strict=True):
        print(f"| {run.name} | {value:.3f} |")
    spread = members.std(ddof=1) if len(members) > 1 else float("nan")
    print(f"| mean (s.d.) | {members.mean():.3f} ({spread:.3f}) |\n")
    print("| ensemble of the first k | AUROC | - members' mean |\n|---|---|---|")
    for k in range(2, len(members) + 1):
        value = auroc(y, logits[:k].mean(axis=0))
        print(f"| {k} | {value:.3f} | {value - members[:k].mean():+.3f} |")
    if args.peer is not None:
        peer = peer_logits(args.peer, rows)
        print(f"\npeer {args.peer.name}: AUROC {auroc(y, peer):.3f}")
        print("| against the peer | paired difference [95% CI] |\n|---|---|")
        compared = [(f"ensemble of {len(members)}", logits.mean(axis=0))]
        compared += [(run.name, row) for run, row in zip(args.runs, logits, strict=True)]
        for name, row in compared:
            d = paired_auroc_delta(y, row, peer, n=args.bootstrap)
            print(f"| {name} | {d['delta']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
