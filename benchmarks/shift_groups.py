"""Where a shift experiment's ancestry gap lives: within the ancestry groups or between them.

Reads the runs of ``bench_fusion.py --experiment shift`` (same ``--out``) and scores
each on the ancestry-reversed cohort: the AUROC over every patient, the mean of the
AUROCs within each ancestry group (which the reversed link cannot move, since it is
constant within a group), and each group's mean logit minus the cohort's mean. Beside
them, the cohort's own group means of the confound-free true logit (true logit minus
the site and ancestry terms) and of the ancestry term the reversal flipped. A model
whose within-group AUROC matches the reference's but whose overall AUROC does not
differs from it in how it ranks the groups, not the patients inside them.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/shift_groups.py --out /work/bench/shift \
        --seeds 0 1 3 --models preset untreated offsets combat_offsets_pcs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from clinfuse.datasets.datamodule import config_from_dict, make_loader
from clinfuse.datasets.samples import load_samples
from clinfuse.evaluation.metrics import auroc
from clinfuse.training.artifact import load_artifact
from clinfuse.training.predict import collect_predictions


def score(run: Path, cohort: Path) -> pl.DataFrame:
    """``subject_id`` and ``logit`` of a run's model on every sample of ``cohort``."""
    art = load_artifact(run / "model")
    samples = load_samples(cohort)
    cfg = config_from_dict(art.data_config)
    images = "image" in art.model.encoders
    loader = make_loader(cohort, samples, art.spec, cfg, run / "image_cache", images)
    with torch.no_grad():
        pred = collect_predictions(art.model, loader)
    return pl.DataFrame({"subject_id": pred["subject_id"].astype(np.int64), "logit": pred["logit"]})


def group_row(scored: pl.DataFrame, oracle: pl.DataFrame) -> dict[str, Any]:
    """Overall and within-ancestry AUROC, and each group's centred mean logit."""
    df = scored.join(oracle, on="subject_id")
    y = df["outcome"].to_numpy().astype(int)
    logit = df["logit"].to_numpy()
    group = df["ancestry"].to_numpy()
    names = sorted(set(group))
    within = [
        auroc(y[group == g], logit[group == g])
        for g in names
        if 0 < y[group == g].sum() < (group == g).sum()
    ]
    return {
        "auroc": auroc(y, logit),
        "within_ancestry_auroc": float(np.mean(within)),
        "mean_logit": {g: float(logit[group == g].mean() - logit.mean()) for g in names},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the shift experiment's --out folder")
    ap.add_argument("--subjects", type=int, default=2500, help="test cohort size (its name)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument(
        "--models", nargs="+", default=["preset", "untreated", "offsets", "combat_offsets_pcs"]
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    cohort = out / "cohorts" / f"shift_n{args.subjects}_ancestry_reversed"
    oracle = pl.read_parquet(cohort / "oracle.parquet")
    free = oracle["true_logit"] - oracle["site_term"] - oracle["ancestry_term"]
    truth = (
        oracle.with_columns(free=free)
        .group_by("ancestry")
        .agg(
            pl.len(),
            (pl.col("free").mean() - free.mean()).alias("free"),
            pl.col("ancestry_term").mean(),
        )
    )
    print("Cohort:", json.dumps(truth.sort("ancestry").to_dicts()))
    rows = []
    for seed in args.seeds:
        suffix = "" if seed == 0 else f"_seed{seed}"
        runs = {"reference": out / "shift" / "reference" / "runs" / f"preset{suffix}"}
        runs |= {m: out / "shift" / "linked" / "runs" / f"{m}{suffix}" for m in args.models}
        for model, run in runs.items():
            row = {"model": model, "seed": seed, **group_row(score(run, cohort), oracle)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "shift_groups.json").write_text(json.dumps(rows, indent=1))
    groups = sorted(rows[0]["mean_logit"])
    print("| model | seed | AUROC | within-ancestry AUROC | " + " | ".join(groups) + " |")
    print("|---|---|---|---|" + "---|" * len(groups))
    for r in rows:
        means = " | ".join(f"{r['mean_logit'][g]:+.2f}" for g in groups)
        print(
            f"| {r['model']} | {r['seed']} | {r['auroc']:.3f} | "
            f"{r['within_ancestry_auroc']:.3f} | {means} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
