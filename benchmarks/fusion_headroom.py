"""What any fusion head could add on a trained model's own encoders.

A fused model is encoders, then a fusion head. Attention fusion can only beat early
fusion by fusing better: by finding structure across the modality embeddings that a
sum of per-modality readings misses. This script asks, for trained runs, how much such
structure there is. The tuning and held-out samples go through each run's exported
model (``model/``, evaluation mode, no modality dropout), and its held-out AUROC is set
beside heads refitted on what its encoders produce:

* ``additive``: a logistic regression on the auxiliary heads' logits (each modality's
  risk read alone; 0 where the modality is missing, with a presence indicator), plus
  the gene x environment term when the model has one. No cross-modal structure.
* ``boosting``: gradient boosting on the concatenated embeddings (and the term): any
  cross-modal function of them, with early stopping.
* ``mlp``: a one-hidden-layer network on the same inputs, weight decay chosen by
  cross-validation.

Each head is fit twice, on the tuning split (which the encoders did not train on, but
only 750 subjects at 5,000) and on the training split (the model's own head was fit
there, on the same embeddings), strengths chosen by 5-fold cross-validation on the
split it is fit on, and scored on the held-out split. If the
additive head scores what the model scores, the model's fusion is, in effect, a sum of
per-modality readings; if the flexible heads do not score more, the encoders'
embeddings hold no cross-modal structure a better fusion could use.

    .venv/bin/python benchmarks/fusion_headroom.py --cohort COHORT_DIR RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl
import torch

from clinfuse.datasets.samples import load_samples
from clinfuse.evaluation.evaluate import _batches
from clinfuse.evaluation.metrics import auroc, paired_auroc_delta
from clinfuse.fusion.gene_environment import GENE_INPUT_KEY
from clinfuse.training.artifact import load_artifact


@torch.no_grad()
def encoded(run: Path, cohort: Path, split: str) -> dict[str, np.ndarray]:
    """The model's logit, auxiliary logits, presence, embeddings and term on one split."""
    art = load_artifact(run / "model")
    model = art.model.eval()
    if model.aux_heads is None:
        raise SystemExit(f"{run}: the model has no auxiliary heads (aux_weight 0)")
    samples = load_samples(cohort).filter(pl.col("split") == split)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("logit", "aux", "here", "emb", "term")}
    for batch in _batches(cohort, samples, art, run / "image_cache"):
        embeddings, tokens = model.encode(batch)
        out = model.fuse(embeddings, tokens)
        out["encoded"] = embeddings
        logits, here = model.aux_logits(out)
        parts["logit"].append(out["logit"].numpy())
        parts["aux"].append(torch.where(here, logits, torch.zeros_like(logits)).numpy())
        parts["here"].append(here.float().numpy())
        parts["emb"].append(torch.cat([embeddings[m][0] for m in model.modalities], 1).numpy())
        term = (
            model._gxe_term(embeddings, tokens.get(GENE_INPUT_KEY))
            if model.gxe is not None
            else torch.zeros(len(logits))
        )
        parts["term"].append(term.numpy())
    result = {k: np.concatenate(v).astype(np.float64) for k, v in parts.items()}
    result["y"] = samples["label"].cast(pl.Int64).to_numpy()
    return result


def _additive(tune: dict, test: dict) -> np.ndarray:
    from sklearn.linear_model import LogisticRegressionCV

    def x(d: dict) -> np.ndarray:
        return np.column_stack([d["aux"], d["here"], d["term"]])

    fit = LogisticRegressionCV(Cs=10, cv=5, scoring="roc_auc", max_iter=5000)
    return fit.fit(x(tune), tune["y"]).decision_function(x(test))


def _inputs(d: dict) -> np.ndarray:
    return np.column_stack([d["emb"], d["term"]])


def _boosting(tune: dict, test: dict, seed: int) -> np.ndarray:
    from sklearn.ensemble import HistGradientBoostingClassifier

    fit = HistGradientBoostingClassifier(
        learning_rate=0.05, max_leaf_nodes=15, early_stopping=True, validation_fraction=0.2,
        n_iter_no_change=20, random_state=seed,
    )  # fmt: skip
    return fit.fit(_inputs(tune), tune["y"]).predict_proba(_inputs(test))[:, 1]


def _mlp(tune: dict, test: dict, seed: int) -> np.ndarray:
    from sklearn.model_selection import GridSearchCV
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    net = make_pipeline(StandardScaler(), MLPClassifier((32,), max_iter=2000, random_state=seed))
    grid = {"mlpclassifier__alpha": [0.1, 1.0, 10.0, 30.0]}
    fit = GridSearchCV(net, grid, cv=5, scoring="roc_auc").fit(_inputs(tune), tune["y"])
    return fit.predict_proba(_inputs(test))[:, 1]


HEADS = ("additive", "boosting", "mlp")
FIT_SPLITS = ("tuning", "train")


def headroom(run: Path, cohort: Path, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Held-out AUROC of the model and each refitted head ("<head>/<fit split>"), with
    the paired 95% interval of head minus model."""
    test = encoded(run, cohort, "held_out")
    y = test["y"]
    rows = {"model": (auroc(y, test["logit"]), 0.0, 0.0)}
    for split in FIT_SPLITS:
        fit = encoded(run, cohort, split)
        for name, score in (
            ("additive", _additive(fit, test)),
            ("boosting", _boosting(fit, test, seed)),
            ("mlp", _mlp(fit, test, seed)),
        ):
            delta = paired_auroc_delta(y, score, test["logit"], n=500, seed=seed)
            rows[f"{name}/{split}"] = (auroc(y, score), *delta["ci"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cohort", required=True, type=Path, help="the cohort the runs trained on")
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (with model/)")
    args = ap.parse_args(argv)
    names = {
        "additive": "additive head",
        "boosting": "boosting on embeddings",
        "mlp": "MLP on embeddings",
    }
    columns = [f"{h}/{s}" for s in FIT_SPLITS for h in HEADS]
    print(
        "| run | model | "
        + " | ".join(f"{names[c.split('/')[0]]}, fit on {c.split('/')[1]}" for c in columns)
        + " |"
    )
    print("|---|---|" + "---|" * len(columns))
    for run in args.runs:
        r = headroom(run, args.cohort)
        base = r["model"][0]
        cells = [f"{r['model'][0]:.3f}"] + [
            f"{r[k][0]:.3f} ({r[k][0] - base:+.3f} [{r[k][1]:+.3f}, {r[k][2]:+.3f}])"
            for k in columns
        ]
        print(f"| {run.name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
