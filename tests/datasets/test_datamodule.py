"""Cohort directory -> batches, on a hand-made cohort with real DICOM files.

Every subject has events and an image BEFORE its prediction time and, after it,
events with the value 1000 and an image with a different pattern; none of those
may reach a batch or the fitted statistics.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import numpy as np
import polars as pl
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from clinfuse.datasets.datamodule import (
    SPEC_FILE,
    CohortDataModule,
    DataConfig,
    build_batch_tensors,
    collate,
    fit_spec,
    load_spec,
    make_loader,
)
from clinfuse.datasets.images import ImageLoader, resize_square
from clinfuse.datasets.samples import load_samples
from clinfuse.integrity.checksums import cache_failures, seal, unseal

T0 = dt.datetime(2024, 3, 1)
PT_HOURS = 48.0
LATER = 1000.0  # value of every event after prediction time
N = 12
NO_EVENTS = 11  # subject without events
NO_GENOTYPE = 10  # subject without a genotype row
HALF_CALLED = 3  # subject with a missing call for m2
CORRUPT = 5  # subject whose only earlier image is corrupt


def _at(hours: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=hours)


def _write_dicom(path: Path, pixels: np.ndarray) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _left_bright() -> np.ndarray:  # before prediction time
    img = np.full((32, 32), 100, np.uint16)
    img[:, :16] = 3000
    return img


def _top_bright() -> np.ndarray:  # after prediction time
    img = np.full((32, 32), 100, np.uint16)
    img[:16, :] = 3000
    return img


def _events(hr_shift: dict[int, float]) -> pl.DataFrame:
    rows = []
    for s in range(N):
        if s == NO_EVENTS:
            continue
        hr = 70.0 + s + hr_shift.get(s, 0.0)
        rows += [
            (s, 0.0, "ICU_ADMISSION", None),
            (s, 10.0, "VITAL//HR", hr),
            (s, 20.0, "VITAL//HR", hr + 10.0),
            (s, 20.0, "LAB//LACTATE", 1.0 + 0.1 * s),
            (s, 50.0, "VITAL//HR", LATER),
            (s, 60.0, "LAB//LACTATE", LATER),
        ]
    sid, hours, code, value = zip(*rows, strict=True)
    return pl.DataFrame(
        {"subject_id": sid, "time": [_at(h) for h in hours], "code": code, "numeric_value": value},
        schema={
            "subject_id": pl.Int64,
            "time": pl.Datetime("us"),
            "code": pl.String,
            "numeric_value": pl.Float32,
        },
    )


def make_cohort(root: Path, hr_shift: dict[int, float] | None = None) -> Path:
    """Twelve subjects, fixed splits (0-5 train, 6-8 tuning, 9-11 held_out)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dicom").mkdir(exist_ok=True)
    ids = list(range(N))
    _events(hr_shift or {}).write_parquet(root / "events.parquet")
    pl.DataFrame(
        {
            "subject_id": ids,
            "prediction_time": [_at(PT_HOURS)] * N,
            "boolean_value": [s % 3 == 0 for s in ids],
        },
        schema_overrides={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")},
    ).write_parquet(root / "labels.parquet")
    pl.DataFrame(
        {
            "subject_id": ids,
            "site": ["north" if s % 2 else "south" for s in ids[:-1]] + ["east"],
            "ancestry": ["AFR" if s % 4 == 0 else "EUR" for s in ids],
        },
        schema_overrides={"subject_id": pl.Int64},
    ).write_parquet(root / "subjects.parquet")
    split = ["train"] * 6 + ["tuning"] * 3 + ["held_out"] * 3
    pl.DataFrame(
        {"subject_id": ids, "split": split}, schema_overrides={"subject_id": pl.Int64}
    ).write_parquet(root / "subject_splits.parquet")
    _write_images(root)
    _write_genotypes(root)
    return root


def _write_images(root: Path) -> None:
    rows = []
    for s in range(N):
        before, after = f"dicom/{s}_before.dcm", f"dicom/{s}_after.dcm"
        if s == CORRUPT:
            (root / before).write_bytes(b"not a dicom file at all" * 10)
        else:
            _write_dicom(root / before, _left_bright())
        _write_dicom(root / after, _top_bright())
        rows += [(s, _at(6.0), before, "DX"), (s, _at(60.0), after, "DX")]
    sid, time, path, modality = zip(*rows, strict=True)
    pl.DataFrame(
        {"subject_id": sid, "time": time, "path": path, "modality": modality},
        schema_overrides={"subject_id": pl.Int64, "time": pl.Datetime("us")},
    ).write_parquet(root / "images.parquet")


def _write_genotypes(root: Path) -> None:
    ids = [s for s in range(N) if s != NO_GENOTYPE]
    m2 = [None if s == HALF_CALLED else float(s % 3) for s in ids]
    pl.DataFrame(
        {"subject_id": ids, "m0": [float(s % 2) for s in ids], "m1": [2.0] * len(ids), "m2": m2},
        schema={"subject_id": pl.Int64, "m0": pl.Float32, "m1": pl.Float32, "m2": pl.Float32},
    ).write_parquet(root / "genotypes.parquet")
    pl.DataFrame({"marker": ["m0", "m1", "m2"], "group": ["G1", "G1", "G2"]}).write_parquet(
        root / "markers.parquet"
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def module(cohort, tmp_path_factory) -> CohortDataModule:
    cfg = DataConfig(batch_size=4, image_size=16, max_steps=8, window_hours=72.0)
    with pytest.warns(UserWarning, match=f"{CORRUPT}_before.dcm"):
        dm = CohortDataModule(cohort, cfg, run_dir=tmp_path_factory.mktemp("run"))
        dm.setup("fit")
        _ = [dm.datasets[s][i] for s in dm.datasets for i in range(len(dm.datasets[s]))]
    return dm


def _all_batches(dm: CohortDataModule) -> list[dict]:
    return [
        *dm.train_dataloader(),
        *dm.val_dataloader(),
        *dm.test_dataloader(),
    ]


def test_batches_follow_the_batch_contract(module):
    batch = next(iter(module.train_dataloader()))
    b, spec = 4, module.spec
    t = batch["ts_values"].shape[1]
    expect = {
        "image": ((b, 1, 16, 16), torch.float32),
        "image_present": ((b,), torch.bool),
        "image_age": ((b,), torch.float32),
        "ts_values": ((b, t, 2), torch.float32),
        "ts_mask": ((b, t, 2), torch.float32),
        "ts_delta": ((b, t, 2), torch.float32),
        "ts_time": ((b, t), torch.float32),
        "ts_length": ((b,), torch.int64),
        "ts_present": ((b,), torch.bool),
        "genotype": ((b, 3), torch.float32),
        "genotype_mask": ((b, 3), torch.float32),
        "genotype_present": ((b,), torch.bool),
        "label": ((b,), torch.float32),
        "subject_id": ((b,), torch.int64),
        "prediction_time": ((b,), torch.int64),
    }
    for key, (shape, dtype) in expect.items():
        assert (tuple(batch[key].shape), batch[key].dtype) == (shape, dtype), key
    assert batch["confounds"]["site"].dtype == torch.int64
    assert spec.channels == ["LAB//LACTATE", "VITAL//HR"]  # sorted, ICU_ADMISSION has no value
    assert spec.groups == ["G1", "G2"] and spec.marker_groups == [0, 0, 1]
    assert load_spec(module.run_dir / SPEC_FILE) == spec


def test_no_later_event_or_image_reaches_any_batch(module):
    spec = module.spec
    mean, std = torch.tensor(spec.channel_mean), torch.tensor(spec.channel_std)
    pt_us = int(_at(PT_HOURS).replace(tzinfo=dt.timezone.utc).timestamp() * 1e6)
    for batch in _all_batches(module):
        raw = batch["ts_values"] * std + mean
        observed = raw[batch["ts_mask"] > 0]
        assert observed.numel() > 0 and observed.max() < LATER / 2
        assert (batch["ts_time"] >= 0).all()
        assert (batch["prediction_time"] == pt_us).all()
        shown = batch["image"][batch["image_present"]][:, 0]  # (n, S, S)
        left_minus_right = shown[:, :, :8].mean((1, 2)) - shown[:, :, 8:].mean((1, 2))
        top_minus_bottom = shown[:, :8].mean((1, 2)) - shown[:, 8:].mean((1, 2))
        assert (left_minus_right > 0.5).all()  # the earlier film: left half bright
        assert (top_minus_bottom.abs() < 0.05).all()  # never the later one
        ages = batch["image_age"][batch["image_present"]]
        torch.testing.assert_close(ages, torch.full_like(ages, PT_HOURS - 6.0))


def test_channel_statistics_come_from_train_windows_only(module):
    spec = module.spec
    # Train subjects 0-5 contribute HR 70+s and 80+s; later values (1000) excluded.
    hr = np.array([70.0 + s for s in range(6)] + [80.0 + s for s in range(6)])
    i = spec.channels.index("VITAL//HR")
    assert spec.channel_mean[i] == pytest.approx(hr.mean(), rel=1e-6)
    assert spec.channel_std[i] == pytest.approx(hr.std(), rel=1e-5)
    # Sites/ancestries from train only: "east" (held-out subject 11) is unknown.
    assert spec.sites == ["north", "south"]
    assert spec.pos_weight == pytest.approx(4 / 2)  # train labels: s = 0, 3 positive


def test_changing_held_out_values_leaves_the_spec_unchanged(cohort, tmp_path):
    cfg = DataConfig(image_size=16)
    train = load_samples(cohort).filter(pl.col("split") == "train")
    base = fit_spec(cohort, train, cfg)
    held = make_cohort(tmp_path / "held", hr_shift={9: 500.0, 10: -40.0})
    _assert_same_spec(fit_spec(held, train, cfg), base)
    moved = make_cohort(tmp_path / "moved", hr_shift={2: 500.0})  # a train subject
    moved_mean = fit_spec(moved, train, cfg).channel_mean
    hr = base.channels.index("VITAL//HR")
    # subject 2's heart rates move by 500: the train-split HR mean moves by far more
    # than any summation-order rounding could
    assert abs(moved_mean[hr] - base.channel_mean[hr]) > 1.0


_STATISTICS = ("channel_mean", "channel_std", "marker_mean", "pos_weight")


def _assert_same_spec(got, want) -> None:
    """Vocabularies and sizes equal; statistics equal up to float summation order."""
    for name, value in vars(want).items():
        if name in _STATISTICS:
            assert getattr(got, name) == pytest.approx(value, rel=1e-9, abs=1e-12), name
        else:
            assert getattr(got, name) == value, name


def test_unknown_site_missing_genotype_and_no_events(module):
    held = module.datasets["held_out"]
    batch = collate([held[i] for i in range(len(held))])
    by_subject = {int(s): i for i, s in enumerate(batch["subject_id"])}
    east = by_subject[11]
    assert batch["confounds"]["site"][east].item() == -1
    no_events = by_subject[NO_EVENTS]
    assert batch["ts_length"][no_events].item() == 0
    assert not batch["ts_present"][no_events]
    assert batch["ts_mask"][no_events].sum().item() == 0
    no_geno = by_subject[NO_GENOTYPE]
    assert batch["genotype_mask"][no_geno].sum().item() == 0
    assert not batch["genotype_present"][no_geno]
    train = module.datasets["train"]
    half = train[[int(s) for s in train.tensors["subject_id"]].index(HALF_CALLED)]
    assert half["genotype_mask"].tolist() == [1.0, 1.0, 0.0]
    assert half["genotype"][2].item() == 0.0 and bool(half["genotype_present"])


def test_corrupt_image_masks_only_that_sample(module):
    train = module.datasets["train"]
    ids = [int(s) for s in train.tensors["subject_id"]]
    bad = train[ids.index(CORRUPT)]  # warned once already in the fixture
    assert not bool(bad["image_present"]) and bad["image"].abs().sum().item() == 0
    assert bad["image_age"].item() == 0.0
    assert all(bool(train[i]["image_present"]) for i, s in enumerate(ids) if s != CORRUPT)


def test_image_cache_is_read_instead_of_decoding_again(cohort, tmp_path):
    cfg = DataConfig(image_size=16, cache_dir=str(tmp_path / "cache"))
    dm = CohortDataModule(cohort, cfg)
    dm.setup("fit")
    with pytest.warns(UserWarning, match=f"{CORRUPT}_before.dcm"):
        first = [dm.datasets["train"][i]["image"] for i in range(6)]
    entries = sorted((tmp_path / "cache").glob("*.npyc"))
    assert len(entries) == 5  # one per readable earlier image of a train subject
    for entry in entries:  # replace the cached pixels, checksum and all: loads return them
        entry.write_bytes(seal(_npy_bytes(np.full((1, 16, 16), 0.25, np.float32))))
    again = dm.datasets["train"][0]["image"]
    assert not torch.allclose(first[0], torch.tensor(0.25))
    assert torch.allclose(again, torch.tensor(0.25))


def test_image_cache_entry_that_fails_its_checksum_is_decoded_again(cohort, tmp_path):
    cfg = DataConfig(image_size=16, cache_dir=str(tmp_path / "cache"))
    dm = CohortDataModule(cohort, cfg)
    dm.setup("fit")
    first = dm.datasets["train"][0]["image"]
    assert first.abs().sum() > 0  # a readable film, cached in one entry
    (entry,) = [e for e in (tmp_path / "cache").glob("*.npyc") if _holds(e, first)]
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit in the pixels
    entry.write_bytes(bytes(data))
    failed = cache_failures()
    with pytest.warns(UserWarning, match="failed its sha256; dropped and recomputed"):
        again = dm.datasets["train"][0]["image"]
    assert cache_failures() == failed + 1
    torch.testing.assert_close(again, first)  # decoded again, not the flipped value
    assert _holds(entry, first)  # and stored again, intact


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _holds(entry, image: torch.Tensor) -> bool:
    payload = unseal(entry.read_bytes())
    return payload is not None and np.array_equal(np.load(io.BytesIO(payload)), image.numpy())


def test_resize_square_pads_to_keep_aspect():
    wide = torch.ones(16, 32)  # (H, W): pads 8 rows above and below, then halves
    out = resize_square(wide, 16)
    assert out.shape == (1, 16, 16)
    assert torch.allclose(out[0, 5:11], torch.ones(6, 16), atol=1e-6)
    assert out[0, :3].abs().max() < 1e-6 and out[0, 13:].abs().max() < 1e-6


def test_build_batch_tensors_matches_the_training_dataset(module, cohort):
    samples = module.split_samples("tuning")
    batch = build_batch_tensors(cohort, samples, module.spec, DataConfig(image_size=16))
    ref = collate([module.datasets["tuning"][i] for i in range(len(samples))])
    for key in ("ts_values", "ts_mask", "ts_delta", "ts_time", "genotype", "label", "image"):
        n = ref[key].shape[1] if key.startswith("ts_") and ref[key].dim() > 1 else None
        got = batch[key][:, :n] if n else batch[key]
        torch.testing.assert_close(got, ref[key], msg=key)


def test_label_fraction_subsamples_training_subjects(cohort):
    dm = CohortDataModule(cohort, DataConfig(image_size=16, label_fraction=0.5))
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3
    assert len(dm.datasets["tuning"]) == 3 and len(dm.datasets["held_out"]) == 3


def test_label_without_subject_names_file_and_row(cohort, tmp_path):
    bad = make_cohort(tmp_path / "bad")
    pl.read_parquet(bad / "subjects.parquet").filter(pl.col("subject_id") != 4).write_parquet(
        bad / "subjects.parquet"
    )
    with pytest.raises(ValueError, match=r"labels.parquet: row 4 has subject_id 4"):
        load_samples(bad)


def test_image_loader_warns_once_with_file_name(tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\x00" * 300)
    loader = ImageLoader(8)
    with pytest.warns(UserWarning, match="broken.dcm"):
        images, present = loader.load_many([str(bad), None])
    assert present.tolist() == [False, False] and images.abs().sum() == 0


def test_genotype_pcs_are_fitted_on_train_and_survive_the_spec_file(cohort, tmp_path):
    train = load_samples(cohort).filter(pl.col("split") == "train")
    assert fit_spec(cohort, train, DataConfig(image_size=16)).marker_pcs == []
    spec = fit_spec(cohort, train, DataConfig(image_size=16, genotype_pcs=2))
    assert len(spec.marker_pcs) == 2 and all(len(a) == spec.n_markers for a in spec.marker_pcs)
    axes = np.array(spec.marker_pcs)
    np.testing.assert_allclose(axes @ axes.T, np.eye(2), atol=1e-9)
    from clinfuse.datasets.datamodule import save_spec

    save_spec(spec, tmp_path / "spec.yaml")
    np.testing.assert_allclose(np.array(load_spec(tmp_path / "spec.yaml").marker_pcs), axes)


def test_batches_without_images_read_no_film_and_keep_everything_else(cohort, tmp_path):
    """A model without an image encoder: no image keys, no decode, the rest unchanged."""
    cfg = DataConfig(image_size=16, batch_size=4, cache_dir=str(tmp_path / "cache"))
    dm = CohortDataModule(cohort, cfg)
    dm.setup("fit")
    dm.use_images(False)
    plain = list(dm.train_dataloader())
    assert not (tmp_path / "cache").exists()  # no film was decoded, so none was cached
    assert all(not set(b) & {"image", "image_present", "image_age"} for b in plain)
    dm.use_images(True)
    with pytest.warns(UserWarning, match=f"{CORRUPT}_before.dcm"):
        full = list(dm.train_dataloader())
    assert len(plain) == len(full)
    for a, b in zip(plain, full, strict=True):
        assert set(b) - set(a) == {"image", "image_present", "image_age"}
        for key in a:
            if key != "confounds":
                torch.testing.assert_close(a[key], b[key], msg=key)


def test_an_evaluation_loader_without_images_reads_no_film(cohort, tmp_path):
    """make_loader(images=False), as evaluate builds it for a model without an image
    encoder: the same batches minus the image keys, and no film decoded."""
    samples = load_samples(cohort)
    cfg = DataConfig(image_size=16, batch_size=4)
    spec = fit_spec(cohort, samples.filter(pl.col("split") == "train"), cfg)
    plain = list(make_loader(cohort, samples, spec, cfg, tmp_path / "cache", images=False))
    assert not (tmp_path / "cache").exists()
    assert all(not set(b) & {"image", "image_present", "image_age"} for b in plain)
    with pytest.warns(UserWarning, match=f"{CORRUPT}_before.dcm"):
        full = list(make_loader(cohort, samples, spec, cfg, tmp_path / "cache2"))
    for a, b in zip(plain, full, strict=True):
        assert set(b) - set(a) == {"image", "image_present", "image_age"}
        torch.testing.assert_close(a["label"], b["label"])
