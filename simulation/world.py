"""The simulated world: sites, scanners, ancestry groups and the genetic panel.

Everything here is drawn from ``world_seed`` alone, so cohorts simulated with
different subject seeds (a training cohort, a test cohort with a reversed site
effect, a cohort with a new site) live in the same world: same allele
frequencies, causal groups, scanner profiles and site names.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clinfuse.simulation.genetics import GeneticPanel, build_panel

PLACES = (
    "Alderbrook",
    "Birchmont",
    "Cedarfield",
    "Dunmore",
    "Elmstead",
    "Fernhill",
    "Glenwick",
    "Hollowmere",
    "Ironvale",
    "Juniper Bay",
)
MAX_SITES = len(PLACES)  # the new site included
VENDORS = (
    ("Northwind Imaging", "NW-CR"),
    ("Helios Medical Systems", "Helio DR"),
    ("Corvane Radiography", "CorvaScan"),
    ("Astera DX", "AX"),
    ("Boreal Diagnostics", "BorealView"),
    ("Quillon Medical", "Q-Ray"),
    ("Tamsin Devices", "TD Chest"),
    ("Ostrava Optics", "OptiCR"),
    ("Meridian Scientific", "MeriDX"),
    ("Pellworth Systems", "PW"),
)
# Stream ids: one independent generator per component, so adding markers does not
# change the scanners and vice versa.
_SITES_STREAM, _PANEL_STREAM = 1, 2


@dataclass(frozen=True)
class SiteProfile:
    """One hospital: its scanner, acquisition, patient mix and baseline risk.

    Attributes:
        name: site name (``subjects.site``); its first letter is burned into films.
        institution: DICOM InstitutionName.
        station: DICOM StationName.
        manufacturer: DICOM Manufacturer (distinct per site).
        model: DICOM ManufacturerModelName.
        modality: ``CR`` or ``DX``.
        photometric: ``MONOCHROME1`` (inverted storage) or ``MONOCHROME2``.
        gamma: exponent of the detector intensity curve.
        noise: Gaussian noise s.d. on the [0, 1] display scale.
        blur: Gaussian blur s.d. in pixels (resolution).
        fov_mm: detector field of view; pixel spacing is ``fov_mm / image_size``.
        bits_stored: 12 or 16.
        corner: corner of the burned-in marker (0 top-left, 1 top-right,
            2 bottom-left, 3 bottom-right).
        ancestry_mix: share of each ancestry group among the site's patients (A,).
        logit_offset: the site's shift of the risk logit under ``site_effect="normal"``.
        weight: relative number of patients.
    """

    name: str
    institution: str
    station: str
    manufacturer: str
    model: str
    modality: str
    photometric: str
    gamma: float
    noise: float
    blur: float
    fov_mm: float
    bits_stored: int
    corner: int
    ancestry_mix: np.ndarray
    logit_offset: float
    weight: float

    @property
    def letter(self) -> str:
        return self.name[0]


@dataclass(frozen=True)
class World:
    """Population parameters shared by every cohort drawn with the same ``world_seed``.

    Attributes:
        sites: the regular sites, then (last) the site used only when ``new_site``.
        ancestries: ancestry group names (A).
        panel: the genetic panel.
    """

    sites: list[SiteProfile]
    ancestries: list[str]
    panel: GeneticPanel

    def active_sites(self, new_site: bool) -> list[SiteProfile]:
        """The sites a cohort draws patients from."""
        return self.sites if new_site else self.sites[:-1]


def build_world(
    world_seed: int,
    n_sites: int,
    n_ancestries: int,
    n_groups: int,
    markers_per_group: int,
    n_causal_groups: int,
    fst: float,
) -> World:
    """Draws a world with ``n_sites`` regular sites plus one held-back new site."""
    if not 1 <= n_sites < MAX_SITES:
        raise ValueError(f"n_sites={n_sites} must lie in [1, {MAX_SITES - 1}]")
    rng_sites = np.random.default_rng([0, world_seed, _SITES_STREAM])
    rng_panel = np.random.default_rng([0, world_seed, _PANEL_STREAM])
    sites = _draw_sites(rng_sites, n_sites, n_ancestries)
    panel = build_panel(rng_panel, n_ancestries, n_groups, markers_per_group, n_causal_groups, fst)
    ancestries = [f"POP{k + 1}" for k in range(n_ancestries)]
    return World(sites=sites, ancestries=ancestries, panel=panel)


def _draw_sites(rng: np.random.Generator, n_sites: int, n_ancestries: int) -> list[SiteProfile]:
    n = n_sites + 1
    places = rng.permutation(len(PLACES))[:n]
    vendors = rng.permutation(len(VENDORS))[:n]
    offsets = _site_offsets(rng, n_sites)
    weights = rng.dirichlet(np.full(n, 6.0))
    return [
        _draw_site(
            rng, k, PLACES[places[k]], VENDORS[vendors[k]], offsets[k], weights[k], n_ancestries
        )
        for k in range(n)
    ]


def _site_offsets(rng: np.random.Generator, n_sites: int) -> np.ndarray:
    """Evenly spread logit offsets for the regular sites, a random one for the new site."""
    spread = np.linspace(-0.9, 0.9, n_sites) if n_sites > 1 else np.zeros(1)
    return np.append(rng.permutation(spread), rng.uniform(-0.5, 0.5))


def _draw_site(
    rng: np.random.Generator,
    k: int,
    place: str,
    vendor: tuple[str, str],
    offset: float,
    weight: float,
    n_ancestries: int,
) -> SiteProfile:
    dominant = k % n_ancestries  # sites serve different ancestry mixes
    alpha = np.full(n_ancestries, 0.7)
    alpha[dominant] += 4.0
    return SiteProfile(
        name=place,
        institution=f"{place} General Hospital",
        station=f"{place[:3].upper()}-XR{int(rng.integers(1, 10))}",
        manufacturer=vendor[0],
        model=f"{vendor[1]} {int(rng.integers(1, 9)) * 1000}",
        modality=("CR", "DX")[int(rng.integers(0, 2))],
        photometric="MONOCHROME2" if k % 2 == 0 else "MONOCHROME1",
        gamma=float(rng.uniform(0.65, 1.5)),
        noise=float(rng.uniform(0.01, 0.05)),
        blur=float(rng.uniform(0.0, 1.2)),
        fov_mm=float(rng.uniform(350.0, 430.0)),
        bits_stored=(12, 16)[int(rng.integers(0, 2))],
        corner=int(rng.integers(0, 4)),
        ancestry_mix=rng.dirichlet(alpha),
        logit_offset=float(offset),
        weight=float(weight),
    )
