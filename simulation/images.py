"""Simulated chest films (PA view) written as real DICOM files.

A film is drawn in display space (1 = dense = bright): body, two lung fields,
mediastinum and spine, a heart shadow on the patient's left (image right in a PA
view), ribs and clavicles, and airspace opacities that fill a fraction
``extent`` of the lung fields (lower zones first). The site's scanner then
applies its resolution (blur), intensity curve (gamma), noise, bit depth and
photometric interpretation (MONOCHROME1 stores inverted values), and burns its
marker (a white square with the site's letter) into one corner.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage
from scipy.special import expit

from clinfuse.simulation.world import SiteProfile

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
VIEW = "PA"
# 5 x 7 bitmaps of the site letters burned into films.
_FONT = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".####", "#....", "#....", "#....", "#....", "#....", ".####"),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".####", "#....", "#....", "#..##", "#...#", "#...#", ".###."),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "#####"),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
}
# Where the lung fields lie in the [-1, 1] film frame: (centre x, centre y, radius x, radius y).
RIGHT_LUNG = (-0.40, -0.08, 0.30, 0.62)  # patient's right = image left
LEFT_LUNG = (0.40, -0.05, 0.27, 0.58)


@dataclass(frozen=True)
class AnatomyBank:
    """Healthy chests of patients of slightly different position and build.

    Drawing the anatomy is the costly part of a film, so a cohort draws a bank of
    variants once and each film picks one; opacities, noise and the scanner
    make every film distinct.

    Attributes:
        density: (V, H, W) display-space density of the variants.
        lung: (V, H, W) soft lung-field masks.
    """

    density: np.ndarray
    lung: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, size: int, variants: int = 48) -> AnatomyBank:
        density, lung = _anatomy(rng, variants, size)
        return cls(density, lung)


def render_films(
    rng: np.random.Generator, extent: np.ndarray, bank: AnatomyBank, profile: SiteProfile
) -> np.ndarray:
    """Stored pixel values of films taken on one site's scanner.

    Args:
        rng: random generator.
        extent: fraction of the lung fields covered by opacity, in [0, 1].
        bank: anatomy variants (their side is the film side).
        profile: the site's scanner and acquisition.

    Shapes:
        extent: (N,).
        returns: (N, H, W) uint16 stored values.
    """
    pick = rng.integers(0, bank.density.shape[0], size=extent.size)
    lung = bank.lung[pick]  # (N, H, W)
    density = bank.density[pick] + 0.32 * _opacities(rng, lung, extent)
    return _acquire(rng, np.clip(density, 0.0, 1.0), profile)


def _grid(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-film jittered coordinates: small shifts and scaling of the patient."""
    axis = np.linspace(-1.0, 1.0, size)
    y, x = np.meshgrid(axis, axis, indexing="ij")  # (H, W)
    dx, dy = rng.normal(0, 0.03, (2, n, 1, 1))
    scale = rng.normal(1.0, 0.04, (n, 1, 1))
    return (x - dx) / scale, (y - dy) / scale  # (N, H, W) each


def _ellipse(
    x: np.ndarray, y: np.ndarray, shape: tuple[float, ...], edge: float = 0.08
) -> np.ndarray:
    """Soft indicator (0..1) of an ellipse (cx, cy, rx, ry)."""
    cx, cy, rx, ry = shape
    r2 = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return expit((1.0 - r2) / edge)


def _band(value: np.ndarray, width: float) -> np.ndarray:
    """Gaussian ridge along ``value == 0``."""
    return np.exp(-((value / width) ** 2))


def _anatomy(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Display-space density of the chest without disease, and the lung-field mask.

    Shapes:
        returns: (N, H, W) density in [0, 1], (N, H, W) soft lung mask.
    """
    x, y = _grid(rng, n, size)
    body = _ellipse(x, y, (0.0, 0.1, 0.86, 1.05), edge=0.04)
    lung = np.maximum(_ellipse(x, y, RIGHT_LUNG), _ellipse(x, y, LEFT_LUNG))
    heart = _ellipse(x, y, (0.17, 0.33, 0.30, 0.24))
    mediastinum = _ellipse(x, y, (0.0, -0.2, 0.14, 0.78), edge=0.15)
    thorax = _ellipse(x, y, (0.0, -0.1, 0.82, 0.78), edge=0.2)
    density = 0.03 + 0.5 * body - 0.32 * lung + 0.25 * mediastinum + 0.2 * heart
    density += 0.10 * _band(x, 0.05) * body  # spine
    density += 0.10 * _ribs(x, y) * thorax + 0.12 * _clavicles(x, y)
    return density, lung


def _ribs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Nine pairs of posterior ribs curving down laterally."""
    lateral = (np.abs(x) > 0.08) & (np.abs(x) < 0.8)
    ribs = sum(_band(y - (-0.72 + 0.16 * k + 0.30 * x**2), 0.028) for k in range(9))
    return ribs * lateral


def _clavicles(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    span = (np.abs(x) > 0.1) & (np.abs(x) < 0.6)
    return _band(y - (-0.78 + 0.15 * np.abs(x)), 0.03) * span


def _opacities(rng: np.random.Generator, lung: np.ndarray, extent: np.ndarray) -> np.ndarray:
    """Patchy airspace opacity covering a fraction ``extent`` of each lung mask.

    A smooth random field (6 x 6 noise, bilinearly upsampled), tilted towards the
    bases, is thresholded at its ``1 - extent`` quantile inside the lungs.

    Shapes:
        lung: (N, H, W); extent: (N,); returns: (N, H, W) in [0, 1].
    """
    n, h, w = lung.shape
    coarse = rng.standard_normal((n, 6, 6))
    field = np.einsum("hi,nij,wj->nhw", _upsampler(h), coarse, _upsampler(w))  # (N, H, W)
    field += 1.2 * np.linspace(-1, 1, h)[None, :, None]  # lower zones first
    thresh = _lung_quantile(field, lung, 1.0 - extent)[:, None, None]
    thresh = np.where(extent[:, None, None] <= 0, np.inf, thresh)
    return lung * expit((field - thresh) / 0.05)


def _upsampler(size: int, coarse: int = 6) -> np.ndarray:
    """Bilinear interpolation matrix (size, coarse) from a coarse grid to ``size`` points."""
    pos = np.linspace(0, coarse - 1, size)
    return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(coarse)[None, :]))


def _lung_quantile(field: np.ndarray, lung: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-film quantile ``q`` of the smooth field inside the lungs, on a 1-in-4 grid.

    Shapes:
        field, lung: (N, H, W); q: (N,); returns: (N,).
    """
    step = max(1, field.shape[-1] // 32)
    sub = field[:, ::step, ::step]
    inside = lung[:, ::step, ::step] > 0.5
    ranked = np.sort(np.where(inside, sub, np.inf).reshape(sub.shape[0], -1), axis=1)
    count = inside.reshape(sub.shape[0], -1).sum(axis=1)
    pos = np.clip((q * (count - 1)).astype(int), 0, ranked.shape[1] - 1)
    return ranked[np.arange(sub.shape[0]), pos]


def _acquire(rng: np.random.Generator, density: np.ndarray, profile: SiteProfile) -> np.ndarray:
    """The scanner: blur, intensity curve, noise, burned-in marker, bit depth, photometry."""
    if profile.blur > 0:
        density = ndimage.gaussian_filter(density, sigma=(0, profile.blur, profile.blur))
    signal = np.clip(density, 0.0, 1.0) ** profile.gamma
    signal = np.clip(signal + profile.noise * rng.standard_normal(signal.shape), 0.0, 1.0)
    signal = _burn_marker(signal, profile)
    top = 2**profile.bits_stored - 1
    stored = np.round(signal * top)
    if profile.photometric == "MONOCHROME1":
        stored = top - stored
    return stored.astype(np.uint16)


def marker_box(size: int, corner: int) -> tuple[slice, slice]:
    """Rows and columns of the burned-in marker square for a film side and corner."""
    side = max(9, size // 8)
    margin = max(1, size // 32)
    top = margin if corner in (0, 1) else size - margin - side
    left = margin if corner in (0, 2) else size - margin - side
    return slice(top, top + side), slice(left, left + side)


def _burn_marker(signal: np.ndarray, profile: SiteProfile) -> np.ndarray:
    """White square with the site letter in black, in the site's corner (returns a copy)."""
    out = signal.copy()
    rows, cols = marker_box(signal.shape[-1], profile.corner)
    side = rows.stop - rows.start
    glyph = _glyph(profile.letter, side - 2)  # (side-2, side-2) bool
    patch = np.ones((side, side))
    patch[1:-1, 1:-1][glyph] = 0.0
    out[:, rows, cols] = patch
    return out


def _glyph(letter: str, side: int) -> np.ndarray:
    """The letter's bitmap resized (nearest neighbour) to ``side x side``; blank if unknown."""
    bitmap = np.array([[c == "#" for c in row] for row in _FONT.get(letter, ("." * 5,) * 7)])
    ri = np.arange(side) * bitmap.shape[0] // side
    ci = np.arange(side) * bitmap.shape[1] // side
    return bitmap[ri][:, ci]


@dataclass(frozen=True)
class FilmMeta:
    """What a DICOM header says about one film besides the site.

    Attributes:
        subject_id: cohort subject id (PatientName ``ANON^<id>``).
        pseudonym: PatientID.
        time_us: acquisition time, microseconds since the epoch.
        number: index of the film within the subject.
        uid_seed: strings that make every UID of this film deterministic.
    """

    subject_id: int
    pseudonym: str
    time_us: int
    number: int
    uid_seed: tuple[str, ...]


def pseudonym(*parts: object) -> str:
    """A stable pseudonymous patient id that reveals nothing about the subject."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()
    return f"PSN{digest[:12].upper()}"


class DicomWriter:
    """Writes one site's films as DICOM Part 10 files (Explicit VR Little Endian).

    The site-constant header is built once; each film sets its UIDs, patient,
    dates and pixels.
    """

    def __init__(self, profile: SiteProfile, size: int) -> None:
        self.profile = profile
        self.sop_class = CR_STORAGE if profile.modality == "CR" else DX_STORAGE
        self.ds = Dataset()
        _equipment(self.ds, profile)
        _image(self.ds, size, profile)

    def write(self, path: Path, pixels: np.ndarray, meta: FilmMeta) -> None:
        """Writes one film.

        Shapes:
            pixels: (H, W) uint16 stored values.
        """
        ds = self.ds
        sop_uid = generate_uid(entropy_srcs=[*meta.uid_seed, "sop"])
        ds.file_meta = _file_meta(self.sop_class, sop_uid)
        ds.SOPClassUID, ds.SOPInstanceUID = self.sop_class, sop_uid
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[*meta.uid_seed, "study"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*meta.uid_seed, "series"])
        _patient(ds, meta)
        _study(ds, meta)
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CLINFUSE_SIM"
    return meta


def _patient(ds: Dataset, meta: FilmMeta) -> None:
    """Synthetic, de-identified patient module: no birth date, no real identifiers."""
    ds.PatientName = f"ANON^{meta.subject_id}"
    ds.PatientID = meta.pseudonym


def _study(ds: Dataset, meta: FilmMeta) -> None:
    when = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=int(meta.time_us))
    ds.StudyDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.StudyID = f"{meta.number + 1}"


def _equipment(ds: Dataset, profile: SiteProfile) -> None:
    """Site-constant modules: equipment, series, body part, view, de-identification."""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "clinfuse simulator: synthetic subject, no real identifiers"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Modality = profile.modality
    ds.Manufacturer = profile.manufacturer
    ds.ManufacturerModelName = profile.model
    ds.InstitutionName = profile.institution
    ds.StationName = profile.station
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = VIEW
    ds.PatientOrientation = ["L", "F"]  # columns run to the patient's left, rows to the feet
    if profile.modality == "DX":
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"


def _image(ds: Dataset, size: int, profile: SiteProfile) -> None:
    rows = cols = size
    spacing = round(profile.fov_mm / cols, 4)
    top = 2**profile.bits_stored - 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, profile.bits_stored, profile.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = ds.ImagerPixelSpacing = [spacing, spacing]
    ds.WindowCenter, ds.WindowWidth = top // 2 + 1, top + 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
