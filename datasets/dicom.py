"""DICOM reader: one file -> float32 pixels in physical units + a de-identified header.

The reader decodes pixel data (natively or through the installed pylibjpeg
decoders), applies the modality LUT (RescaleSlope/RescaleIntercept, so CT comes
out in Hounsfield units), turns RGB into luminance, inverts MONOCHROME1 so that
bright means dense for every file, and reduces multi-frame data by a frame
policy. The display window (VOI LUT, header window, a CT preset or an explicit
(center, width)) is kept beside the pixels and applied by ``DicomImage.to_unit``.

Uncompressed little-endian monochrome pixel data, the common case, is taken
straight from the buffer and rescaled here (bit for bit what pydicom's decoder and
``apply_modality_lut`` give); everything else goes through pydicom's decoders.

Only the elements listed in ``_PIXEL_TAGS`` and ``META_FIELDS`` are ever parsed
(pydicom ``specific_tags``): patient identifiers such as PatientName, PatientID or
PatientBirthDate are never read, so they cannot reach the metadata, a message or a
log line.

Example:
    >>> image = DicomReader(window="lung").read("ct.dcm")
    >>> image.pixels.min()  # HU, air near -1000
    >>> unit = image.to_unit()  # (H, W) in [0, 1], lung window applied
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from clinfuse.hashing import file_sha256  # noqa: F401  (part of the reader API)

META_FIELDS: tuple[str, ...] = (
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "StationName",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "SOPInstanceUID",
    "StudyDate",
    "PhotometricInterpretation",
    "BitsStored",
    "NumberOfFrames",
    "TransferSyntaxUID",
)
"""The header fields ``DicomImage.meta`` holds, always all of them (missing -> None)."""

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}
"""CT display windows, (center, width) in HU."""

FRAME_POLICIES: tuple[str, ...] = ("middle", "first", "mean", "max", "all")

_PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PALETTE_TAGS = tuple(
    f"{kind}{color}PaletteColorLookupTable{part}"
    for color in ("Red", "Green", "Blue")
    for kind, part in (("", "Descriptor"), ("", "Data"), ("Segmented", "Data"))
)
_PIXEL_TAGS: tuple[str, ...] = (
    *_PIXEL_DATA_TAGS,
    *_PALETTE_TAGS,
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "NumberOfFrames",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "PixelSpacing",
    "ImagerPixelSpacing",
)
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601

# Tags as numbers once, not keywords per read: pydicom looks keywords up on every call.
_READ_TAGS: list[BaseTag] = sorted({Tag(name) for name in (*_PIXEL_TAGS, *META_FIELDS)})
_META_TAGS: list[BaseTag] = sorted({Tag(name) for name in META_FIELDS})
_PIXEL_DATA_TAG_IDS: tuple[BaseTag, ...] = tuple(Tag(name) for name in _PIXEL_DATA_TAGS)
# Read for pydicom's decoders and LUT functions, never looked at by this module.
_DECODER_ONLY: tuple[str, ...] = (
    *_PIXEL_DATA_TAGS,
    *_PALETTE_TAGS,
    "PlanarConfiguration",
    "HighBit",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "RescaleType",
)
_HEADER_NAMES: dict[BaseTag, str] = {
    Tag(name): name for name in (*_PIXEL_TAGS, *META_FIELDS) if name not in _DECODER_ONLY
}
# Uncompressed little-endian monochrome pixel data is the stored integers as they are.
_NATIVE_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_NATIVE_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2"})
_FLOAT32_EXACT = 1 << 24  # integers up to 2**24 are exact in float32
_IN_MEMORY_BYTES = 4 << 20


class DicomReadError(ValueError):
    """A DICOM file cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class VoiLut:
    """A VOI lookup table from the header, already scaled to [0, 1].

    Attributes:
        first: the input value mapped to ``table[0]``; inputs below/above the
            table map to its first/last entry (DICOM PS3.3 C.11.2.1.1).
        table: (N,) float32 display values in [0, 1].
    """

    first: float
    table: np.ndarray

    def __call__(self, values: np.ndarray) -> np.ndarray:
        index = np.clip(np.rint(values - self.first), 0, len(self.table) - 1).astype(np.int64)
        return self.table[index]


@dataclass
class DicomImage:
    """Pixels of one DICOM file plus what is needed to display them.

    Attributes:
        pixels: float32 in physical units after the modality LUT (HU for CT),
            bright = dense (MONOCHROME1 inverted). (H, W), or (F, H, W) with the
            frame policy "all".
        meta: exactly ``META_FIELDS``; missing or empty elements are None.
        spacing: (row, col) mm from PixelSpacing, else ImagerPixelSpacing; None
            when neither holds two positive numbers.
        window: (center, width) applied by ``to_unit``; None without a window.
        voi_function: DICOM VOILUTFunction for ``window``: LINEAR, LINEAR_EXACT
            or SIGMOID.
        voi_lut: the header's VOI LUT; when set it takes precedence over ``window``.

    Shapes:
        pixels: (H, W) or (F, H, W)
    """

    pixels: np.ndarray
    meta: dict[str, Any]
    spacing: tuple[float, float] | None = None
    window: tuple[float, float] | None = None
    voi_function: str = "LINEAR"
    voi_lut: VoiLut | None = field(default=None, repr=False)

    def to_unit(self) -> np.ndarray:
        """Display values in [0, 1], float32, same shape as ``pixels``.

        The VOI LUT if there is one, else the window, else a robust (0.5, 99.5)
        percentile scaling.
        """
        if self.voi_lut is not None:
            return self.voi_lut(self.pixels).astype(np.float32)
        if self.window is not None:
            return apply_window(self.pixels, *self.window, function=self.voi_function)
        return percentile_scale(self.pixels)


def apply_window(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """Maps ``values`` through a DICOM window into [0, 1] (PS3.3 C.11.2.1.2-3).

    LINEAR: ``((x - (c - 0.5)) / (w - 1) + 0.5)`` clipped; LINEAR_EXACT:
    ``(x - c) / w + 0.5`` clipped; SIGMOID: ``1 / (1 + exp(-4 (x - c) / w))``.
    """
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * _shifted(values, center) / width))
    elif function == "LINEAR_EXACT":
        out = _shifted(values, center)
        out /= width
        out += 0.5
    elif width <= 1.0:  # LINEAR with width 1 is a step at the center
        out = (np.asarray(values, dtype=np.float64) > center - 0.5).astype(np.float64)
    else:
        out = _shifted(values, center - 0.5)
        out /= width - 1.0
        out += 0.5
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32)


def _shifted(values: np.ndarray, offset: float) -> np.ndarray:
    """``values - offset`` as a new float64 array (the window math runs in place on it)."""
    return np.subtract(values, offset, dtype=np.float64)


def percentile_scale(values: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Scales so the ``low``/``high`` percentiles map to 0/1, clipped; constant -> zeros."""
    x = np.asarray(values, dtype=np.float32)
    lo, hi = np.percentile(x, [low, high])
    if hi <= lo:
        return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


class DicomReader:
    """Reads DICOM files into ``DicomImage``.

    Args:
        window: "auto" (the header's VOI LUT, else its first WindowCenter/
            WindowWidth, else none), a preset name from ``WINDOW_PRESETS``, an
            explicit (center, width) in modality units, or None (no window:
            ``to_unit`` scales by percentiles).
        frame_policy: how multi-frame data becomes one image: "middle" (frame
            F // 2), "first", "mean", "max" (maximum intensity projection, after
            MONOCHROME1 inversion so it keeps the densest value) or "all"
            (keeps (F, H, W); single-frame files give F = 1).
    """

    def __init__(
        self,
        window: str | tuple[float, float] | None = "auto",
        frame_policy: str = "middle",
    ) -> None:
        self.window = _check_window(window)
        if frame_policy not in FRAME_POLICIES:
            raise ValueError(f"frame_policy must be one of {FRAME_POLICIES}, got {frame_policy!r}")
        self.frame_policy = frame_policy

    def read(self, path: str | Path) -> DicomImage:
        """Decodes ``path``; raises ``DicomReadError`` naming the file on any failure."""
        ds = _dcmread(path, _READ_TAGS, pixels=True)
        header = _header(ds, path)
        raw = _decode(ds, header, path)
        try:
            return self._image(raw, ds, header)
        except Exception as err:  # e.g. a malformed rescale or LUT element
            raise DicomReadError(f"{path}: cannot interpret the header ({_describe(err)})") from err

    def read_meta(self, path: str | Path) -> dict[str, Any]:
        """``META_FIELDS`` of ``path`` from the header alone (pixel data is not read)."""
        ds = _dcmread(path, _META_TAGS, pixels=False)
        return _meta(_header(ds, path))

    def _image(self, raw: np.ndarray, ds: Dataset, header: dict[str, Any]) -> DicomImage:
        pixels = _physical(raw, ds, header)
        window, function, lut = self._voi(ds, header)
        if header.get("PhotometricInterpretation") == "MONOCHROME1":
            flip = _inversion_sum(ds, header)
            pixels, window, lut = flip - pixels, _flip_window(window, flip), _flip_lut(lut, flip)
        return DicomImage(
            pixels=_reduce_frames(pixels, self.frame_policy),
            meta=_meta(header),
            spacing=_spacing(header),
            window=window,
            voi_function=function,
            voi_lut=lut,
        )

    def _voi(
        self, ds: Dataset, header: dict[str, Any]
    ) -> tuple[tuple[float, float] | None, str, VoiLut | None]:
        if self.window is None:
            return None, "LINEAR", None
        if isinstance(self.window, tuple):
            return self.window, "LINEAR", None
        if _is_gray(header) and "VOILUTSequence" in header:
            return None, "LINEAR", _header_lut(ds, header)
        function = str(header.get("VOILUTFunction") or "LINEAR").upper()
        return _header_window(header), function, None


# ------------------------------------------------------------------ reading and decoding


def _check_window(window: str | tuple[float, float] | None) -> str | tuple[float, float] | None:
    if window is None or window == "auto":
        return window
    if isinstance(window, str):
        if window not in WINDOW_PRESETS:
            raise ValueError(
                f"window must be 'auto', None, (center, width) or one of "
                f"{sorted(WINDOW_PRESETS)}, got {window!r}"
            )
        return WINDOW_PRESETS[window]
    center, width = (float(v) for v in window)
    if not width > 0:
        raise ValueError(f"window width must be > 0, got {width}")
    return center, width


def _dcmread(path: str | Path, tags: list[BaseTag], pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(
            _in_memory(path) if pixels else path,
            stop_before_pixels=not pixels,
            specific_tags=tags,
        )
    except InvalidDicomError:
        raise DicomReadError(
            f"{path}: not a DICOM file (no 'DICM' marker after the 128-byte preamble)"
        ) from None
    except OSError as err:
        raise DicomReadError(f"{path}: cannot open ({err.strerror or err})") from None
    except Exception as err:  # pydicom raises many types on a corrupt header
        raise DicomReadError(f"{path}: unreadable DICOM header ({_describe(err)})") from err


def _in_memory(path: str | Path) -> io.BytesIO | str | Path:
    """A small file's bytes (parsing from memory skips a buffered-file call per
    element, about a fifth of the parse of a 64 px film); a large file's path, so its
    pixel data is held once, not twice."""
    if os.path.getsize(path) > _IN_MEMORY_BYTES:
        return path
    with open(path, "rb") as f:
        return io.BytesIO(f.read())


def _header(ds: Dataset, path: str | Path) -> dict[str, Any]:
    """keyword -> value of the elements this module uses, plus the transfer syntax.

    Each element is converted once by pydicom, without storing it back in ``ds``.
    """
    try:
        encoding = ds.original_character_set
        header = {
            _HEADER_NAMES[tag]: _value(ds, tag, encoding)
            for tag in ds.keys() & _HEADER_NAMES.keys()
        }
    except Exception as err:  # pydicom raises many types on a malformed value
        raise DicomReadError(f"{path}: unreadable DICOM header ({_describe(err)})") from err
    file_meta = getattr(ds, "file_meta", None)
    header["TransferSyntaxUID"] = None if file_meta is None else file_meta.get("TransferSyntaxUID")
    return header


def _value(ds: Dataset, tag: BaseTag, encoding: str | list[str]) -> Any:
    element = ds.get_item(tag)
    if isinstance(element, RawDataElement):
        element = convert_raw_data_element(element, encoding=encoding, ds=ds)
    return element.value


def _decode(ds: Dataset, header: dict[str, Any], path: str | Path) -> np.ndarray:
    if not any(tag in ds for tag in _PIXEL_DATA_TAG_IDS):
        raise DicomReadError(f"{path}: no pixel data (no PixelData element)")
    try:
        native = _native_pixels(ds, header)
        return ds.pixel_array if native is None else native
    except Exception as err:  # decoders raise ValueError, RuntimeError, NotImplementedError...
        raise DicomReadError(
            f"{path}: pixel data cannot be decoded, transfer syntax {_syntax(header)} "
            f"({_describe(err)})"
        ) from err


def _native_pixels(ds: Dataset, header: dict[str, Any]) -> np.ndarray | None:
    """Uncompressed little-endian monochrome pixels read straight from the buffer.

    Bits above BitsStored are cleared (sign-extended when signed) by a shift
    left and back, as pydicom's native decoder does. None when pydicom's decoder
    must do it: another transfer syntax, colour, packed bits, or a buffer whose
    length does not match the header (pydicom then reports the problem).

    Shapes:
        -> (H, W), or (F, H, W) when NumberOfFrames > 1
    """
    bits, rows, cols = (header.get(k) for k in ("BitsAllocated", "Rows", "Columns"))
    if not (_is_native(ds, header) and bits in (8, 16, 32) and rows and cols):
        return None
    frames = int(header.get("NumberOfFrames") or 1)
    shape = (frames, rows, cols) if frames > 1 else (rows, cols)
    kind = "i" if header.get("PixelRepresentation") == 1 else "u"
    dtype, count = np.dtype(f"<{kind}{bits // 8}"), math.prod(shape)
    data = ds[_PIXEL_DATA_TAG_IDS[0]].value
    if len(data) not in (count * dtype.itemsize, count * dtype.itemsize + 1):  # + even padding
        return None
    stored = np.frombuffer(data, dtype, count).reshape(shape)
    unused = bits - header["BitsStored"]
    if unused:
        stored = stored << unused  # a writable copy
        np.right_shift(stored, unused, out=stored)
    return stored


def _is_native(ds: Dataset, header: dict[str, Any]) -> bool:
    return (
        header.get("TransferSyntaxUID") in _NATIVE_SYNTAXES
        and _PIXEL_DATA_TAG_IDS[0] in ds
        and header.get("PhotometricInterpretation") in _NATIVE_PHOTOMETRIC
        and (header.get("SamplesPerPixel") or 1) == 1
        and 1 <= (header.get("BitsStored") or 0) <= (header.get("BitsAllocated") or 0)
    )


def _syntax(header: dict[str, Any]) -> str:
    uid = header.get("TransferSyntaxUID")
    return f"{uid.name} ({uid})" if uid else "unknown"


def _describe(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


# ------------------------------------------------------------------ pixel values


def _is_gray(header: dict[str, Any]) -> bool:
    return int(header.get("SamplesPerPixel") or 1) == 1 and not _is_palette(header)


def _is_palette(header: dict[str, Any]) -> bool:
    return header.get("PhotometricInterpretation") == "PALETTE COLOR"


def _physical(raw: np.ndarray, ds: Dataset, header: dict[str, Any]) -> np.ndarray:
    """Modality-LUT output for grayscale, BT.601 luminance for colour.

    Shapes:
        raw: (H, W), (F, H, W), (H, W, 3) or (F, H, W, 3) -> (H, W) or (F, H, W)
    """
    if _is_palette(header):
        raw = apply_color_lut(raw, ds)
    if not _is_gray(header):  # pydicom has already converted YBR to RGB
        return (raw.astype(np.float32) @ _LUMA_WEIGHTS).astype(np.float32)
    return np.asarray(_modality(raw, ds, header), dtype=np.float32)


def _modality(values: np.ndarray, ds: Dataset, header: dict[str, Any]) -> np.ndarray:
    """The modality LUT (pydicom's table lookup) or rescale, as ``apply_modality_lut``.

    The rescale is ``values * slope + intercept`` in float64 like pydicom's,
    except in float32 when every result is an integer below 2**24, where both
    are exact and therefore equal.
    """
    if header.get("ModalityLUTSequence"):
        return apply_modality_lut(values, ds)
    slope, intercept = header.get("RescaleSlope"), header.get("RescaleIntercept")
    if slope is None or intercept is None or slope == "" or intercept == "":
        return values
    slope, intercept = float(slope), float(intercept)
    if _float32_exact(values, slope, intercept):
        return values.astype(np.float32) + np.float32(intercept)
    return values.astype(np.float64) * slope + intercept


def _float32_exact(values: np.ndarray, slope: float, intercept: float) -> bool:
    small_ints = values.dtype.kind in "ui" and values.dtype.itemsize <= 2  # |x| <= 2**16
    return (
        small_ints
        and slope == 1.0
        and intercept.is_integer()
        and abs(intercept) + (1 << 16) <= _FLOAT32_EXACT
    )


def _stored_range(header: dict[str, Any]) -> tuple[int, int]:
    bits = int(header.get("BitsStored") or header.get("BitsAllocated") or 16)
    if int(header.get("PixelRepresentation") or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _inversion_sum(ds: Dataset, header: dict[str, Any]) -> float:
    """lo + hi of the modality-LUT output range: ``lo + hi - x`` inverts within it.

    Taken from the header's bit depth rather than the image, so one scanner's
    files invert identically whatever each image contains.
    """
    ends = np.asarray(_modality(np.array(_stored_range(header)), ds, header), dtype=np.float64)
    return float(ends.min() + ends.max())


def _flip_window(window: tuple[float, float] | None, flip: float) -> tuple[float, float] | None:
    return None if window is None else (flip - window[0], window[1])


def _flip_lut(lut: VoiLut | None, flip: float) -> VoiLut | None:
    """The LUT over inverted inputs, with inverted output: 1 - T(flip - x')."""
    if lut is None:
        return None
    first = flip - (lut.first + len(lut.table) - 1)
    return VoiLut(first=first, table=(1.0 - lut.table[::-1]).astype(np.float32))


def _reduce_frames(pixels: np.ndarray, policy: str) -> np.ndarray:
    """Shapes: (H, W) or (F, H, W) -> (H, W), or (F, H, W) for "all"."""
    frames = pixels if pixels.ndim == 3 else pixels[None]  # (F, H, W)
    if policy == "all":
        return np.ascontiguousarray(frames, dtype=np.float32)
    if policy == "mean":
        return frames.mean(axis=0, dtype=np.float64).astype(np.float32)
    if policy == "max":
        return frames.max(axis=0)
    return np.ascontiguousarray(frames[0 if policy == "first" else len(frames) // 2])


# ------------------------------------------------------------------ header values


def _header_window(header: dict[str, Any]) -> tuple[float, float] | None:
    center = _first_number(header.get("WindowCenter"))
    width = _first_number(header.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    return center, width


def _first_number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if len(value) else None
    return None if value is None else float(value)


def _header_lut(ds: Dataset, header: dict[str, Any]) -> VoiLut:
    """The first VOI LUT of the header, looked up by pydicom over its whole input range."""
    n, first, _bits = (int(v) for v in header["VOILUTSequence"][0].LUTDescriptor)
    n = n or 65536  # a descriptor count of 0 means 2**16 entries
    if int(header.get("PixelRepresentation") or 0) == 1 and first >= 1 << 15:
        first -= 1 << 16  # the first mapped value is signed for signed pixels
    table = np.asarray(apply_voi(np.arange(first, first + n), ds, index=0), dtype=np.float64)
    span = table.max() - table.min()
    # Scale by the table's own range: many files declare more output bits than they use.
    unit = (table - table.min()) / span if span > 0 else np.zeros_like(table)
    return VoiLut(first=float(first), table=unit.astype(np.float32))


def _spacing(header: dict[str, Any]) -> tuple[float, float] | None:
    for name in ("PixelSpacing", "ImagerPixelSpacing"):
        value = header.get(name)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    return None


def _meta(header: dict[str, Any]) -> dict[str, Any]:
    return {name: _plain(header.get(name)) for name in META_FIELDS}


def _plain(value: Any) -> Any:
    """A header value as a plain Python int/str; empty -> None."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return int(value)
    return str(value)
