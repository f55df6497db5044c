"""LEACE: the closed form clinfuse used to compute itself against the authors' ``concept-erasure``.

``reference`` is the NumPy closed form ``fusion/erasure.py`` carried before it moved
to the package (ridge 1e-3 of the mean variance on the covariance, eigh inverse
root, SVD basis); ``clinfuse`` is ``leace_fit`` now (the package, configured as that
closed form, with the same ridge), and ``clinfuse_ridge0`` the same without the ridge
(the package's pseudo-inverse). All erase the same stacked one-hot confounds from
the same representations; the script reports the largest absolute difference of
the held-out erased outputs from ``reference``, the mean absolute edit, the largest
absolute cross-covariance left with the concept on the fit rows, and a fresh
cross-validated logistic probe (the audit's) of each confound on held-out rows
after each eraser, next to the majority rate.

Two sources of representations:

* ``planted``: a linear site (3 classes) and ancestry (2 classes) code mixed into 16
  dimensions with an outcome direction, 4,000 fit rows and 1,500 held-out rows.
* ``--run DIR --cohort DIR``: the fused representation of a trained run (its eraser
  reset to the identity) on the cohort's train split (fit) and held_out split (probe).

``library_default`` is the package with its own defaults (covariance shrinkage, a
cap on the covariance trace, singular values below 0.01 dropped).

    python benchmarks/bench_leace.py [--run RUN --cohort COHORT]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from clinfuse.evaluation.audit import probe_confound
from clinfuse.fusion.erasure import leace_fit, one_hot_concept

PLANTED_CLASSES = {"site": 3, "ancestry": 2}


def planted(seed: int = 0) -> tuple[dict, dict, dict[str, int]]:
    """Fit and held-out draws: z (N, 16), confound codes, one fixed mixing of the dims."""
    mix_rng = np.random.default_rng(99)
    mix = np.eye(16) + 0.3 * mix_rng.normal(size=(16, 16)) * (mix_rng.random((16, 16)) < 0.3)

    def draw(n: int, rng: np.random.Generator) -> dict:
        site = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
        anc = (rng.uniform(size=n) < 0.3 + 0.3 * (site == 1)).astype(int)
        z = rng.normal(size=(n, 16))
        z[:, 0] += 2.0 * (site == 1) - 1.5 * (site == 2)
        z[:, 1] += 1.5 * (site == 2) + 1.0 * anc
        z[:, 3] += 1.2 * rng.integers(0, 2, n)
        return {"fused": z @ mix.T, "site": site, "ancestry": anc}

    rng = np.random.default_rng(seed)
    return draw(4000, rng), draw(1500, rng), PLANTED_CLASSES


def from_run(run_dir: str, cohort_dir: str) -> tuple[dict, dict, dict[str, int]]:
    """Fused representations (before erasure) of the train and held_out splits, and the
    number of classes of each confound."""
    import polars as pl

    from clinfuse.datasets.datamodule import config_from_dict, make_loader
    from clinfuse.datasets.samples import load_samples
    from clinfuse.fusion.model import confound_classes
    from clinfuse.training.artifact import load_artifact
    from clinfuse.training.predict import collect_predictions

    art = load_artifact(f"{run_dir}/model")
    if art.model.eraser is not None:
        art.model.eraser.reset()
    samples, cfg = load_samples(cohort_dir), config_from_dict(art.data_config)

    def split(name: str) -> dict:
        rows = samples.filter(pl.col("split") == name)
        return collect_predictions(art.model, make_loader(cohort_dir, rows, art.spec, cfg))

    classes = confound_classes(art.spec)
    return split("train"), split("held_out"), {c: classes[c] for c in PLANTED_CLASSES}


def library_default_fit(z: np.ndarray, concept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The package's eraser with its defaults, as ``mean (D,)`` and ``projection (D, D)``."""
    from concept_erasure import LeaceFitter

    x, c = torch.as_tensor(z, dtype=torch.float64), torch.as_tensor(concept, dtype=torch.float64)
    eraser = LeaceFitter.fit(x, c).eraser
    return eraser.bias.numpy(), (eraser.proj_left @ eraser.proj_right).numpy()


def reference_fit(
    z: np.ndarray, concept: np.ndarray, ridge: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """The NumPy closed form ``W^+ P W`` with ``W = (Sigma_zz + eps I)^{-1/2}``."""
    mean = z.mean(axis=0)
    zc, cc = z - mean, concept - concept.mean(axis=0)
    sigma_zz, sigma_zc = zc.T @ zc / len(z), zc.T @ cc / len(z)  # (D, D), (D, K)
    d = sigma_zz.shape[0]
    eps = max(ridge * float(np.trace(sigma_zz)) / d, 1e-12)
    evals, evecs = np.linalg.eigh(sigma_zz + eps * np.eye(d))
    evals = np.clip(evals, eps, None)
    whiten, unwhiten = (evecs / np.sqrt(evals)) @ evecs.T, (evecs * np.sqrt(evals)) @ evecs.T
    u, s, _ = np.linalg.svd(whiten @ sigma_zc, full_matrices=False)
    basis = u[:, s > 1e-8 * s[0]]  # (D, r)
    return mean, unwhiten @ (basis @ basis.T) @ whiten


def compare(fit: dict, test: dict, classes: dict[str, int]) -> dict:
    codes = {c: np.asarray(fit[c]) for c in classes}
    concept, known = one_hot_concept(codes, classes)
    z, concept = np.asarray(fit["fused"], dtype=np.float64)[known], concept[known]
    zt = np.asarray(test["fused"], dtype=np.float64)
    erasers = {
        "reference": reference_fit(z, concept),
        "clinfuse": leace_fit(z, concept),
        "clinfuse_ridge0": leace_fit(z, concept, ridge=0.0),
        "library_default": library_default_fit(z, concept),
    }
    out: dict = {"n_fit": int(len(z)), "n_test": int(len(zt)), "dim": int(z.shape[1])}
    reference_test = _erase(zt, *erasers["reference"])
    for name, (mean, proj) in erasers.items():
        erased_fit, erased_test = _erase(z, mean, proj), _erase(zt, mean, proj)
        cov = (erased_fit - erased_fit.mean(0)).T @ (concept - concept.mean(0)) / len(z)
        row = {
            "max_abs_diff_vs_reference": float(np.abs(erased_test - reference_test).max()),
            "mean_abs_edit": float(np.abs(erased_test - zt).mean()),
            "max_abs_cross_cov_fit": float(np.abs(cov).max()),
        }
        for c in classes:
            probe = probe_confound(erased_test, np.asarray(test[c]))
            row[f"{c}_probe"] = probe["probe_accuracy"]
            row[f"{c}_majority"] = probe["majority_rate"]
        out[name] = row
    for c in classes:
        out[f"{c}_probe_before"] = probe_confound(zt, np.asarray(test[c]))["probe_accuracy"]
    return out


def _erase(z: np.ndarray, mean: np.ndarray, proj: np.ndarray) -> np.ndarray:
    return z - (z - mean) @ proj.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="trained run directory (fused representations)")
    parser.add_argument("--cohort", help="the run's cohort directory")
    args = parser.parse_args()
    results = {"planted": compare(*planted())}
    if args.run:
        results["run"] = compare(*from_run(args.run, args.cohort))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
