"""DicomReader on real files shipped with pydicom and pydicom-data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_voi_lut
from pydicom.uid import MPEG4HP41

import clinfuse  # noqa: F401  (compat shim first)
from clinfuse.datasets.dicom import (
    META_FIELDS,
    WINDOW_PRESETS,
    DicomReader,
    DicomReadError,
    apply_window,
    file_sha256,
)

pytestmark = pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")


def _file(name: str) -> str:
    path = pydicom.data.get_testdata_file(name, download=False)
    assert path is not None, f"{name} not shipped with pydicom / pydicom-data"
    return str(path)


def _raw(name: str) -> np.ndarray:
    return pydicom.dcmread(_file(name)).pixel_array.astype(np.float64)


def _region(image: np.ndarray, rows: tuple[float, float], cols: tuple[float, float]):
    h, w = image.shape
    return image[int(rows[0] * h) : int(rows[1] * h), int(cols[0] * w) : int(cols[1] * w)]


# CT_small.dcm is an axial slice through a vertebra with lung bases in the top corners
# (looked at as a PNG): (row, col) slices of the 128 x 128 image.
_CT_LUNG = (slice(0, 40), slice(0, 30))
_CT_SOFT = (slice(80, 112), slice(0, 128))  # paraspinal muscle and fat
_CT_BONE = (slice(60, 70), slice(54, 70))  # posterior arch of the vertebra


# ------------------------------------------------------------------ MONOCHROME1


def test_monochrome1_chest_film_is_inverted_so_bone_is_bright():
    image = DicomReader(window=None).read(_file("RG1_UNCI.dcm"))
    unit = image.to_unit()
    # Frontal chest film (viewed as a PNG): spine/mediastinum in the central strip,
    # aerated lung fields lateral to it, all in the upper half of the film.
    spine = _region(unit, (0.25, 0.45), (0.47, 0.53)).mean()
    lungs = [_region(unit, (0.25, 0.45), cols).mean() for cols in ((0.22, 0.32), (0.66, 0.76))]
    assert all(spine > lung + 0.3 for lung in lungs), (spine, lungs)
    # The stored values are the other way round, and inversion is exact within 15 bits.
    raw = _raw("RG1_UNCI.dcm")
    assert (
        _region(raw, (0.25, 0.45), (0.47, 0.53)).mean()
        < _region(raw, (0.25, 0.45), (0.22, 0.32)).mean()
    )
    np.testing.assert_array_equal(image.pixels, (2**15 - 1) - raw)


def test_monochrome1_header_window_is_inverted_with_the_pixels():
    auto = DicomReader().read(_file("RG1_UNCI.dcm"))
    assert auto.window == (2**15 - 1 - 15000, 30000)
    # Windowing the inverted image equals inverting the windowed raw image, up to the
    # 1 / (w - 1) offset of the DICOM LINEAR formula.
    windowed_raw = apply_window(_raw("RG1_UNCI.dcm"), 15000, 30000)
    np.testing.assert_allclose(auto.to_unit(), 1.0 - windowed_raw, atol=1.0 / 29999 + 1e-6)


# ------------------------------------------------------------------ rescale and windows


def test_ct_rescale_gives_hounsfield_units():
    image = DicomReader(window=None).read(_file("CT_small.dcm"))
    np.testing.assert_array_equal(image.pixels, _raw("CT_small.dcm") * 1.0 - 1024.0)
    assert -900 < image.pixels[_CT_LUNG].mean() < -700  # aerated lung
    assert 0 < image.pixels[_CT_SOFT].mean() < 100  # soft tissue
    assert image.pixels[_CT_BONE].mean() > 300  # bone
    assert image.spacing == pytest.approx((0.661468, 0.661468))
    assert image.window is None


@pytest.mark.parametrize("preset", ["mediastinum", "abdomen", "brain"])
def test_window_presets_map_lung_air_to_zero_and_bone_to_one(preset):
    center, width = WINDOW_PRESETS[preset]
    image = DicomReader(window=preset).read(_file("CT_small.dcm"))
    unit, hu = image.to_unit(), image.pixels
    assert image.window == (center, width)
    assert np.median(unit[_CT_LUNG]) == 0.0
    assert unit[_CT_BONE].max() == 1.0
    # Outside the window the map saturates exactly; inside it is the linear ramp.
    assert np.all(unit[hu <= center - width / 2] == 0.0)
    assert np.all(unit[hu >= center + width / 2] == 1.0)
    inside = (hu > center - width / 2) & (hu < center + width / 2)
    ramp = (hu[inside] - (center - 0.5)) / (width - 1) + 0.5
    np.testing.assert_allclose(unit[inside], np.clip(ramp, 0, 1), atol=1e-6)


def test_bone_window_keeps_bone_detail_unsaturated():
    """Bone window (400, 1800) reaches 1 only at 1300 HU: this vertebra (max 1167) spans it."""
    unit = DicomReader(window="bone").read(_file("CT_small.dcm")).to_unit()
    assert np.median(unit[_CT_LUNG]) == 0.0
    bone = unit[_CT_BONE]
    assert bone.max() < 1.0 and bone.max() - bone.min() > 0.4


def test_lung_window_orders_air_soft_tissue_bone():
    unit = DicomReader(window="lung").read(_file("CT_small.dcm")).to_unit()
    lung, soft, bone = (np.median(unit[r]) for r in (_CT_LUNG, _CT_SOFT, _CT_BONE))
    # Lung window spans -1350..150 HU: lung (~-800) lands near 0.37, muscle near 0.9.
    assert lung < 0.5 < soft < 1.0 and bone == 1.0


def test_explicit_window_and_no_window():
    path = _file("CT_small.dcm")
    image = DicomReader(window=(0.0, 200.0)).read(path)
    assert image.window == (0.0, 200.0)
    assert image.to_unit()[_CT_SOFT].mean() == pytest.approx(
        np.clip((image.pixels[_CT_SOFT] + 0.5) / 199 + 0.5, 0, 1).mean(), abs=1e-5
    )
    unit = DicomReader(window=None).read(path).to_unit()
    lo, hi = np.percentile(image.pixels, [0.5, 99.5])
    assert unit.dtype == np.float32 and unit.min() == 0.0 and unit.max() == 1.0
    assert np.mean(unit == 0.0) == pytest.approx(0.005, abs=2 / unit.size + 1e-3)
    np.testing.assert_allclose(unit[image.pixels == 0], -lo / (hi - lo), rtol=1e-5)


def test_header_window_matches_pydicom_voi():
    """MR_small carries WindowCenter 600 / WindowWidth 1600, signed 16-bit."""
    image = DicomReader().read(_file("MR_small.dcm"))
    assert image.window == (600.0, 1600.0)
    ds = pydicom.dcmread(_file("MR_small.dcm"))
    # pydicom windows into the signed 16-bit output range [-32768, 32767].
    expected = (apply_voi_lut(ds.pixel_array, ds) + 32768.0) / 65535.0
    np.testing.assert_allclose(image.to_unit(), expected, atol=1e-5)


def test_voi_lut_sequence_matches_pydicom_lookup():
    ds = pydicom.dcmread(_file("vlut_04.dcm"))
    image = DicomReader().read(_file("vlut_04.dcm"))
    assert image.voi_lut is not None
    table = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
    expected = (apply_voi_lut(ds.pixel_array, ds) - table.min()) / (table.max() - table.min())
    np.testing.assert_allclose(image.to_unit(), expected, atol=1e-6)
    assert DicomReader(window=None).read(_file("vlut_04.dcm")).voi_lut is None


# ------------------------------------------------------------------ frames, colour


def test_multiframe_frame_policies():
    path, raw = _file("emri_small.dcm"), _raw("emri_small.dcm")  # (10, 64, 64)
    assert DicomReader().read_meta(path)["NumberOfFrames"] == 10

    def read(policy: str) -> np.ndarray:
        return DicomReader(window=None, frame_policy=policy).read(path).pixels

    assert read("all").shape == (10, 64, 64)
    np.testing.assert_array_equal(read("all"), raw)
    np.testing.assert_array_equal(read("first"), raw[0])
    np.testing.assert_array_equal(read("middle"), raw[5])
    np.testing.assert_array_equal(read("max"), raw.max(axis=0))
    np.testing.assert_allclose(read("mean"), raw.mean(axis=0), rtol=1e-6)
    single = DicomReader(frame_policy="all").read(_file("MR_small.dcm")).pixels
    assert single.shape == (1, 64, 64)


def test_rgb_becomes_bt601_luminance():
    image = DicomReader(window=None).read(_file("SC_rgb.dcm"))
    expected = _raw("SC_rgb.dcm") @ np.array([0.299, 0.587, 0.114])
    assert image.pixels.shape == (100, 100)
    np.testing.assert_allclose(image.pixels, expected, atol=1e-3)


def test_ybr_luminance_equals_the_stored_luma_channel():
    """DICOM YBR_FULL stores BT.601 Y: our luminance of the decoded RGB recovers it."""
    path = _file("SC_ybr_full_uncompressed.dcm")
    luma = pydicom.pixels.pixel_array(path, as_rgb=False)[..., 0].astype(np.float64)
    rgb = pydicom.pixels.pixel_array(path)
    in_gamut = np.all((rgb > 0) & (rgb < 255), axis=-1)  # no channel clipped by YBR->RGB
    assert in_gamut.sum() > 1000
    pixels = DicomReader(window=None).read(path).pixels
    # Each RGB channel is rounded to uint8 (<= 0.5) and the weights sum to 1.
    np.testing.assert_allclose(pixels[in_gamut], luma[in_gamut], atol=0.5 + 1e-3)


def test_palette_color_becomes_luminance_of_the_looked_up_rgb():
    """examples_palette.dcm: 8-bit indices into three 256-entry 16-bit OW tables."""
    ds = pydicom.dcmread(_file("examples_palette.dcm"))
    index = ds.pixel_array.astype(np.int64)  # first mapped value is 0 in all descriptors
    rgb = np.stack(
        [
            np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, dtype="<u2")[index]
            for c in ("Red", "Green", "Blue")
        ],
        axis=-1,
    ).astype(np.float64)
    pixels = DicomReader(window=None).read(_file("examples_palette.dcm")).pixels
    assert pixels.shape == index.shape
    # float32 products of values below 2**16: relative error ~1e-7.
    np.testing.assert_allclose(pixels, rgb @ [0.299, 0.587, 0.114], rtol=1e-6, atol=1e-2)


def test_modality_lut_sequence_is_applied():
    """mlut_18.dcm: signed 12-bit pixels, a 4096-entry modality LUT starting at -2048."""
    ds = pydicom.dcmread(_file("mlut_18.dcm"))
    table = np.asarray(ds.ModalityLUTSequence[0].LUTData, dtype=np.float64)
    expected = table[ds.pixel_array.astype(np.int64) + 2048]
    pixels = DicomReader(window=None).read(_file("mlut_18.dcm")).pixels
    np.testing.assert_array_equal(pixels, expected)


# ------------------------------------------------------------------ compressed syntaxes


@pytest.mark.parametrize(
    ("compressed", "twin"),
    [
        ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),  # JPEG 2000 lossless
        ("RG1_J2KI.dcm", "RG1_UNCI.dcm"),  # UNCI is the decoded lossy J2KI
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),  # JPEG lossless, RGB
    ],
)
def test_lossless_decoding_equals_the_uncompressed_twin(compressed, twin):
    reader = DicomReader(frame_policy="all")
    a, b = reader.read(_file(compressed)), reader.read(_file(twin))
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.meta["TransferSyntaxUID"] != b.meta["TransferSyntaxUID"]


def test_lossy_jpeg2000_is_close_to_the_original():
    lossy = DicomReader(window=None).read(_file("RG1_J2KI.dcm")).pixels
    original = DicomReader(window=None).read(_file("RG1_UNCR.dcm")).pixels
    span = float(original.max() - original.min())
    assert np.abs(lossy - original).mean() < 0.005 * span
    assert np.abs(lossy - original).max() < 0.05 * span


@pytest.mark.parametrize(
    "name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_jpeg_lossy_gdcm.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm"]
)
def test_lossy_rgb_jpeg_is_close_to_the_uncompressed_image(name):
    """JPEG baseline (YBR_FULL / YBR_FULL_422) copies of SC_rgb: luminance within a few levels."""
    lossy = DicomReader(window=None).read(_file(name)).pixels
    original = DicomReader(window=None).read(_file("SC_rgb.dcm")).pixels
    assert lossy.shape == original.shape == (100, 100)
    assert np.abs(lossy - original).mean() < 1.0  # of 255 levels
    assert np.abs(lossy - original).max() < 10.0


# ------------------------------------------------------------------ metadata


def test_meta_has_exactly_the_listed_fields_and_no_identifiers():
    path = _file("CT_small.dcm")
    assert "PatientName" in pydicom.dcmread(path)  # the file does carry identifiers
    meta = DicomReader().read(path).meta
    assert tuple(meta) == META_FIELDS
    assert not any("Patient" in key for key in meta)
    assert meta["Modality"] == "CT" and meta["BitsStored"] == 16
    assert meta["PhotometricInterpretation"] == "MONOCHROME2"
    assert meta["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"
    assert meta["NumberOfFrames"] is None and meta["BodyPartExamined"] is None
    assert meta["SOPInstanceUID"] == str(pydicom.dcmread(path).SOPInstanceUID)
    assert DicomReader().read_meta(path) == meta


def test_spacing_falls_back_and_rejects_zero():
    assert DicomReader().read(_file("MR_small.dcm")).spacing == (0.3125, 0.3125)
    assert DicomReader().read(_file("RG1_UNCI.dcm")).spacing is None  # PixelSpacing 0\0


def test_file_sha256_matches_hashlib():
    path = _file("MR_small.dcm")
    assert file_sha256(path) == hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------ errors


def _patient_name(path: str) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).PatientName)


def test_truncated_file_names_the_file(tmp_path):
    data = Path(_file("CT_small.dcm")).read_bytes()
    bad = tmp_path / "truncated.dcm"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DicomReadError, match="truncated.dcm") as err:
        DicomReader().read(bad)
    assert "Explicit VR Little Endian" in str(err.value)
    assert _patient_name(_file("CT_small.dcm")) not in str(err.value)


def test_non_dicom_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a DICOM file\n" * 20)
    with pytest.raises(DicomReadError, match=r"notes\.txt: not a DICOM file"):
        DicomReader().read(bad)
    with pytest.raises(DicomReadError, match=r"absent\.dcm: cannot open"):
        DicomReader().read_meta(tmp_path / "absent.dcm")


def test_missing_pixel_data_names_the_file(tmp_path):
    ds = pydicom.dcmread(_file("CT_small.dcm"))
    del ds.PixelData
    bad = tmp_path / "header_only.dcm"
    ds.save_as(bad)
    with pytest.raises(DicomReadError, match=r"header_only\.dcm: no pixel data"):
        DicomReader().read(bad)
    assert DicomReader().read_meta(bad)["Modality"] == "CT"  # the header is still fine


def test_undecodable_transfer_syntax_names_file_and_syntax(tmp_path):
    ds = pydicom.dcmread(_file("MR_small.dcm"))
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = MPEG4HP41  # no decoder installed for video
    bad = tmp_path / "video.dcm"
    ds.save_as(bad, enforce_file_format=True)
    with pytest.raises(DicomReadError) as err:
        DicomReader().read(bad)
    assert "video.dcm" in str(err.value)
    assert "MPEG-4 AVC/H.264 High Profile / Level 4.1" in str(err.value)


def test_bad_reader_arguments():
    with pytest.raises(ValueError, match="window"):
        DicomReader(window="liver")
    with pytest.raises(ValueError, match="width"):
        DicomReader(window=(40.0, 0.0))
    with pytest.raises(ValueError, match="frame_policy"):
        DicomReader(frame_policy="median")
