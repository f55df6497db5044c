"""What the data lets a model read: a ceiling built from readers told the true factors.

The latent-factor ceilings of ``bench_fusion.py`` score the simulator's true factors,
which no model sees: a model reads films, charts and dosages, and each is a noisy
measurement of its factor. This script builds the best linear readers of each
modality's data that the truth itself can train, and the risk model on their readings:

1. Per modality, a ridge regression (strength by cross-validation) of the true factor
   on that modality's fixed features, the ones ``gbdt_features`` reads
   (``evaluation.baseline``): the frozen film features -> lung disease (filmed samples
   only); the per-channel window statistics -> physiological severity; the dosages ->
   genetic score and modifier-group score (whose threshold, the simulator's 0.5, gives
   the carrier). Missing values are the train split's mean with a missing indicator.
   The train split's readings are out-of-fold (5 folds), so the second stage sees
   readings as noisy as the held-out ones.
2. A logistic regression of the outcome on the readings, the reading of physiology x
   carrier, and a film-presence indicator, fit on the train split and scored on the
   held-out split (the same 750 subjects as every bench row), with a bootstrap 95%
   interval; then the same with each subject's site as one-hot columns, the shortcut a
   reader of the scanner can take.

Readers trained on the true factors are stronger than any a label-trained model can
fit, on the same features; a model can still beat a *linear* reader of the frozen film
features by reading the film itself. The gap between a row here and a model's AUROC is
what better reading of these features could give that model; the gap between the two
columns is what reading the site is worth on that cohort.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reader_ceiling.py \
        --cohort /work/bench/strat/cohorts/cohort_n5000_s64 --film-cache /work/bench/strat/cache/images
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from clinfuse.datasets.datamodule import DataConfig, fit_spec
from clinfuse.datasets.samples import load_samples
from clinfuse.datasets.schema import ORACLE_FILE
from clinfuse.evaluation.baseline import (
    ImageFeatureSource,
    genotype_features,
    image_features,
    timeseries_features,
)
from clinfuse.evaluation.metrics import auroc, bootstrap_ci
from clinfuse.simulation.simulator import CARRIER_Z

FOLDS = 5
TRUTH = ("lung_disease", "physio_severity", "genetic_score", "modifier_score", "modifier_carrier")


def _design(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Standardized features with the train mean in missing places and one missing
    indicator per column that has any (N, F')."""
    missing = np.isnan(x)
    mean = np.nanmean(np.where(train[:, None], x, np.nan), axis=0)
    mean = np.where(np.isnan(mean), 0.0, mean)
    filled = np.where(missing, mean, x)
    sd = filled[train].std(0) + 1e-6
    z = (filled - mean) / sd
    flags = missing[:, missing[train].any(0)].astype(np.float64)
    return np.column_stack([z, flags])


def read(
    x: np.ndarray, target: np.ndarray, train: np.ndarray, rows: np.ndarray, seed: int
) -> np.ndarray:
    """Ridge readings of ``target`` from ``x`` (N,): out-of-fold on the train rows, from
    the fit on every train row elsewhere; NaN outside ``rows`` (samples without the data).

    Readings are clipped to the range ``target`` takes on the train rows: a linear reader
    extrapolates on a sample whose features lie far outside the training cloud (two
    held-out films of draw 12 read the lung disease at +18 and -4, on a factor of s.d. 1,
    and took its held-out correlation from 0.90 to 0.71); the truth it was told never
    leaves that range. The outcome-trained readers (target 0/1) are clipped the same way.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold

    alphas = np.logspace(-2, 5, 15)
    out = np.full(x.shape[0], np.nan)
    fit_rows = np.flatnonzero(train & rows)
    for inner, outer in KFold(FOLDS, shuffle=True, random_state=seed).split(fit_rows):
        model = RidgeCV(alphas=alphas).fit(x[fit_rows[inner]], target[fit_rows[inner]])
        out[fit_rows[outer]] = model.predict(x[fit_rows[outer]])
    rest = np.flatnonzero(~train & rows)
    model = RidgeCV(alphas=alphas).fit(x[fit_rows], target[fit_rows])
    out[rest] = model.predict(x[rest])
    told = target[fit_rows]
    return np.clip(out, told.min(), told.max())


def readings(cohort: Path, film_cache: Path, image_size: int, seed: int) -> pl.DataFrame:
    """One row per train / held-out sample: the readings, the truth, the label, the site."""
    samples = load_samples(cohort).filter(pl.col("split").is_in(["train", "held_out"]))
    oracle = pl.read_parquet(cohort / ORACLE_FILE)
    samples = samples.join(oracle.select("subject_id", *TRUTH), on="subject_id", how="left")
    train = (samples["split"] == "train").to_numpy()
    cfg = DataConfig(image_size=image_size, window_hours=72)  # configs/demo.yaml's window
    spec = fit_spec(cohort, samples.filter(pl.col("split") == "train"), cfg)
    source = ImageFeatureSource(
        {"model_name": "efficientnet_lite0", "weights": "package"}, image_size, film_cache
    )
    films, _ = image_features(cohort, samples, source)
    filmed = ~np.isnan(films).any(axis=1)
    charts, _ = timeseries_features(cohort, samples, spec.channels, spec.window_hours)
    dosages, _ = genotype_features(cohort, samples, spec.markers)
    typed = ~np.isnan(dosages).all(axis=1)
    everyone = np.ones(samples.height, dtype=bool)
    truth = {c: samples[c].to_numpy().astype(np.float64) for c in TRUTH}
    films, charts = _design(films, train & filmed), _design(charts, train)
    lung = read(films, truth["lung_disease"], train, filmed, seed)
    physio = read(charts, truth["physio_severity"], train, everyone, seed)
    genes = _design(dosages, train & typed)
    genetic = read(genes, truth["genetic_score"], train, typed, seed)
    modifier = read(genes, truth["modifier_score"], train, typed, seed)
    # The same readers trained on the outcome instead of the truth (a linear stack).
    label = samples["label"].cast(pl.Float64).to_numpy()
    lung_l = read(films, label, train, filmed, seed)
    physio_l = read(charts, label, train, everyone, seed)
    genetic_l = read(genes, label, train, typed, seed)
    mod_cols = _modifier_columns(cohort, spec.markers)
    mod = np.where(typed[:, None], genes[:, mod_cols], 0.0)  # standardized dosages (N, K)
    return samples.select("subject_id", "split", "label", "site").with_columns(
        pl.Series("lung", np.where(filmed, lung, 0.0)),
        pl.Series("filmed", filmed.astype(np.float64)),
        pl.Series("physio", physio),
        pl.Series("genetic", np.where(typed, genetic, 0.0)),
        pl.Series("carrier", np.where(typed, modifier > CARRIER_Z, False).astype(np.float64)),
        pl.Series("typed", typed.astype(np.float64)),
        *(pl.Series(f"true_{k}", v) for k, v in truth.items()),
        pl.Series("lung_l", np.where(filmed, lung_l, 0.0)),
        pl.Series("physio_l", physio_l),
        pl.Series("genetic_l", np.where(typed, genetic_l, 0.0)),
        *(pl.Series(f"mod_{k}", mod[:, k]) for k in range(mod.shape[1])),
    )


def _modifier_columns(cohort: Path, markers: list[str]) -> list[int]:
    """Indices in ``markers`` of the simulator's modifier gene (the gene the genotype path
    keeps for its interaction; told here, not selected)."""
    groups = pl.read_parquet(cohort / "oracle_groups.parquet")
    gene = groups.filter(pl.col("role") == "modifier")["group"].to_list()
    table = pl.read_parquet(cohort / "markers.parquet")
    names = set(table.filter(pl.col("group").is_in(gene))["marker"].to_list())
    return [i for i, m in enumerate(markers) if m in names]


def ceiling(
    frame: pl.DataFrame, site: bool, n_bootstrap: int, seed: int, labels: bool = False
) -> dict[str, float]:
    """Held-out AUROC of the logistic regression on the readings (and the site).

    With ``labels``, the outcome-trained readings, and the physiology reading times each
    standardized dosage of the modifier gene in place of the carrier reading (the gene x
    environment term's form: a label-trained reader has no carrier to read)."""
    from sklearn.linear_model import LogisticRegression

    if labels:
        physio = frame["physio_l"].to_numpy()
        mods = [frame[c].to_numpy() for c in frame.columns if c.startswith("mod_")]
        cols = [frame[c].to_numpy() for c in ("lung_l", "physio_l", "genetic_l", "filmed", "typed")]
        cols += [physio * m for m in mods]
    else:
        cols = [
            frame[c].to_numpy() for c in ("lung", "physio", "genetic", "carrier", "filmed", "typed")
        ]
        cols.append(frame["physio"].to_numpy() * frame["carrier"].to_numpy())
    x = np.column_stack(cols)
    if site:
        sites = frame["site"].to_numpy().astype(str)
        x = np.column_stack([x, (sites[:, None] == np.unique(sites)[None, :]).astype(np.float64)])
    train = (frame["split"] == "train").to_numpy()
    y = frame["label"].cast(int).to_numpy()
    model = LogisticRegression(max_iter=3000).fit(x[train], y[train])
    score = model.decision_function(x[~train])
    low, high = bootstrap_ci(auroc, y[~train], score, n_bootstrap, seed=seed)
    return {"auroc": auroc(y[~train], score), "ci_low": low, "ci_high": high}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cohort", required=True, type=Path, help="a simulated cohort")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--film-cache", type=Path, default=None, help="decoded-film cache folder")
    ap.add_argument("--bootstrap", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0, help="folds and bootstrap")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        frame = readings(args.cohort, args.film_cache or Path(tmp), args.image_size, args.seed)
    held = frame.filter(pl.col("split") == "held_out")
    print(
        "| factor | held-out samples | reader told the truth: correlation | reader trained on the outcome |"
    )
    print("|---|---|---|---|")
    for name, truth, rows in (
        ("lung", "true_lung_disease", held["filmed"] > 0),
        ("physio", "true_physio_severity", held["physio"].is_not_nan()),
        ("genetic", "true_genetic_score", held["typed"] > 0),
        ("carrier", "true_modifier_carrier", held["typed"] > 0),
    ):
        part = held.filter(rows)
        want = part[truth].to_numpy().astype(np.float64)
        r = np.corrcoef(part[name].to_numpy(), want)[0, 1]
        by_label = (
            f"{np.corrcoef(part[name + '_l'].to_numpy(), want)[0, 1]:.3f}"
            if name + "_l" in part.columns
            else ""
        )
        print(f"| {name} | {part.height} | {r:.3f} | {by_label} |")
    print()
    print("| risk model on the readings | held-out AUROC [95% CI] |")
    print("|---|---|")
    for readers, labels in (("told the truth", False), ("trained on the outcome", True)):
        for label, site in (("site-blind", False), ("with the site one-hot", True)):
            row = ceiling(frame, site, args.bootstrap, args.seed, labels)
            print(
                f"| readers {readers}, {label} | {row['auroc']:.3f} "
                f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
