"""Simulated genotypes: ancestry groups, marker panel, causal groups.

Population model (Balding-Nichols): each marker has an ancestral allele
frequency ``p ~ U(0.05, 0.5)``; each ancestry group draws its own frequency
``p_k ~ Beta(p (1 - F) / F, (1 - p)(1 - F) / F)``, so groups diverge with
fixation index ``F`` (Fst). Dosages are ``Binomial(2, p_k)``.

Markers are grouped into genes (``markers.parquet``: marker, group, chrom,
pos). A few groups are causal: "main" groups add to the risk logit, one
"modifier" group changes the effect of the lactate/creatinine trend. A group's
score is the weighted dosage sum of its causal markers, centred and scaled with
the ancestral frequencies, so ancestry shifts the score (stratification).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

MAIN, MODIFIER, NONE = "main", "modifier", "none"


@dataclass(frozen=True)
class GeneticPanel:
    """Population-level genetic parameters of one simulated world.

    Attributes:
        markers: marker name per column (M).
        groups: group name per marker (M).
        group_names: distinct group names (G), in order.
        chrom: chromosome per marker (M).
        pos: base-pair position per marker (M).
        ancestral_freq: ancestral alt-allele frequency (M).
        freq: alt-allele frequency per ancestry group (A, M).
        weight: per-marker weight within its group, 0 for non-causal markers (M).
        role: role of each group, ``main``/``modifier``/``none`` (G).
        effect: risk-logit effect per unit group score (G); for the modifier, the
            relative increase of the physiological-trend effect in carriers.
    """

    markers: list[str]
    groups: list[str]
    group_names: list[str]
    chrom: np.ndarray
    pos: np.ndarray
    ancestral_freq: np.ndarray
    freq: np.ndarray
    weight: np.ndarray
    role: list[str]
    effect: np.ndarray

    @property
    def group_index(self) -> np.ndarray:
        """Index into ``group_names`` of each marker (M)."""
        lookup = {g: i for i, g in enumerate(self.group_names)}
        return np.array([lookup[g] for g in self.groups])


def build_panel(
    rng: np.random.Generator,
    n_ancestries: int,
    n_groups: int,
    markers_per_group: int,
    n_causal_groups: int,
    fst: float,
) -> GeneticPanel:
    """Draws the marker panel, ancestry frequencies and causal groups."""
    m = n_groups * markers_per_group
    group_names = [f"GENE{g + 1:02d}" for g in range(n_groups)]
    groups = [group_names[j // markers_per_group] for j in range(m)]
    chrom, pos = _positions(rng, n_groups, markers_per_group)
    p = rng.uniform(0.05, 0.5, size=m)
    freq = _balding_nichols(rng, p, fst, n_ancestries)
    role, effect = _group_roles(rng, n_groups, n_causal_groups)
    weight = _marker_weights(rng, role, markers_per_group)
    return GeneticPanel(
        markers=[f"snp{j + 1:04d}" for j in range(m)],
        groups=groups,
        group_names=group_names,
        chrom=chrom,
        pos=pos,
        ancestral_freq=p,
        freq=freq,
        weight=weight,
        role=role,
        effect=effect,
    )


def _positions(rng: np.random.Generator, n_groups: int, per_group: int) -> tuple[np.ndarray, ...]:
    """A chromosome per gene, markers clustered within ~50 kb of the gene start."""
    gene_chrom = rng.integers(1, 23, size=n_groups)
    gene_start = rng.integers(1_000_000, 200_000_000, size=n_groups)
    offsets = np.sort(rng.integers(0, 50_000, size=(n_groups, per_group)), axis=1)
    chrom = np.repeat(gene_chrom, per_group).astype(str)
    pos = (gene_start[:, None] + offsets).reshape(-1).astype(np.int64)
    return chrom, pos


def _balding_nichols(
    rng: np.random.Generator, p: np.ndarray, fst: float, n_ancestries: int
) -> np.ndarray:
    """Per-ancestry allele frequencies (A, M) diverging from ``p`` with fixation index ``fst``."""
    a = p * (1 - fst) / fst
    b = (1 - p) * (1 - fst) / fst
    freq = rng.beta(a, b, size=(n_ancestries, p.size))
    return np.clip(freq, 0.01, 0.99)


def _group_roles(
    rng: np.random.Generator, n_groups: int, n_causal: int
) -> tuple[list[str], np.ndarray]:
    """The first causal group (in a random order) is the modifier, the rest are main."""
    if not 2 <= n_causal <= n_groups:
        raise ValueError(f"n_causal_groups={n_causal} must lie in [2, n_groups={n_groups}]")
    causal = rng.choice(n_groups, size=n_causal, replace=False)
    role = [NONE] * n_groups
    effect = np.zeros(n_groups)
    role[causal[0]] = MODIFIER
    effect[causal[0]] = 1.5
    main = causal[1:]
    # Main-group effects share a fixed budget so the genetic score's spread does not
    # depend on how many causal groups there are.
    share = rng.dirichlet(np.full(main.size, 4.0))
    effect[main] = np.sqrt(share) * rng.choice([-1.0, 1.0], size=main.size)
    for g in main:
        role[g] = MAIN
    return role, effect


def _marker_weights(rng: np.random.Generator, role: list[str], per_group: int) -> np.ndarray:
    """Half of a causal group's markers carry a weight; the others are passengers."""
    weight = np.zeros((len(role), per_group))
    n_causal = max(1, per_group // 2)
    for g, r in enumerate(role):
        if r == NONE:
            continue
        idx = rng.choice(per_group, size=n_causal, replace=False)
        weight[g, idx] = rng.uniform(0.5, 1.5, size=n_causal) * rng.choice([-1, 1], size=n_causal)
        if r == MODIFIER:
            weight[g, idx] = np.abs(weight[g, idx])  # the risk allele counts towards carriage
    return weight.reshape(-1)


def draw_dosages(rng: np.random.Generator, panel: GeneticPanel, ancestry: np.ndarray) -> np.ndarray:
    """Genotype dosages for subjects of the given ancestry indices.

    Shapes:
        ancestry: (N,) int ancestry index per subject.
        returns: (N, M) int8 dosage 0/1/2.
    """
    p = panel.freq[ancestry]  # (N, M)
    return rng.binomial(2, p).astype(np.int8)


def group_scores(panel: GeneticPanel, dosage: np.ndarray) -> np.ndarray:
    """Standardized weighted dosage per group, 0 for groups without causal markers.

    Centred and scaled with the ancestral frequencies: ``sum_j w_j (g_j - 2 p_j)
    / sqrt(sum_j w_j^2 2 p_j (1 - p_j))``.

    Shapes:
        dosage: (N, M) complete dosages (before missing calls).
        returns: (N, G).
    """
    p = panel.ancestral_freq
    centred = (dosage - 2 * p) * panel.weight  # (N, M)
    gi = panel.group_index
    n_groups = len(panel.group_names)
    num = np.zeros((dosage.shape[0], n_groups))
    np.add.at(num.T, gi, centred.T)
    var = np.bincount(gi, weights=panel.weight**2 * 2 * p * (1 - p), minlength=n_groups)
    return num / np.sqrt(np.where(var > 0, var, 1.0))


def mask_calls(rng: np.random.Generator, dosage: np.ndarray, rate: float) -> np.ndarray:
    """Drops a fraction ``rate`` of calls at random.

    Shapes:
        dosage: (N, M) int8.
        returns: (N, M) float32 with NaN at missing calls.
    """
    out = dosage.astype(np.float32)
    out[rng.random(dosage.shape) < rate] = np.nan
    return out


def markers_frame(panel: GeneticPanel) -> pl.DataFrame:
    """``markers.parquet``: marker, group, chrom, pos."""
    return pl.DataFrame(
        {
            "marker": panel.markers,
            "group": panel.groups,
            "chrom": panel.chrom.tolist(),
            "pos": panel.pos,
        },
        schema={"marker": pl.String, "group": pl.String, "chrom": pl.String, "pos": pl.Int64},
    )


def genotypes_frame(panel: GeneticPanel, subject_id: np.ndarray, calls: np.ndarray) -> pl.DataFrame:
    """``genotypes.parquet``: subject_id plus one nullable Int8 dosage column per marker."""
    columns = [pl.Series("subject_id", subject_id, dtype=pl.Int64)]
    for j, name in enumerate(panel.markers):
        columns.append(pl.Series(name, calls[:, j], nan_to_null=True).cast(pl.Int8))
    return pl.DataFrame(columns)


def groups_frame(panel: GeneticPanel) -> pl.DataFrame:
    """``oracle_groups.parquet``: group, causal, role, effect."""
    return pl.DataFrame(
        {
            "group": panel.group_names,
            "causal": [r != NONE for r in panel.role],
            "role": panel.role,
            "effect": panel.effect.astype(np.float64),
        }
    )
