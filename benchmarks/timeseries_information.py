"""How much of the vitals/labs latent ceiling the charted data itself holds.

``bench_timeseries.py`` puts our GRU-D next to ``ceiling_timeseries``, a logistic
regression on the true physiological severity ``s`` (``simulation.oracle``). That
ceiling reads ``s`` itself; an encoder only sees noisy, irregular charts of it. This
script measures, on the same split and the same hourly grid that the PyPOTS peers read
(``bench_timeseries.export_grid``), on the tuning and the held-out subjects:

* ``true severity``: AUROC of ``s`` (the ceiling; one feature, so logistic = raw);
* ``ridge on the grid, fit to s``: a ridge regression of ``s`` on the whole grid (values
  with NaN as 0, plus the observation mask), fit on the train split WITH the latent as
  its target: a linear reader of the grid that is told what to read;
* ``logistic on last values``: the last observed value per channel, fit to the label;
* ``logistic on window features``: per channel the mean of the last 12 hours (the last
  value if none), the first value in the window and log(1 + hours observed);

and, for every trained run under ``<out>/runs`` whose name starts with ``--runs``, its
held-out AUROC and the correlation of its held-out logits with ``s``: how well the
model reads the severity, a steadier measure than an AUROC on 750 subjects.

    .venv/bin/python benchmarks/timeseries_information.py --out /work/bench/grud-acc
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import roc_auc_score

from clinfuse.datasets.samples import load_samples

SPLITS = ("train", "tuning", "held_out")


def severity(cohort: Path) -> dict[str, np.ndarray]:
    """``physio_severity`` per split, in the grid's row order (``export_grid``)."""
    samples = load_samples(cohort, [0.7, 0.15, 0.15], 0)
    oracle = pl.read_parquet(cohort / "oracle.parquet").select("subject_id", "physio_severity")
    return {
        s: samples.filter(pl.col("split") == s)
        .select("subject_id")
        .join(oracle, on="subject_id", how="left", maintain_order="left")["physio_severity"]
        .to_numpy()
        for s in SPLITS
    }


def grid_features(x: np.ndarray) -> np.ndarray:
    """(N, T, C) grid with NaN -> (N, 2 T C): values (NaN as 0) and the observed mask."""
    seen = ~np.isnan(x)
    return np.concatenate([np.nan_to_num(x).reshape(len(x), -1), seen.reshape(len(x), -1)], 1)


def last_values(x: np.ndarray) -> np.ndarray:
    """(N, T, C) -> (N, C): the last observed value per channel, 0 (the mean) if none."""
    seen = ~np.isnan(x)
    hour = np.where(seen, np.arange(x.shape[1])[None, :, None], -1).max(1)  # (N, C)
    value = np.take_along_axis(np.nan_to_num(x), np.clip(hour, 0, None)[:, None], 1)[:, 0]
    return np.where(hour >= 0, value, 0.0)


def window_features(x: np.ndarray) -> np.ndarray:
    """(N, T, C) -> (N, 3 C): recent mean, first value, log(1 + observed hours)."""
    seen = ~np.isnan(x)
    recent, n_recent = np.nansum(x[:, -12:], 1), seen[:, -12:].sum(1)
    recent = np.where(n_recent > 0, recent / np.maximum(n_recent, 1), last_values(x))
    hour = np.where(seen, np.arange(x.shape[1])[None, :, None], x.shape[1]).min(1)  # (N, C)
    first = np.take_along_axis(np.nan_to_num(x), np.clip(hour, None, x.shape[1] - 1)[:, None], 1)
    first = np.where(hour < x.shape[1], first[:, 0], 0.0)
    return np.concatenate([recent, first, np.log1p(seen.sum(1))], 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="a bench_timeseries.py --out directory")
    ap.add_argument("--subjects", type=int, default=5000)
    ap.add_argument("--runs", default="only_vitals_no_adv", help="run-name prefix (runs/)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    grid = np.load(out / "timeseries_peers" / f"grid_n{args.subjects}.npz")
    s = severity(out / "cohorts" / f"cohort_n{args.subjects}_s64")
    y = {k: grid[f"y_{k}"] for k in SPLITS}
    ridge = RidgeCV(alphas=np.logspace(-1, 4, 11))
    ridge.fit(grid_features(grid["X_train"]), s["train"])
    logistic = LogisticRegression(max_iter=2000)
    logistic.fit(last_values(grid["X_train"]), y["train"])
    windowed = LogisticRegression(max_iter=3000, C=0.1)
    windowed.fit(window_features(grid["X_train"]), y["train"])
    print("| reader | tuning AUROC | held-out AUROC | corr with s (held-out) |")
    print("|---|---|---|---|")
    rows = {
        "true severity (the ceiling)": lambda k: s[k],
        "ridge on the grid, fit to s": lambda k: ridge.predict(grid_features(grid[f"X_{k}"])),
        "logistic on last values": lambda k: logistic.decision_function(
            last_values(grid[f"X_{k}"])
        ),
        "logistic on window features": lambda k: windowed.decision_function(
            window_features(grid[f"X_{k}"])
        ),
    }
    for name, score in rows.items():
        tune = roc_auc_score(y["tuning"], score("tuning"))
        held = roc_auc_score(y["held_out"], score("held_out"))
        corr = np.corrcoef(score("held_out"), s["held_out"])[0, 1]
        print(f"| {name} | {tune:.3f} | {held:.3f} | {corr:.3f} |")
    print("\n| run | held-out AUROC | corr of logit with s (held-out) |\n|---|---|---|")
    cohort = out / "cohorts" / f"cohort_n{args.subjects}_s64"
    oracle = pl.read_parquet(cohort / "oracle.parquet").select("subject_id", "physio_severity")
    for pred in sorted((out / "runs").glob(f"{args.runs}*/evaluation/predictions.parquet")):
        rows = pl.read_parquet(pred).join(oracle, on="subject_id")
        auc = roc_auc_score(rows["label"].to_numpy(), rows["logit"].to_numpy())
        corr = np.corrcoef(rows["logit"].to_numpy(), rows["physio_severity"].to_numpy())[0, 1]
        print(f"| {pred.parent.parent.name} | {auc:.3f} | {corr:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
