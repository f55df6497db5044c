"""Broken DICOM files: ``validate`` names the file and its images.parquet row, the
image loader masks the sample with a warning naming the file, nothing raises."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinfuse.datasets.images import ImageLoader
from clinfuse.datasets.validate import dicom_problem, validate_cohort

from .conftest import CASES, latest_film, truncate_file

_FUZZ = settings(
    max_examples=20, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip


@pytest.fixture(scope="module")
def film(trained, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, str]:
    """The bytes of one real simulated film and its path relative to the cohort."""
    _, _, path = latest_film(trained.cohort)
    return path.read_bytes(), path.relative_to(trained.cohort).as_posix()


def _load(path: Path) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = ImageLoader(32).load(path)
    return image, [str(w.message) for w in caught]


@_FUZZ
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_any_truncation_is_named_and_never_raises(film, tmp_path: Path, fraction: float) -> None:
    data, _ = film
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "film.dcm"
    path.write_bytes(data[: int(len(data) * fraction)])
    problem = dicom_problem(path)
    assert problem is not None and str(path) in problem
    assert dicom_problem(path, pixels=False) is None or str(path) in dicom_problem(path, False)
    image, messages = _load(path)
    assert image is None
    assert any(str(path) in m and "image_present=False" in m for m in messages), messages


@_FUZZ
@given(cut=st.integers(1, 2000))
def test_validate_names_the_row_of_a_truncated_film(trained, tmp_path: Path, cut: int) -> None:
    cohort = Path(shutil.copytree(trained.cohort, Path(tempfile.mkdtemp(dir=tmp_path)) / "c"))
    sid, row, path = latest_film(cohort)
    truncate_file(path, max(0, path.stat().st_size - cut))
    (hit,) = [p for p in validate_cohort(cohort) if p.check == "dicom"]
    assert (hit.severity, hit.file, hit.row, hit.subject_id) == (
        "error",
        "images.parquet",
        row,
        sid,
    )
    assert str(path) in hit.message


def test_intact_film_reads(film, tmp_path: Path) -> None:
    """The fuzzed bytes are a real, decodable film (the failures above are the cuts)."""
    path = tmp_path / "film.dcm"
    path.write_bytes(film[0])
    assert dicom_problem(path) is None
    image, _ = _load(path)
    assert image is not None and tuple(image.shape) == (1, 32, 32)


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("dicom_truncated", "less than expected"),
        ("dicom_corrupt", "PixelData"),
        ("dicom_no_pixels", "no PixelData element"),
        ("dicom_wrong_photometric", "PhotometricInterpretation RGB needs SamplesPerPixel 3"),
        ("image_missing", "file not found"),
    ],
)
def test_validate_dicom_message_says_what_is_wrong(cohort_copy: Path, case: str, words: str):
    planted = CASES[case](cohort_copy)
    (hit,) = [p for p in validate_cohort(cohort_copy) if p.check == "dicom"]
    assert (hit.file, hit.row, hit.subject_id) == (
        planted.file, planted.rows[0], planted.subject_id,
    )  # fmt: skip
    assert words in hit.message and str(planted.extra["path"]) in hit.message


@pytest.mark.parametrize("case", ["dicom_truncated", "dicom_corrupt", "dicom_no_pixels"])
def test_loader_masks_broken_film_with_a_warning(cohort_copy: Path, case: str) -> None:
    planted = CASES[case](cohort_copy)
    image, messages = _load(planted.extra["path"])
    assert image is None
    assert any(str(planted.extra["path"]) in m for m in messages), messages
