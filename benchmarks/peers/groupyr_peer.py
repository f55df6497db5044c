"""groupyr's LogisticSGLCV on exported dosages (run by bench_sgl_selection.py).

Runs in ``.venv-sgl`` (groupyr pins scikit-optimize and copt versions we do not
use), reads the npz written by ``bench_sgl_selection.export`` (``X_<split>`` (N, M)
standardized dosages, ``y_<split>`` (N,), ``group`` (M,) group index per column),
fits a linear logistic sparse group lasso with the penalty strength chosen by
5-fold cross-validation on the train split, and writes one JSON object:
``selected`` (group indices with a non-zero coefficient), ``auroc`` (held-out),
``seconds`` (fit), ``alpha`` (the chosen strength).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--l1-ratio", type=float, default=0.5)
    ap.add_argument("--n-alphas", type=int, default=20)
    args = ap.parse_args()
    from groupyr import LogisticSGLCV
    from sklearn.metrics import roc_auc_score

    data = np.load(args.data)
    group = data["group"]
    groups = [np.flatnonzero(group == g) for g in np.unique(group)]
    model = LogisticSGLCV(
        l1_ratio=args.l1_ratio, groups=groups, n_alphas=args.n_alphas, cv=5, random_state=0
    )
    start = time.perf_counter()
    model.fit(data["X_train"], data["y_train"])
    seconds = time.perf_counter() - start
    coef = np.ravel(model.coef_)
    selected = [
        int(g) for g, idx in zip(np.unique(group), groups, strict=True) if np.any(coef[idx] != 0)
    ]
    proba = model.predict_proba(data["X_held_out"])[:, 1]
    result = {
        "selected": selected,
        "auroc": float(roc_auc_score(data["y_held_out"], proba)),
        "seconds": seconds,
        "alpha": float(model.alpha_),
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
