"""Shared genotype designs of the encoder tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clinfuse.datasets.datamodule import genotype_principal_axes
from clinfuse.datasets.spec import DataSpec

GROUPS, PER_GROUP = 12, 4
CAUSAL, ANCESTRAL = (1, 7), (4,)


def _split(n: int) -> dict[str, slice]:
    """The first 70% of the subjects train, the rest tune."""
    return {"train": slice(0, int(0.7 * n)), "tuning": slice(int(0.7 * n), n)}


def _batches(x: np.ndarray, y: np.ndarray, split: dict[str, slice]) -> dict[str, dict]:
    """Fully called genotype batches of every split. Shapes: x (N, M), y (N,)"""
    return {
        s: {
            "genotype": torch.from_numpy(x[i]),
            "genotype_mask": torch.ones_like(torch.from_numpy(x[i])),
            "genotype_present": torch.ones(x[i].shape[0], dtype=torch.bool),
            "label": torch.from_numpy(y[i]),
        }
        for s, i in split.items()
    }


def two_populations_design(n: int, seed: int) -> tuple[DataSpec, dict, dict]:
    """Two populations; groups 1 and 7 causal; group 4's frequencies differ by 0.35
    between populations and population 1 has +1.2 on the logit, so group 4 is
    associated with the outcome without carrying any risk."""
    rng = np.random.default_rng(seed)
    m = GROUPS * PER_GROUP
    freq = np.tile(rng.uniform(0.15, 0.45, m), (2, 1))  # (2, M)
    cols4 = slice(4 * PER_GROUP, 5 * PER_GROUP)
    freq[1, cols4] = freq[0, cols4] + 0.35
    pop = rng.integers(0, 2, n)
    x = rng.binomial(2, freq[pop]).astype(np.float32)  # (N, M)
    z = (x - x.mean(0)) / x.std(0)
    cols = [g * PER_GROUP + j for g in CAUSAL for j in range(PER_GROUP)]
    beta = rng.choice([-1.0, 1.0], len(cols)) * 0.35
    y = (rng.random(n) < 1 / (1 + np.exp(-(z[:, cols] @ beta + 1.2 * (pop - 0.5))))).astype(
        np.float32
    )
    split = _split(n)
    data = _batches(x, y, split)
    mean = data["train"]["genotype"].mean(0)
    spec = DataSpec(
        markers=[f"rs{i}" for i in range(m)],
        marker_groups=[i // PER_GROUP for i in range(m)],
        groups=[f"G{g:02d}" for g in range(GROUPS)],
        marker_mean=mean.tolist(),
        marker_pcs=genotype_principal_axes(data["train"], mean, 2),
    )
    return spec, data, {"causal": [f"G{g:02d}" for g in CAUSAL], "ancestral": "G04"}


@pytest.fixture(scope="session")
def two_populations():
    """``two_populations_design(n, seed)``: (spec, train/tuning batches, truth)."""
    return two_populations_design


def modifier_design(n: int, seed: int) -> tuple[DataSpec, dict, dict, dict]:
    """One population; group 2 is a main effect; group 6 only modifies the effect of an
    environment score ``e`` (carriers, group score above its median, have
    ``e``'s effect 2.5 times larger), so with the intercept at 0 it has no marginal
    association with the outcome at all.

    Returns:
        spec, train/tuning batches, ``{"train": e, "tuning": e}``, truth.
    """
    rng = np.random.default_rng(seed)
    m = GROUPS * PER_GROUP
    x = rng.binomial(2, rng.uniform(0.2, 0.5, m), size=(n, m)).astype(np.float32)
    z = (x - x.mean(0)) / x.std(0)
    main = z[:, 2 * PER_GROUP : 3 * PER_GROUP].mean(1)
    modifier = z[:, 6 * PER_GROUP : 7 * PER_GROUP].mean(1)
    carrier = modifier > np.median(modifier)
    e = rng.normal(size=n)
    logit = 1.2 * e * (1.0 + 1.5 * carrier) + 1.0 * main / main.std()
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    split = _split(n)
    data = _batches(x, y, split)
    spec = DataSpec(
        markers=[f"rs{i}" for i in range(m)],
        marker_groups=[i // PER_GROUP for i in range(m)],
        groups=[f"G{g:02d}" for g in range(GROUPS)],
        marker_mean=data["train"]["genotype"].mean(0).tolist(),
    )
    env = {s: torch.from_numpy(e[i]) for s, i in split.items()}
    return spec, data, env, {"main": "G02", "modifier": "G06"}


@pytest.fixture(scope="session")
def modifier_genes():
    """``modifier_design(n, seed)``: (spec, batches, environment scores, truth)."""
    return modifier_design
