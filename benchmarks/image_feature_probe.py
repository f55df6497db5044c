"""How much of a simulated film's lung disease each frozen feature set carries.

For every sample with a film before prediction time, the frozen EfficientNet-Lite0
features of its latest film (``evaluation.baseline.image_features``, the run's
``timm_image`` settings with ``features`` = head, levels or levels_head), standardized
with the train split's statistics, with a one-hot of the site beside them. Two linear
readers fit on the train split and scored on the held-out one:

* ridge regression of the true lung disease (``oracle.parquet``): how much of the
  factor the features carry, whatever the label;
* logistic regression of the outcome (L2, strength chosen by 5-fold CV on the train
  split): what a linear head trained on labels, as the model's is, reads.

    .venv/bin/python benchmarks/image_feature_probe.py --cohort COHORT_DIR
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from clinfuse.datasets.samples import load_samples
from clinfuse.datasets.schema import ORACLE_FILE
from clinfuse.encoders.image import FEATURE_SETS
from clinfuse.evaluation.baseline import ImageFeatureSource, image_features
from clinfuse.evaluation.metrics import auroc


def probe(
    x: np.ndarray, sites: np.ndarray, latent: np.ndarray, y: np.ndarray, train: np.ndarray
) -> dict[str, float]:
    """Held-out correlation of the ridge read of ``latent`` and AUROC of the outcome probe."""
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV

    mean, sd = x[train].mean(0), x[train].std(0) + 1e-6
    onehot = (sites[:, None] == np.unique(sites)[None, :]).astype(np.float64)
    z = np.column_stack([(x - mean) / sd, onehot])
    test = ~train
    ridge = RidgeCV(alphas=np.logspace(-2, 5, 15)).fit(z[train], latent[train])
    read = ridge.predict(z[test])
    logistic = LogisticRegressionCV(Cs=8, max_iter=3000).fit(z[train], y[train])
    return {
        "corr_latent": float(np.corrcoef(read, latent[test])[0, 1]),
        "outcome_auroc": auroc(y[test], logistic.decision_function(z[test])),
        "dims": x.shape[1],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--cohort", required=True, type=Path, help="a simulated cohort (with oracle.parquet)"
    )
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument(
        "--film-cache",
        type=Path,
        default=None,
        help="decoded-film cache folder (default: a temporary one)",
    )
    args = ap.parse_args(argv)
    samples = load_samples(args.cohort).filter(pl.col("split").is_in(["train", "held_out"]))
    oracle = pl.read_parquet(args.cohort / ORACLE_FILE, columns=["subject_id", "lung_disease"])
    samples = samples.join(oracle, on="subject_id", how="left")
    print("| features | dims | ridge corr with the true lung disease | outcome probe AUROC |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        films = args.film_cache or Path(tmp)  # the second backbone pass reads decoded films

        def pooled(features: str) -> np.ndarray:
            cfg = {"model_name": "efficientnet_lite0", "weights": "package", "features": features}
            return image_features(
                args.cohort, samples, ImageFeatureSource(cfg, args.image_size, films)
            )[0]

        head, levels = pooled("head"), pooled("levels")
    # levels_head is the levels vector, then the head (encoders/image.py): no third pass.
    sets = {"head": head, "levels": levels, "levels_head": np.hstack([levels, head])}
    for features in FEATURE_SETS:
        x = sets[features]
        filmed = ~np.isnan(x).any(axis=1)
        frame = samples.filter(pl.Series(filmed))
        result = probe(
            x[filmed],
            frame["site"].to_numpy().astype(str),
            frame["lung_disease"].to_numpy(),
            frame["label"].cast(int).to_numpy(),
            (frame["split"] == "train").to_numpy(),
        )
        print(
            f"| {features} | {result['dims']} | {result['corr_latent']:.3f} | {result['outcome_auroc']:.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
