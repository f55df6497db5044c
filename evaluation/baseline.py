"""The peer a user would build in an afternoon: gradient boosting on fixed features.

The HAIM recipe (Soenksen et al. 2022, npj Digital Medicine): every modality
becomes a fixed feature vector, the vectors are concatenated and a gradient-boosted
tree model is fit on them. Here, per sample:

* vitals and labs: for every time-series channel of the DataSpec, the last value,
  mean, min, max, count and hours since the last value over the same window the
  model sees (``window_hours`` before prediction_time);
* genotypes: the raw dosages (NaN where not called);
* image: the frozen ImageNet backbone's pooled features of the latest film at or
  before prediction_time (NaN when there is none).

Missing values stay NaN, which scikit-learn's ``HistGradientBoostingClassifier``
routes natively. With ``BaselineConfig.confounds = "matched"`` the baseline gets the
default model's confound treatment in tree form (``ConfoundTreatment``), so a model made
not to read site and ancestry can be compared with a peer made the same way. The model is early stopped on the tuning split. Every evaluation
fits this baseline on the run's own training split (``evaluate``), so a model
that does not beat it says so in its report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from clinfuse.datasets.images import ImageLoader
from clinfuse.datasets.samples import (
    US_PER_HOUR,
    genotype_tensors,
    latest_images,
    scan_events,
    window_events,
)
from clinfuse.datasets.schema import GENOTYPES, has_table, scan
from clinfuse.datasets.spec import DataSpec

# Per-channel statistics of the time-series features, in column order.
TS_STATS = ("last", "mean", "min", "max", "count", "hours_since_last")


@dataclass
class BaselineConfig:
    """Gradient-boosting settings (scikit-learn ``HistGradientBoostingClassifier``).

    Attributes:
        learning_rate: shrinkage per boosting iteration.
        max_iter: most boosting iterations; early stopping on the tuning split
            usually stops far sooner.
        max_leaf_nodes: leaves per tree.
        min_samples_leaf: smallest leaf.
        l2_regularization: L2 penalty on leaf values.
        n_iter_no_change: iterations without a better tuning loss before stopping.
        image_batch: films per backbone pass when computing image features.
        confounds: ``"none"`` reads the features as they are (the HAIM recipe: the
            frozen film features carry the scanner's imprint, the dosages the
            ancestry). ``"matched"`` treats scanner site and genetic ancestry as
            ``configs/demo.yaml`` does (``ConfoundTreatment``): ComBat on the film
            features, as ``timm_image.harmonize: combat``; the site and the ancestry as
            two columns in training, so the other features need not stand in for them,
            as the confound offsets take their share of the training loss; and at
            prediction the risk averaged over the training split's (site, ancestry)
            pairs, so no patient's score depends on them, as the offsets are left out
            of predictions. ``"offsets"``: the same without ComBat (the columns and the
            average only). Through the shift tests ComBat made the trees lean on the
            site more, not less (docs/confound-audit.md), so this is the robust one.
    """

    learning_rate: float = 0.05
    max_iter: int = 1000
    max_leaf_nodes: int = 15
    min_samples_leaf: int = 20
    l2_regularization: float = 1.0
    n_iter_no_change: int = 30
    image_batch: int = 64
    confounds: str = "none"


CONFOUND_TREATMENTS = ("none", "matched", "offsets")


@dataclass
class ImageFeatureSource:
    """Where image features come from: a frozen timm backbone and the decoded-film cache.

    Attributes:
        encoder_cfg: ``timm_image`` keyword arguments (model name, weights, cache_dir);
            the transfer mode is forced to frozen and augmentation off.
        image_size: side of the square film tensor (the DataSpec's).
        film_cache: decoded-film cache folder (None = memory only).
    """

    encoder_cfg: dict[str, Any]
    image_size: int
    film_cache: str | Path | None = None


def timeseries_features(
    cohort_dir: str | Path, samples: pl.DataFrame, channels: list[str], window_hours: float
) -> tuple[np.ndarray, list[str]]:
    """Per-channel last/mean/min/max/count/hours-since-last in the window before each sample.

    Only events with ``prediction_time - window < time <= prediction_time`` count
    (the rule of time). Non-finite values are left out; a channel without a value
    in the window gives NaN statistics and count 0.

    Shapes:
        returns: x (N, len(channels) * 6) float64, and its column names.
    """
    names = [f"{c}:{s}" for c in channels for s in TS_STATS]
    x = np.full((samples.height, len(names)), np.nan)
    x[:, TS_STATS.index("count") :: len(TS_STATS)] = 0.0
    if not channels or samples.height == 0:
        return x, names
    stats = _window_stats(cohort_dir, samples, channels, window_hours)
    rows = stats["sample"].to_numpy()
    col0 = stats["channel"].to_numpy() * len(TS_STATS)
    for j, stat in enumerate(TS_STATS):
        x[rows, col0 + j] = stats[stat].to_numpy().astype(np.float64)
    return x, names


def _window_stats(
    cohort_dir: str | Path, samples: pl.DataFrame, channels: list[str], window_hours: float
) -> pl.DataFrame:
    """One row per (sample, channel) with any finite value in the window."""
    index = pl.DataFrame({"code": channels, "channel": np.arange(len(channels))})
    events = scan_events(cohort_dir, samples["subject_id"])
    value = pl.col("numeric_value").cast(pl.Float64)
    return (
        window_events(events, samples, window_hours)
        .filter(pl.col("numeric_value").is_finite())
        .join(index.lazy(), on="code", how="inner")
        .sort("sample", "channel", "time")
        .group_by("sample", "channel")
        .agg(
            value.last().alias("last"),
            value.mean().alias("mean"),
            value.min().alias("min"),
            value.max().alias("max"),
            pl.len().cast(pl.Float64).alias("count"),
            (
                (pl.col("prediction_time") - pl.col("time")).dt.total_microseconds().min()
                / US_PER_HOUR
            ).alias("hours_since_last"),
        )
        .collect()
    )


def genotype_features(
    cohort_dir: str | Path, samples: pl.DataFrame, markers: list[str]
) -> tuple[np.ndarray, list[str]]:
    """Raw dosages per marker, NaN where not called (or no genotype row).

    Shapes:
        returns: x (N, len(markers)) float64, and the marker names.
    """
    if not markers or not has_table(cohort_dir, GENOTYPES):
        return np.full((samples.height, len(markers)), np.nan), list(markers)
    calls = genotype_tensors(scan(cohort_dir, GENOTYPES), samples, markers)
    dosage = calls["genotype"].numpy().astype(np.float64)
    return np.where(calls["genotype_mask"].numpy() > 0, dosage, np.nan), list(markers)


@torch.no_grad()
def image_features(
    cohort_dir: str | Path, samples: pl.DataFrame, source: ImageFeatureSource, batch: int = 64
) -> tuple[np.ndarray, list[str]]:
    """The frozen backbone's pooled features of each sample's latest film (NaN when none).

    Shapes:
        returns: x (N, F) float64 (F = the backbone's feature width), and column names.
    """
    from clinfuse.encoders import create_encoder

    cfg = {**source.encoder_cfg, "transfer": "frozen", "augment": False, "embed_dim": 0}
    encoder = create_encoder("timm_image", **cfg).eval()
    loader = ImageLoader(source.image_size, source.film_cache)
    paths = latest_images(cohort_dir, samples)["path"].to_list()
    x = np.full((samples.height, encoder.num_features), np.nan)
    for start in range(0, len(paths), batch):
        images, present = loader.load_many(paths[start : start + batch])
        if present.any():
            pooled, _ = encoder.frozen_features(images[present], want_tokens=False)
            rows = start + present.nonzero().squeeze(1).numpy()
            x[rows] = pooled.numpy().astype(np.float64)
    return x, [f"image:{i}" for i in range(encoder.num_features)]


def baseline_features(
    cohort_dir: str | Path,
    samples: pl.DataFrame,
    spec: DataSpec,
    modalities: tuple[str, ...] = ("image", "timeseries", "genomics"),
    image: ImageFeatureSource | None = None,
) -> tuple[np.ndarray, list[str]]:
    """The concatenated fixed features of ``modalities`` for every sample.

    Args:
        cohort_dir: the cohort.
        samples: rows of ``load_samples`` (subject_id, prediction_time, ...).
        spec: the DataSpec fitted on the training split (channels, markers, window).
        modalities: which of image / timeseries / genomics to include.
        image: where image features come from (required when "image" is listed).

    Shapes:
        returns: x (N, F) float64 with NaN for missing values, and F column names.
    """
    parts: list[tuple[np.ndarray, list[str]]] = []
    if "timeseries" in modalities:
        parts.append(timeseries_features(cohort_dir, samples, spec.channels, spec.window_hours))
    if "genomics" in modalities:
        parts.append(genotype_features(cohort_dir, samples, spec.markers))
    if "image" in modalities:
        if image is None:
            raise ValueError("baseline_features: the image modality needs an ImageFeatureSource")
        parts.append(image_features(cohort_dir, samples, image))
    if not parts:
        raise ValueError(f"baseline_features: no known modality in {modalities}")
    return np.hstack([p[0] for p in parts]), [n for p in parts for n in p[1]]


@dataclass
class ConfoundTreatment:
    """The ``confounds: matched`` treatment, fitted on a training split.

    Attributes:
        image_columns: (F,) True for the frozen film features' columns.
        scale, shift: (S + 1, F_image) ComBat's per-site affine map of the film features
            (``encoders.harmonize.combat_affine``; the last row, the identity, for an
            unknown site); None without film features.
        sites, ancestries: the DataSpec's names; a name's index is its code.
        pairs: (K, 2) the (site, ancestry) codes seen in training; weights: (K,) their
            shares there, the distribution predictions are averaged over.
    """

    image_columns: np.ndarray
    scale: np.ndarray | None
    shift: np.ndarray | None
    sites: list[str]
    ancestries: list[str]
    pairs: np.ndarray
    weights: np.ndarray

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        names: list[str],
        samples: pl.DataFrame,
        spec: DataSpec,
        train: np.ndarray,
        y: np.ndarray,
        harmonize: bool = True,
    ) -> ConfoundTreatment:
        """Fits ComBat (unless not ``harmonize``) and the (site, ancestry) distribution on
        the ``train`` rows."""
        from clinfuse.encoders.harmonize import combat_affine

        codes = confound_codes(samples, spec.sites, spec.ancestries)  # (N, 2)
        known = train & ~np.isnan(codes).any(axis=1)
        if not known.any():
            raise ValueError(
                "baseline confounds='matched': no training sample has both a known site "
                "and a known ancestry (columns 'site' and 'ancestry')"
            )
        pairs, counts = np.unique(codes[known], axis=0, return_counts=True)
        image = np.array([n.startswith("image:") for n in names], dtype=bool)
        scale = shift = None
        if image.any() and harmonize:
            filmed = train & ~np.isnan(x[:, image]).any(axis=1)
            site = np.nan_to_num(codes[:, 0], nan=-1.0).astype(np.int64)
            fit_rows = filmed & (site >= 0)
            scale, shift, _ = combat_affine(
                x[fit_rows][:, image], site[fit_rows], y[fit_rows], len(spec.sites)
            )
        return cls(image, scale, shift, list(spec.sites), list(spec.ancestries), pairs,
                   counts / counts.sum())  # fmt: skip

    def harmonized(self, x: np.ndarray, samples: pl.DataFrame) -> np.ndarray:
        """``x`` with each film's features through its site's ComBat map (N, F)."""
        if self.scale is None:
            return x
        site = np.nan_to_num(self._codes(samples)[:, 0], nan=-1.0).astype(np.int64)  # -1: identity
        out = x.copy()
        out[:, self.image_columns] = x[:, self.image_columns] * self.scale[site] + self.shift[site]
        return out

    def training_matrix(self, x: np.ndarray, samples: pl.DataFrame) -> np.ndarray:
        """Harmonized features with the site and ancestry codes as two last columns."""
        return np.column_stack([self.harmonized(x, samples), self._codes(samples)])

    def marginal_logit(self, model: Any, x: np.ndarray, samples: pl.DataFrame) -> np.ndarray:
        """Log-odds of the risk averaged over the training (site, ancestry) pairs (N,)."""
        xh = np.column_stack([self.harmonized(x, samples), np.zeros((x.shape[0], 2))])
        risk = np.zeros(x.shape[0])
        for pair, weight in zip(self.pairs, self.weights, strict=True):
            xh[:, -2:] = pair
            risk += weight * model.predict_proba(xh)[:, 1]
        risk = np.clip(risk, 1e-12, 1.0 - 1e-12)
        return np.log(risk) - np.log1p(-risk)

    def _codes(self, samples: pl.DataFrame) -> np.ndarray:
        return confound_codes(samples, self.sites, self.ancestries)


def confound_codes(samples: pl.DataFrame, sites: list[str], ancestries: list[str]) -> np.ndarray:
    """Each sample's site and ancestry code, the index of its name in ``sites`` and
    ``ancestries`` (the DataSpec's) (N, 2); NaN when unknown."""
    out = np.full((samples.height, 2), np.nan)
    for j, (column, names) in enumerate((("site", sites), ("ancestry", ancestries))):
        if column not in samples.columns:
            raise ValueError(f"baseline confounds='matched': the samples have no {column!r} column")
        index = {name: i for i, name in enumerate(names)}
        out[:, j] = [index.get(v, np.nan) for v in samples[column].to_list()]
    return out


def fit_gbdt(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_tune: np.ndarray,
    y_tune: np.ndarray,
    cfg: BaselineConfig | None = None,
    seed: int = 0,
) -> Any:
    """A ``HistGradientBoostingClassifier`` fit on train, early stopped on tuning.

    Returns:
        The fitted classifier (``decision_function`` gives the logit).
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    cfg = cfg or BaselineConfig()
    model = HistGradientBoostingClassifier(
        learning_rate=cfg.learning_rate,
        max_iter=cfg.max_iter,
        max_leaf_nodes=cfg.max_leaf_nodes,
        min_samples_leaf=cfg.min_samples_leaf,
        l2_regularization=cfg.l2_regularization,
        early_stopping=True,
        n_iter_no_change=cfg.n_iter_no_change,
        random_state=seed,
    )
    return model.fit(x_train, y_train, X_val=x_tune, y_val=y_tune)


@dataclass
class FittedBaseline:
    """A gradient-boosting baseline fit on one cohort's training split.

    Attributes:
        model: the fitted classifier.
        spec: the DataSpec whose channels, markers and window define the features.
        modalities: the modalities it reads.
        image: where its image features come from (None without images).
        n_iter: boosting iterations kept by early stopping.
        n_features: feature columns.
        confounds: the fitted ``confounds: matched`` treatment, or None.
    """

    model: Any
    spec: DataSpec
    modalities: tuple[str, ...]
    image: ImageFeatureSource | None
    n_iter: int
    n_features: int
    confounds: ConfoundTreatment | None = None

    def logit(self, cohort_dir: str | Path, samples: pl.DataFrame) -> np.ndarray:
        """The baseline's log-odds for ``samples`` of ``cohort_dir``. Shapes: -> (N,)"""
        x, _ = baseline_features(cohort_dir, samples, self.spec, self.modalities, self.image)
        if self.confounds is not None:
            return self.confounds.marginal_logit(self.model, x, samples)
        return self.model.decision_function(x)


def fit_baseline(
    cohort_dir: str | Path,
    samples: pl.DataFrame,
    spec: DataSpec,
    modalities: tuple[str, ...],
    image: ImageFeatureSource | None = None,
    cfg: BaselineConfig | None = None,
    seed: int = 0,
) -> FittedBaseline:
    """Fits the baseline on the ``train`` rows of ``samples``, early stopped on ``tuning``.

    Raises:
        ValueError: when either split is empty or holds one class only.
    """
    rows = samples.filter(pl.col("split").is_in(["train", "tuning"]))
    for split in ("train", "tuning"):
        y = rows.filter(pl.col("split") == split)["label"].cast(pl.Int64).to_numpy()
        if y.size == 0 or y.min() == y.max():
            raise ValueError(
                f"{cohort_dir}: the {split} split needs both outcomes to fit a baseline"
            )
    cfg = cfg or BaselineConfig()
    if cfg.confounds not in CONFOUND_TREATMENTS:
        raise ValueError(
            f"baseline confounds must be one of {CONFOUND_TREATMENTS}, got {cfg.confounds!r}"
        )
    # One pass over both splits: the image backbone is built and run once.
    x, names = baseline_features(cohort_dir, rows, spec, modalities, image)  # (N, F)
    y = rows["label"].cast(pl.Int64).to_numpy()
    train = (rows["split"] == "train").to_numpy()
    treatment = None
    if cfg.confounds != "none":
        harmonize = cfg.confounds == "matched"
        treatment = ConfoundTreatment.fit(x, names, rows, spec, train, y, harmonize)
        x = treatment.training_matrix(x, rows)  # (N, F + 2)
    model = fit_gbdt(x[train], y[train], x[~train], y[~train], cfg, seed)
    n_iter, width = int(model.n_iter_), int(x.shape[1])
    return FittedBaseline(model, spec, modalities, image, n_iter, width, treatment)


def fit_run_baseline(
    run_dir: str | Path, model: Any, cfg: BaselineConfig | None = None, seed: int = 0
) -> FittedBaseline:
    """The baseline for a trained run: its cohort, training split, modalities and spec.

    Args:
        run_dir: the run directory (``config.yaml``, ``data_spec.yaml``).
        model: the run's ``FusionModel`` (from its artifact): the baseline reads the
            modalities it encodes, so both see the same inputs, and takes image
            features from its image encoder's backbone and weights, forced frozen.
        cfg: gradient-boosting settings.
        seed: the classifier's random state.

    The training samples are the run's own (same split settings and label fraction).
    """
    from clinfuse.config import load_yaml, to_dict
    from clinfuse.datasets.datamodule import config_from_dict, load_spec
    from clinfuse.datasets.meds import open_cohort
    from clinfuse.datasets.samples import load_samples
    from clinfuse.datasets.splits import subsample_train

    run = Path(run_dir)
    config = load_yaml(run / "config.yaml")
    data = config_from_dict(config.get("data", {}))
    spec = load_spec(run / "data_spec.yaml")
    image = None
    if "image" in model.encoders:
        encoder_cfg = {
            k: v
            for k, v in to_dict(model.encoders["image"].config).items()
            if k in ("model_name", "weights", "weights_remap", "grayscale", "cache_dir")
        }
        film_cache = data.cache_dir or (run / "image_cache")
        image = ImageFeatureSource(encoder_cfg, spec.image_size, film_cache)
    cohort = open_cohort(
        config["cohort"], config.get("labels") or None, config.get("sidecars") or None, data.meds
    )
    samples = load_samples(cohort, data.split_fractions, data.split_seed)
    samples = subsample_train(samples, data.label_fraction, data.split_seed)
    modalities = tuple(model.modalities)
    return fit_baseline(cohort, samples, spec, modalities, image, cfg, seed)
