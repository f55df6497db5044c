"""PyPOTS classifiers on an exported hourly grid (run by bench_timeseries.py).

Runs in ``.venv-peers`` (PyPOTS pins versions that conflict with ours), reads the
npz written by ``bench_timeseries.export_grid`` (``X_<split>`` (N, T, C) float32
with NaN for missing, ``y_<split>`` (N,)), trains each model once per seed with
early stopping on the tuning split, and writes one JSON row per (model, seed):
``model``, ``seed``, ``auroc`` (held-out), ``epochs``, ``s_per_epoch`` and
``held_out_proba`` (the held-out probabilities in the grid's order, for paired
comparisons).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HIDDEN = 48  # the GRU-D state width of our bench preset, for a like-for-like peer


def build(name: str, n_steps: int, n_features: int, epochs: int, patience: int,
          lr: float | None = None):  # fmt: skip
    """A PyPOTS binary classifier by name, sized like our encoder; ``lr`` the Adam
    learning rate (None = PyPOTS's default, 1e-3)."""
    from pypots import classification
    from pypots.optim import Adam

    common = {"n_steps": n_steps, "n_features": n_features, "n_classes": 2, "batch_size": 64,
              "epochs": epochs, "patience": patience, "device": "cpu", "verbose": False}  # fmt: skip
    if lr is not None:
        common["optimizer"] = Adam(lr=lr)
    if name in ("GRUD", "BRITS"):
        return getattr(classification, name)(rnn_hidden_size=HIDDEN, **common)
    if name == "SeFT":
        return classification.SeFT(n_layers=2, n_heads=4, d_model=HIDDEN, d_ffn=2 * HIDDEN,
                                   **common)  # fmt: skip
    raise SystemExit(f"unknown peer model {name!r}; known: GRUD, BRITS, SeFT")


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def run(name: str, data: dict, seed: int, epochs: int, patience: int,
        lr: float | None = None) -> dict:  # fmt: skip
    from pypots.utils.random import set_random_seed

    set_random_seed(seed)
    _, n_steps, n_features = data["X_train"].shape
    model = build(name, n_steps, n_features, epochs, patience, lr)
    train = {"X": data["X_train"], "y": data["y_train"]}
    tune = {"X": data["X_tuning"], "y": data["y_tuning"]}
    start = time.perf_counter()
    model.fit(train_set=train, val_set=tune)
    seconds = time.perf_counter() - start
    proba = model.predict_proba({"X": data["X_held_out"]})[:, 1]
    ran = _epochs_run(model, epochs, patience)
    tag = "" if lr is None else f"_lr{lr:g}"
    return {"model": f"pypots_{name.lower()}{tag}", "seed": seed,
            "auroc": auroc(data["y_held_out"], proba), "epochs": ran,
            "s_per_epoch": seconds / max(ran, 1),
            "held_out_proba": [float(p) for p in proba]}  # fmt: skip


def _epochs_run(model, epochs: int, patience: int) -> int:
    """Epochs trained: up to the best one plus the patience that stopped it."""
    best = getattr(model, "best_epoch", None)
    if best is None or best < 0:
        return epochs
    return min(epochs, int(best) + 1 + patience)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--models", nargs="+", default=["GRUD", "BRITS"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lrs", type=float, nargs="+", default=None,
                    help="Adam learning rates, one row each (default: PyPOTS's own)")  # fmt: skip
    args = ap.parse_args()
    data = dict(np.load(args.data))
    rows = []
    for name in args.models:
        for lr in args.lrs or [None]:
            for seed in args.seeds:
                rows.append(run(name, data, seed, args.epochs, args.patience, lr))
                print(f"  {rows[-1]['model']} seed {seed}: AUROC {rows[-1]['auroc']:.3f}, "
                      f"{rows[-1]['s_per_epoch']:.1f} s/epoch", flush=True)  # fmt: skip
    Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
