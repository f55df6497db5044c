"""ComBat harmonization of frozen image-backbone features across sites.

Scanners differ in intensity curves, noise and markers, and a frozen CNN's pooled
features carry those differences: a probe reads the site off them. ComBat (Johnson et
al. 2007; Fortin et al. 2018 for imaging features) models each feature as

    x_ij = a_j + cov_i · b_j + g_site(i),j + d_site(i),j · e_ij

and removes the site's additive (``g``) and multiplicative (``d``) terms, with the
site parameters shrunk towards each other by empirical Bayes. The outcome is a
covariate of the fit, so a site whose patients are sicker keeps that difference:
only what differs between sites *at the same outcome* is taken out.

The fit is ``neuroCombat`` (the reference Python implementation by ComBat's imaging
authors) on the training split's features. Applied to a patient, ComBat is an affine
map per site and feature (``neuroCombatFromTraining``), which the image encoder keeps
as two buffers and applies in training and at scoring alike:

    x* = (x - m) / sqrt(d_s) - g_s · sqrt(v) / sqrt(d_s) + m

with ``m`` the standardized mean and ``v`` the pooled variance of each feature. A site
the fit never saw (and a sample whose site is unknown) passes through unchanged: ComBat
has no estimate for it. So does a site with fewer than ``MIN_SITE_FILMS`` training films
(no variance to estimate), and every site when fewer than two sites have enough: a
single-scanner cohort has nothing to harmonize. The fit's summary names those sites.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

# Features whose pooled variance is below this are left as they are (ComBat divides by it).
MIN_VARIANCE = 1e-10
# A site needs this many training films for ComBat to estimate its scale.
MIN_SITE_FILMS = 2


def combat_affine(
    features: np.ndarray, sites: np.ndarray, labels: np.ndarray, n_sites: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """ComBat fitted on training features, as a per-site affine map.

    Args:
        features: (N, F) frozen backbone features of the training samples with a film.
        sites: (N,) site codes in [0, n_sites).
        labels: (N,) outcome 0/1, kept as a covariate (its effect is preserved).
        n_sites: sites in the DataSpec; the map has one more row, the identity, for
            unknown sites (code -1).

    Returns:
        scale (n_sites + 1, F), shift (n_sites + 1, F): ``x* = x * scale[s] + shift[s]``;
        sites without training samples get the identity row, and so do sites with fewer
        than ``MIN_SITE_FILMS`` (all sites, when fewer than two have enough). And a
        summary: sites fitted, samples, features left unchanged, ``unharmonized_sites``
        (codes with training films that kept the identity) and, when some did, ``note``.

    Raises:
        ValueError: features, sites and labels that do not align.
    """
    from neuroCombat import neuroCombat

    x = np.asarray(features, dtype=np.float64)
    s = np.asarray(sites, dtype=np.int64)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or len(x) != len(s) or len(s) != len(y):
        raise ValueError(
            f"combat: features {x.shape}, sites {s.shape} and labels {y.shape} must align"
        )
    present, counts = np.unique(s, return_counts=True)
    fitted = present[counts >= MIN_SITE_FILMS]
    if len(fitted) < 2:
        fitted = present[:0]
    keep = np.isin(s, fitted)  # (N,) the films of the fitted sites
    info: dict[str, Any] = {
        "method": "combat",
        "sites": sorted(int(c) for c in fitted),
        "n": int(keep.sum()),
        "features": int(x.shape[1]),
        "unharmonized_sites": sorted(int(c) for c in present if c not in fitted),
    }
    scale = np.ones((n_sites + 1, x.shape[1]))
    shift = np.zeros((n_sites + 1, x.shape[1]))
    if info["unharmonized_sites"]:
        info["note"] = _unharmonized_note(present, counts, fitted)
    if len(fitted) == 0:
        info["unchanged_features"] = int(x.shape[1])
        return scale, shift, info
    x, s, y = x[keep], s[keep], y[keep]
    varying = x.var(axis=0) > MIN_VARIANCE  # (F,)
    import pandas as pd

    covars = pd.DataFrame({"site": s.astype(str), "label": y.astype(str)})
    categorical = ["label"] if len(np.unique(y)) > 1 else []
    with contextlib.redirect_stdout(io.StringIO()):  # neuroCombat prints its progress
        est = neuroCombat(
            dat=x[:, varying].T,
            covars=covars,
            batch_col="site",
            categorical_cols=categorical,
        )["estimates"]
    mean = est["stand.mean"][:, 0] + est["mod.mean"].mean(axis=1)  # (F',)
    sd = np.sqrt(est["var.pooled"][:, 0])  # (F',)
    for row, name in enumerate(est["batches"]):
        code = int(name)
        d = np.sqrt(est["delta.star"][row])  # (F',)
        g = est["gamma.star"][row]  # (F',)
        scale[code, varying] = 1.0 / d
        shift[code, varying] = mean - (mean + g * sd) / d
    info["unchanged_features"] = int((~varying).sum())
    return scale, shift, info


def _unharmonized_note(present: np.ndarray, counts: np.ndarray, fitted: np.ndarray) -> str:
    """Why some sites' films keep their features as they are."""
    if len(fitted) == 0:
        return (
            f"combat: {len(present)} site(s) with training films, "
            f"{int((counts >= MIN_SITE_FILMS).sum())} with {MIN_SITE_FILMS} or more; "
            "nothing to harmonize, the image features are left as they are"
        )
    few = [int(c) for c in present if c not in fitted]
    return (
        f"combat: site code(s) {few} have fewer than {MIN_SITE_FILMS} training films; "
        "their films keep their features as they are"
    )
