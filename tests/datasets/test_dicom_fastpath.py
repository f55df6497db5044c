"""DicomReader's own decode of uncompressed little-endian files against pydicom.

The reader reads native monochrome pixel data straight from the buffer and applies
the rescale itself (in float32 where that is exact). The reference here is the
plain pydicom route: ``pixel_array``, ``apply_modality_lut``, float32, then the
MONOCHROME1 inversion within the header's output range. They must agree bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

import clinfuse  # noqa: F401  (compat shim first)
from clinfuse.datasets.dicom import DicomReader, DicomReadError, apply_window

pytestmark = pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")


def _reference(path: str | Path) -> np.ndarray:
    """Physical pixels the straightforward way. Shapes: -> (F, H, W)"""
    ds = pydicom.dcmread(path)
    pixels = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        bits = ds.BitsStored
        lo, hi = (
            (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
            if ds.PixelRepresentation
            else (0, (1 << bits) - 1)
        )
        ends = np.asarray(apply_modality_lut(np.array([lo, hi]), ds), dtype=np.float64)
        pixels = float(ends.min() + ends.max()) - pixels
    return pixels.reshape(-1, ds.Rows, ds.Columns)


def _read(path: str | Path) -> np.ndarray:
    return DicomReader(window=None, frame_policy="all").read(path).pixels


def _testdata(name: str) -> str:
    path = pydicom.data.get_testdata_file(name, download=False)
    assert path is not None, f"{name} not shipped with pydicom / pydicom-data"
    return str(path)


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # signed 16-bit, rescale 1 / -1024 (the float32 route)
        "MR_small.dcm",  # signed 16-bit, no rescale
        "MR_small_implicit.dcm",  # implicit VR little endian
        "RG1_UNCI.dcm",  # MONOCHROME1 CR, 15 of 16 bits stored
        "emri_small.dcm",  # 10 frames, 12 of 16 bits
        "mlut_18.dcm",  # signed 12 of 16 bits with set high bits, modality LUT sequence
        "MR2_UNCI.dcm",  # rescale 3.774114 / 0.000061 (the float64 route)
        "693_UNCI.dcm",  # signed 14 of 16 bits, rescale 1 / -1024
        "vlut_04.dcm",  # 8-bit
        "rtdose.dcm",  # 32-bit, 15 frames, implicit VR
        "MR-SIEMENS-DICOM-WithOverlays.dcm",  # 12 of 16 bits
    ],
)
def test_native_files_equal_the_pydicom_route(name):
    np.testing.assert_array_equal(_read(_testdata(name)), _reference(_testdata(name)), strict=True)


def _write(path: Path, stored: np.ndarray, **elements) -> Path:
    """A minimal secondary-capture file holding ``stored`` (F, H, W) as native pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = elements.pop("syntax", ExplicitVRLittleEndian)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    frames, ds.Rows, ds.Columns = stored.shape
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8 * stored.dtype.itemsize
    ds.PixelRepresentation = int(stored.dtype.kind == "i")
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _random(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    info = np.iinfo(dtype)
    rng = np.random.default_rng(5)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


@pytest.mark.parametrize(
    ("dtype", "shape", "elements"),
    [
        ("uint8", (1, 7, 9), {}),  # 63 bytes: the file carries one padding byte
        ("int16", (3, 8, 8), {"syntax": ImplicitVRLittleEndian}),
        ("uint16", (1, 8, 8), {"RescaleSlope": 1, "RescaleIntercept": -32768}),
        ("int16", (1, 8, 8), {"RescaleSlope": 0.5, "RescaleIntercept": 0.25}),
        ("uint16", (1, 8, 8), {"BitsStored": 10}),  # garbage above bit 10 is cleared
        ("int16", (1, 8, 8), {"BitsStored": 12, "RescaleSlope": 1, "RescaleIntercept": 7}),
        ("uint32", (2, 4, 4), {"RescaleSlope": 2, "RescaleIntercept": -1}),
        (
            "int16",
            (1, 8, 8),
            {
                "PhotometricInterpretation": "MONOCHROME1",
                "RescaleSlope": 1,
                "RescaleIntercept": -1024,
            },
        ),
    ],
)
def test_written_files_equal_the_pydicom_route(tmp_path, dtype, shape, elements):
    path = _write(tmp_path / "film.dcm", _random(dtype, shape), **elements)
    np.testing.assert_array_equal(_read(path), _reference(path), strict=True)


def test_large_intercept_keeps_every_unit(tmp_path):
    """Stored 0..63 plus 2**24 + 1: float32 sums would round odd results to even."""
    stored = np.arange(64, dtype=np.uint16).reshape(1, 8, 8)
    path = _write(tmp_path / "f.dcm", stored, RescaleSlope=1, RescaleIntercept=2**24 + 1)
    pixels = _read(path)
    # float32 spacing is 2 above 2**24: the reader rounds once, from the exact sum.
    np.testing.assert_array_equal(pixels, (stored + 2.0**24 + 1).astype(np.float32))


def test_short_pixel_data_names_the_file(tmp_path):
    path = _write(tmp_path / "short.dcm", _random("uint16", (1, 8, 8)))
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:64]  # half the frame
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomReadError, match=r"short\.dcm: pixel data cannot be decoded"):
        DicomReader().read(path)


def test_malformed_header_value_names_the_file():
    """badVR.dcm: NumberOfFrames '1A' is not an integer."""
    with pytest.raises(DicomReadError, match=r"badVR\.dcm"):
        DicomReader().read(_testdata("badVR.dcm"))


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("dtype", ["float32", "int16", "float64"])
def test_apply_window_equals_the_float64_formulas(function, dtype):
    """The window math runs in place on one float64 array: same values as the formulas."""
    x = np.linspace(-1500.0, 1500.0, 3001).astype(dtype)
    center, width = 40.5, 401.0
    f = x.astype(np.float64)
    expected = {
        "LINEAR": (f - (center - 0.5)) / (width - 1.0) + 0.5,
        "LINEAR_EXACT": (f - center) / width + 0.5,
        "SIGMOID": 1.0 / (1.0 + np.exp(-4.0 * (f - center) / width)),
    }[function]
    out = apply_window(x, center, width, function=function)
    np.testing.assert_array_equal(out, np.clip(expected, 0.0, 1.0).astype(np.float32), strict=True)
    if function != "SIGMOID":  # the ramp and both clips are hit
        assert out.min() == 0.0 and out.max() == 1.0 and 0.0 < np.mean(out == 0.0) < 0.5
