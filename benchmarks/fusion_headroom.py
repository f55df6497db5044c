"""What any fusion head could add on a trained model's own encoders.

A fused model is encoders, then a fusion head. Attention fusion can only beat early
fusion by fusing better: by finding structure across the modality embeddings that a
sum of per-modality readings misses. This script asks, for trained runs, how much such
structure there is. The tuning and held-out samples go through each run's exported
model (``model/``, evaluation mode, no modality dropout), and its held-out AUROC is set
beside heads refitted on what its encoders produce:

* ``aux``: a logistic regression on the auxiliary heads' logits (each modality's risk
  read alone, one number per modality; 0 where the modality is missing, with a
  presence indicator), plus the gene x environment term when the model has one.
* ``linear``: a logistic regression on the concatenated embeddings (with the presence
  indicators and the term). Linear in the concatenation is a sum of one linear
  function per modality: additive across modalities, however many directions each
  embedding carries.
* ``linear_confounds``: the same with one-hot site and ancestry columns in fitting,
  held at their training means in scoring (the logit averaged over the training
  split's sites and ancestries, as the model's confound offsets are left out of its
  predictions): the additive head given the model's confound treatment.
* ``mlp``: a one-hidden-layer network on the same inputs, weight decay chosen by
  cross-validation: any smooth cross-modal function of them.
* ``boosting``: gradient boosting on the same inputs, with early stopping.

Each head is fit on the training split by default (the model's own head was fit there,
on the same embeddings) or on the tuning split (``--fit-split tuning``: the encoders
did not train on it, but it is a fifth of the size), strengths chosen by 5-fold
cross-validation on that split, and scored on the held-out split. If ``linear``
scores what the model scores and ``mlp`` and ``boosting`` no more, the encoders'
embeddings hold no cross-modal structure that a different fusion head could turn into
AUROC: a fusion can then only win by changing what the encoders learn.

    .venv/bin/python benchmarks/fusion_headroom.py --cohort COHORT_DIR RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from clinfuse.datasets.samples import load_samples
from clinfuse.evaluation.evaluate import artifact_batches
from clinfuse.evaluation.metrics import auroc, paired_auroc_delta
from clinfuse.fusion.gene_environment import GENE_INPUT_KEY
from clinfuse.training.artifact import load_artifact


@torch.no_grad()
def encoded(art: Any, run: Path, cohort: Path, samples: pl.DataFrame) -> dict[str, np.ndarray]:
    """The model's logit, auxiliary logits, presence, embeddings and term on ``samples``
    (``art``: the run's loaded artifact)."""
    model = art.model.eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("logit", "aux", "here", "emb", "term")}
    for batch in artifact_batches(cohort, samples, art, run / "image_cache"):
        embeddings, tokens = model.encode(batch)
        out = model.fuse(embeddings, tokens)
        out["encoded"] = embeddings
        logits, here = model.aux_logits(out)
        parts["logit"].append(out["logit"].numpy())
        parts["aux"].append(torch.where(here, logits, torch.zeros_like(logits)).numpy())
        parts["here"].append(here.float().numpy())
        parts["emb"].append(torch.cat([embeddings[m][0] for m in model.modalities], 1).numpy())
        term = (
            model.gene_environment_term(embeddings, tokens.get(GENE_INPUT_KEY))
            if model.gxe is not None
            else torch.zeros(len(logits))
        )
        parts["term"].append(term.numpy())
    result = {k: np.concatenate(v).astype(np.float64) for k, v in parts.items()}
    result["y"] = samples["label"].cast(pl.Int64).to_numpy()
    result["site"] = samples["site"].cast(pl.String).to_numpy()
    result["ancestry"] = samples["ancestry"].cast(pl.String).to_numpy()
    return result


def _logistic(x_fit: np.ndarray, y: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fit = make_pipeline(
        StandardScaler(), LogisticRegressionCV(Cs=10, cv=5, scoring="roc_auc", max_iter=5000)
    )
    return fit.fit(x_fit, y).decision_function(x_test)


def _aux(fit: dict, test: dict) -> np.ndarray:
    def x(d: dict) -> np.ndarray:
        return np.column_stack([d["aux"], d["here"], d["term"]])

    return _logistic(x(fit), fit["y"], x(test))


def _inputs(d: dict) -> np.ndarray:
    return np.column_stack([d["emb"], d["here"], d["term"]])


def _linear(fit: dict, test: dict) -> np.ndarray:
    return _logistic(_inputs(fit), fit["y"], _inputs(test))


def _onehot(d: dict, levels: dict[str, np.ndarray]) -> np.ndarray:
    return np.column_stack(
        [(d[c][:, None] == levels[c][None, :]).astype(np.float64) for c in ("site", "ancestry")]
    )


def _linear_confounds(fit: dict, test: dict) -> np.ndarray:
    """The additive head with the site and the ancestry as columns in fitting, so the
    embeddings need not stand in for them, and held at their training means in
    scoring: for a linear head, the logit averaged over the training split's sites and
    ancestries, as the model's confound offsets are left out of its predictions."""
    levels = {c: np.unique(fit[c]) for c in ("site", "ancestry")}
    onehot = _onehot(fit, levels)
    x_fit = np.column_stack([_inputs(fit), onehot])
    means = onehot.mean(axis=0)
    x_test = np.column_stack([_inputs(test), np.broadcast_to(means, (len(test["y"]), len(means)))])
    return _logistic(x_fit, fit["y"], x_test)


def _boosting(fit: dict, test: dict, seed: int) -> np.ndarray:
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(
        learning_rate=0.05, max_leaf_nodes=15, early_stopping=True, validation_fraction=0.2,
        n_iter_no_change=20, random_state=seed,
    )  # fmt: skip
    return model.fit(_inputs(fit), fit["y"]).predict_proba(_inputs(test))[:, 1]


def _mlp(fit: dict, test: dict, seed: int) -> np.ndarray:
    from sklearn.model_selection import GridSearchCV
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    net = make_pipeline(StandardScaler(), MLPClassifier((32,), max_iter=2000, random_state=seed))
    grid = {"mlpclassifier__alpha": [0.1, 1.0, 10.0, 30.0]}
    search = GridSearchCV(net, grid, cv=5, scoring="roc_auc").fit(_inputs(fit), fit["y"])
    return search.predict_proba(_inputs(test))[:, 1]


HEADS = {
    "aux": "auxiliary logits, logistic",
    "linear": "embeddings, logistic (additive)",
    "linear_confounds": "the same, site and ancestry averaged out",
    "mlp": "embeddings, MLP",
    "boosting": "embeddings, boosting",
}


def headroom(
    run: Path, cohort: Path, fit_split: str = "train", seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """Held-out AUROC of the model and of each head refitted on ``fit_split``, with the
    paired 95% interval of head minus model."""
    art = load_artifact(run / "model")  # loaded once, run over both splits
    if art.model.aux_heads is None:
        raise SystemExit(f"{run}: the model has no auxiliary heads (aux_weight 0)")
    samples = load_samples(cohort)
    test, fit = (
        encoded(art, run, cohort, samples.filter(pl.col("split") == split))
        for split in ("held_out", fit_split)
    )
    y = test["y"]
    rows = {"model": (auroc(y, test["logit"]), 0.0, 0.0)}
    for name, score in (
        ("aux", _aux(fit, test)),
        ("linear", _linear(fit, test)),
        ("linear_confounds", _linear_confounds(fit, test)),
        ("mlp", _mlp(fit, test, seed)),
        ("boosting", _boosting(fit, test, seed)),
    ):
        delta = paired_auroc_delta(y, score, test["logit"], n=500, seed=seed)
        rows[name] = (auroc(y, score), *delta["ci"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cohort", required=True, type=Path, help="the cohort the runs trained on")
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (with model/)")
    ap.add_argument("--fit-split", choices=["train", "tuning"], default="train")
    args = ap.parse_args(argv)
    print("| run | model | " + " | ".join(HEADS.values()) + " |")
    print("|---|---|" + "---|" * len(HEADS))
    for run in args.runs:
        r = headroom(run, args.cohort, args.fit_split)
        base = r["model"][0]
        cells = [f"{base:.3f}"] + [
            f"{r[k][0]:.3f} ({r[k][0] - base:+.3f} [{r[k][1]:+.3f}, {r[k][2]:+.3f}])" for k in HEADS
        ]
        print(f"| {run.name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
