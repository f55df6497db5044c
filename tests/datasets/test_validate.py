"""``clinfuse validate`` on small hand-made cohorts (real Parquet, real DICOM)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from clinfuse.cli import main as cli_main
from clinfuse.datasets.schema import TIME
from clinfuse.datasets.validate import Problem, validate_cohort

T0 = datetime(2020, 1, 1)
PREDICTION = datetime(2020, 1, 2)
SIDS = [1, 2, 3, 4, 5, 6]


def _write_dicom(path: Path, seed: int, syntax=ExplicitVRLittleEndian, pixels: bytes | None = None):
    """A 32x32 16-bit MONOCHROME2 digital X-ray written by pydicom."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, ds.Rows, ds.Columns = "DX", 32, 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    rng = np.random.default_rng(seed)
    ds.PixelData = pixels or rng.integers(0, 4096, (32, 32), dtype=np.uint16).tobytes()
    if pixels is not None:
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _frames() -> dict[str, pl.DataFrame]:
    """A valid six-subject cohort: every table of the contract, right dtypes."""
    n = len(SIDS)
    event_times = [T0 + timedelta(hours=h) for h in (0, 6, 12)]
    events = pl.DataFrame(
        {
            "subject_id": [s for s in SIDS for _ in event_times],
            "time": event_times * n,
            "code": ["HR", "LACTATE", "HR"] * n,
            "numeric_value": [80.0 + s if i != 1 else 1.5 for s in SIDS for i in range(3)],
            "unit": ["bpm", "mmol/L", "bpm"] * n,
        },
        schema={
            "subject_id": pl.Int64,
            "time": TIME,
            "code": pl.String,
            "numeric_value": pl.Float32,
            "unit": pl.String,
        },  # fmt: skip
    )
    return {
        "events": events,
        "labels": pl.DataFrame(
            {
                "subject_id": SIDS,
                "prediction_time": [PREDICTION] * n,
                "boolean_value": [s % 2 == 0 for s in SIDS],
            },  # fmt: skip
            schema={"subject_id": pl.Int64, "prediction_time": TIME, "boolean_value": pl.Boolean},
        ),
        "subjects": pl.DataFrame(
            {
                "subject_id": SIDS,
                "site": ["A", "A", "A", "B", "B", "B"],
                "age": [60.0 + s for s in SIDS],
            },  # fmt: skip
            schema={"subject_id": pl.Int64, "site": pl.String, "age": pl.Float32},
        ),
        "images": pl.DataFrame(
            {
                "subject_id": SIDS,
                "time": [T0 + timedelta(hours=8)] * n,
                "path": [f"img/{s}.dcm" for s in SIDS],
                "modality": ["DX"] * n,
            },
            schema={"subject_id": pl.Int64, "time": TIME, "path": pl.String, "modality": pl.String},
        ),
        "genotypes": pl.DataFrame(
            {
                "subject_id": SIDS,
                "rs1": [0, 1, 2, 0, 1, 2],
                "rs2": [1, None, 0, 0, 2, 1],
                "rs3": [2, 2, 1, 0, 0, None],
            },  # fmt: skip
            schema={"subject_id": pl.Int64, "rs1": pl.Int8, "rs2": pl.Int8, "rs3": pl.Int8},
        ),
        "markers": pl.DataFrame(
            {"marker": ["rs1", "rs2", "rs3"], "group": ["GENE1", "GENE1", "GENE2"]}
        ),  # fmt: skip
        "subject_splits": pl.DataFrame(
            {"subject_id": SIDS, "split": ["train"] * 4 + ["tuning", "held_out"]},
            schema={"subject_id": pl.Int64, "split": pl.String},
        ),
    }


def _write(root: Path, frames: dict[str, pl.DataFrame], images: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, df in frames.items():
        df.write_parquet(root / f"{name}.parquet")
    if images:
        for s in SIDS:
            _write_dicom(root / "img" / f"{s}.dcm", seed=s)
    return root


@pytest.fixture
def valid_cohort(tmp_path: Path) -> Path:
    return _write(tmp_path / "cohort", _frames())


def _find(report: list[Problem], check: str, **where) -> list[Problem]:
    return [p for p in report if p.check == check and all(getattr(p, k) == v for k, v in where.items())]  # fmt: skip


def test_valid_cohort_has_no_problem_and_exits_0(valid_cohort: Path, capsys) -> None:
    report = validate_cohort(valid_cohort)
    assert [str(p) for p in report] == []
    assert cli_main(["validate", str(valid_cohort)]) == 0
    assert "VALID" in capsys.readouterr().out


# --------------------------------------------------------------------------- broken cohort


def _append(df: pl.DataFrame, rows: list[dict]) -> pl.DataFrame:
    return pl.concat([df, pl.DataFrame(rows, schema=df.schema)])


def _broken_events(df: pl.DataFrame) -> pl.DataFrame:
    """18 valid rows (0..17), then one planted problem per row from row 18."""
    hr = {"code": "HR", "unit": "bpm", "time": T0 + timedelta(hours=1)}
    return _append(
        df,
        [
            {**hr, "subject_id": 1, "numeric_value": float("nan")},  # 18 non-finite
            {**hr, "subject_id": 2, "numeric_value": 70.0, "time": datetime(1850, 1, 1)},  # 19
            {**hr, "subject_id": None, "numeric_value": 70.0},  # 20 null id
            {**hr, "subject_id": 99, "numeric_value": 70.0},  # 21 unknown subject
            df.row(0, named=True),  # 22 repeat of row 0
            {**hr, "subject_id": 3, "numeric_value": -5.0},  # 23 negative
            {**hr, "subject_id": 3, "numeric_value": None, "code": "NOTE", "unit": None},  # 24
        ],
    )


def _broken_frames() -> dict[str, pl.DataFrame]:
    f = _frames()
    f["events"] = _broken_events(f["events"])
    labels = f["labels"].with_columns(
        pl.when(pl.col("subject_id") == 6)
        .then(pl.lit(datetime(2019, 12, 31), dtype=TIME))  # before all of subject 6's events
        .otherwise(pl.col("prediction_time"))
        .alias("prediction_time")
    )
    f["labels"] = _append(labels, [labels.row(1, named=True)])  # row 6 repeats row 1
    subjects = _append(f["subjects"], [f["subjects"].row(2, named=True)])  # subject 3 twice
    f["subjects"] = subjects.with_columns(pl.col("age").cast(pl.String))  # wrong dtype
    paths = {2: "img/missing.dcm", 3: "img/notes.txt", 4: "img/truncated.dcm"}
    images = f["images"].filter(pl.col("subject_id") != 5).drop("modality")  # rows: 1,2,3,4,6
    f["images"] = images.with_columns(
        pl.col("subject_id").replace_strict(paths, default=pl.col("path")).alias("path")
    )
    geno = f["genotypes"].drop("rs3").with_columns(pl.Series("rs9", [0, 1, 0, 1, 0, 1], pl.Int8))
    geno = geno.with_columns(pl.when(pl.col("subject_id") == 2).then(3).otherwise(pl.col("rs1")).cast(pl.Int8).alias("rs1"))  # fmt: skip
    f["genotypes"] = _append(geno, [{"subject_id": 77, "rs1": 0, "rs2": 0, "rs9": 0}])
    f["subject_splits"] = pl.DataFrame(
        {
            "subject_id": [1, 1, 2, 3, 5, 6],
            "split": ["train", "tuning", "train", "train", "test", "held_out"],
        },  # fmt: skip
        schema={"subject_id": pl.Int32, "split": pl.String},  # Int32: castable, a warning
    )
    return f


@pytest.fixture
def broken_cohort(tmp_path: Path) -> Path:
    root = _write(tmp_path / "broken", _broken_frames())
    (root / "img" / "notes.txt").write_text("not an image\n")
    truncated = root / "img" / "truncated.dcm"
    _write_dicom(truncated, seed=4)
    truncated.write_bytes(truncated.read_bytes()[:-1000])  # cut into the 2048-byte pixel data
    return root


# (check, file, column, row, subject_id, severity): one line per planted problem.
PLANTED = [
    ("non_finite", "events.parquet", "numeric_value", 18, 1, "error"),
    ("time_range", "events.parquet", "time", 19, 2, "error"),
    ("null_id", "events.parquet", "subject_id", 20, None, "error"),
    ("unknown_subject", "events.parquet", "subject_id", 21, 99, "error"),
    ("duplicate_event", "events.parquet", "code", 22, 1, "warning"),
    ("negative_value", "events.parquet", "numeric_value", 23, 3, "warning"),
    ("code_without_values", "events.parquet", "numeric_value", 24, None, "info"),
    ("duplicate_label", "labels.parquet", "prediction_time", 1, 2, "error"),
    ("duplicate_label", "labels.parquet", "prediction_time", 6, 2, "error"),
    ("no_events_before", "labels.parquet", "prediction_time", 5, 6, "warning"),
    ("no_image", "labels.parquet", "subject_id", 4, 5, "warning"),
    ("no_split", "labels.parquet", "subject_id", 3, 4, "warning"),
    ("duplicate_subject_id", "subjects.parquet", "subject_id", 2, 3, "error"),
    ("duplicate_subject_id", "subjects.parquet", "subject_id", 6, 3, "error"),
    ("dtype", "subjects.parquet", "age", None, None, "error"),
    ("missing_column", "images.parquet", "modality", None, None, "error"),
    ("dicom", "images.parquet", "path", 1, 2, "error"),
    ("dicom", "images.parquet", "path", 2, 3, "error"),
    ("dicom", "images.parquet", "path", 3, 4, "error"),
    ("dosage", "genotypes.parquet", "rs1", 1, 2, "error"),
    ("marker_unknown", "genotypes.parquet", "rs9", None, None, "error"),
    ("unknown_subject", "genotypes.parquet", "subject_id", 6, 77, "error"),
    ("marker_unused", "markers.parquet", "marker", 2, None, "warning"),
    ("dtype", "subject_splits.parquet", "subject_id", None, None, "warning"),
    ("split_conflict", "subject_splits.parquet", "subject_id", 0, 1, "error"),
    ("unknown_split", "subject_splits.parquet", "split", 4, 5, "error"),
]


def test_broken_cohort_reports_every_planted_problem(broken_cohort: Path) -> None:
    report = validate_cohort(broken_cohort)
    missing = []
    for check, file, column, row, sid, severity in PLANTED:
        hits = _find(report, check, file=file, column=column, row=row, subject_id=sid)
        if [p.severity for p in hits] != [severity]:
            missing.append((check, file, column, row, sid, severity, [str(p) for p in hits]))
    assert missing == [], "\n".join(map(str, missing)) + "\n\nreport:\n" + report.format()
    planted = {(c, f, col, r, s) for c, f, col, r, s, _ in PLANTED}
    extra = [p for p in report if (p.check, p.file, p.column, p.row, p.subject_id) not in planted]
    assert extra == [], "unplanted problems:\n" + "\n".join(map(str, extra))


def test_broken_cohort_messages_say_what_is_wrong(broken_cohort: Path) -> None:
    report = validate_cohort(broken_cohort)
    (age,) = _find(report, "dtype", column="age")
    assert "expected Float32" in age.message and "found String" in age.message
    (early,) = _find(report, "time_range")
    assert "1850-01-01" in early.message
    dicom = {p.row: p.message for p in _find(report, "dicom")}
    assert "not found" in dicom[1] and "img/missing.dcm" in dicom[1]
    assert "not a DICOM file" in dicom[2] and "notes.txt" in dicom[2]
    assert "Explicit VR Little Endian" in dicom[3] and "truncated.dcm" in dicom[3]
    (split,) = _find(report, "unknown_split")
    assert "'test'" in split.message
    (conflict,) = _find(report, "split_conflict")
    assert "train, tuning" in conflict.message


def test_broken_cohort_exits_1_and_writes_json(broken_cohort: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.json"
    assert cli_main(["validate", str(broken_cohort), "--json", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "row 18 (0-based)" in printed and "INVALID" in printed
    data = json.loads(out.read_text())
    report = validate_cohort(broken_cohort)
    assert data["valid"] is False
    assert data["counts"]["error"] == len(report.errors) > 0
    assert [Problem(**p) for p in data["problems"]] == list(report)


def test_warnings_alone_exit_0(valid_cohort: Path) -> None:
    frames = _frames()
    frames["events"] = _append(frames["events"], [frames["events"].row(0, named=True)])
    _write(valid_cohort, {"events": frames["events"]}, images=False)
    report = validate_cohort(valid_cohort)
    assert [p.check for p in report] == ["duplicate_event"] and report.ok
    assert cli_main(["validate", str(valid_cohort)]) == 0


# --------------------------------------------------------------------------- unreadable files


def test_truncated_parquet_is_named_and_other_files_still_checked(valid_cohort: Path) -> None:
    events = valid_cohort / "events.parquet"
    events.write_bytes(events.read_bytes()[: events.stat().st_size // 2])
    labels = _frames()["labels"]
    _append(labels, [labels.row(0, named=True)]).write_parquet(valid_cohort / "labels.parquet")
    report = validate_cohort(valid_cohort)
    (bad,) = _find(report, "unreadable")
    assert bad.file == "events.parquet" and bad.severity == "error"
    assert {p.row for p in _find(report, "duplicate_label")} == {0, 6}
    assert cli_main(["validate", str(valid_cohort)]) == 1


def test_missing_mandatory_file_and_empty_labels(valid_cohort: Path) -> None:
    (valid_cohort / "subjects.parquet").unlink()
    _frames()["labels"].clear().write_parquet(valid_cohort / "labels.parquet")
    report = validate_cohort(valid_cohort)
    (missing,) = _find(report, "missing_file")
    assert (missing.file, missing.severity) == ("subjects.parquet", "error")
    (empty,) = _find(report, "empty")
    assert (empty.file, empty.severity) == ("labels.parquet", "error")


def test_castable_dtypes_are_warnings_not_errors(valid_cohort: Path) -> None:
    events = _frames()["events"].with_columns(
        pl.col("subject_id").cast(pl.Int32), pl.col("time").cast(pl.Datetime("ms"))
    )
    events.write_parquet(valid_cohort / "events.parquet")
    report = validate_cohort(valid_cohort)
    assert report.ok
    assert {(p.column, p.severity) for p in report} == {("subject_id", "warning"), ("time", "warning")}  # fmt: skip


def test_multi_file_events_name_the_part_and_its_own_row(valid_cohort: Path) -> None:
    events = _frames()["events"]
    (valid_cohort / "events.parquet").unlink()
    (valid_cohort / "events").mkdir()
    events.head(10).write_parquet(valid_cohort / "events" / "part-0.parquet")
    bad = events.tail(8).with_columns(
        pl.when(pl.int_range(pl.len()) == 3)
        .then(float("inf"))
        .otherwise(pl.col("numeric_value"))
        .cast(pl.Float32)
        .alias("numeric_value")  # fmt: skip
    )
    bad.write_parquet(valid_cohort / "events" / "part-1.parquet")
    (hit,) = validate_cohort(valid_cohort)
    assert (hit.check, hit.file, hit.row) == ("non_finite", "events/part-1.parquet", 3)


def test_examples_are_capped_with_a_count(valid_cohort: Path) -> None:
    events = _frames()["events"].with_columns(pl.lit(float("nan"), pl.Float32).alias("numeric_value"))  # fmt: skip
    events.write_parquet(valid_cohort / "events.parquet")
    hits = _find(validate_cohort(valid_cohort), "non_finite")
    assert [p.row for p in hits] == [0, 1, 2, 3, 4, None]
    assert "13 more" in hits[-1].message and "18 in all" in hits[-1].message


# --------------------------------------------------------------------------- DICOM


def test_no_pixels_skips_decoding_but_still_reads_headers(valid_cohort: Path) -> None:
    truncated = valid_cohort / "img" / "2.dcm"
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    (valid_cohort / "img" / "3.dcm").write_bytes(b"\0" * 200)
    with_pixels = {p.row for p in _find(validate_cohort(valid_cohort), "dicom")}
    header_only = {p.row for p in _find(validate_cohort(valid_cohort, pixels=False), "dicom")}
    assert with_pixels == {1, 2} and header_only == {2}
    assert cli_main(["validate", str(valid_cohort), "--no-pixels"]) == 1


def test_undecodable_compressed_pixels_name_the_transfer_syntax(valid_cohort: Path) -> None:
    garbage = encapsulate([b"\x00\x01" * 64])
    _write_dicom(valid_cohort / "img" / "4.dcm", seed=4, syntax=JPEG2000Lossless, pixels=garbage)
    (hit,) = _find(validate_cohort(valid_cohort), "dicom")
    assert hit.row == 3 and hit.subject_id == 4
    assert "JPEG 2000" in hit.message and "4.dcm" in hit.message


# --------------------------------------------------------------------------- scale


@pytest.mark.slow
def test_million_event_rows_validate_in_seconds(valid_cohort: Path) -> None:
    n = 1_000_000
    rng = np.random.default_rng(0)
    events = pl.DataFrame(
        {
            "subject_id": rng.integers(1, 7, n),
            "time": T0 + pl.Series(rng.integers(0, 86_400_000_000, n)).cast(pl.Duration("us")),
            "code": rng.choice(["HR", "SBP", "LACTATE", "SPO2"], n),
            "numeric_value": rng.normal(80, 10, n).astype(np.float32),
        }
    ).with_columns(pl.col("time").cast(TIME))
    events.write_parquet(valid_cohort / "events.parquet")
    start = time.perf_counter()
    report = validate_cohort(valid_cohort, pixels=False)
    elapsed = time.perf_counter() - start
    assert report.ok, report.format()
    assert elapsed < 10.0  # measured 1.1 s on a shared 2-core box; slack for loaded CI
