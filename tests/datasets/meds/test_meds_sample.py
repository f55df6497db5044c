"""MEDS data our code did not write: the static sample of ``meds-testing-helpers`` (with
its task) and a larger dataset from its generator, read in place."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from clinfuse.datasets.datamodule import DataConfig, build_batch_tensors, fit_spec
from clinfuse.datasets.meds import MedsOptions, open_cohort
from clinfuse.datasets.samples import load_samples
from clinfuse.datasets.validate import validate_cohort

TASK = "task_labels/boolean_value_task"


def test_the_static_sample_validates_and_reads_in_place(simple_static_MEDS_dataset_with_task):
    root = simple_static_MEDS_dataset_with_task
    source = open_cohort(root, root / TASK)
    report = validate_cohort(source)
    assert report.ok, report.format()
    # codes.parquet of this sample is incomplete (its README says so): a warning.
    assert [p.check for p in report.warnings] == ["code_unlisted"]
    samples = load_samples(source)
    labels = pl.concat([pl.read_parquet(p) for p in sorted((root / TASK).glob("*.parquet"))])
    assert samples.height == labels.height == 21
    splits = pl.read_parquet(root / "metadata/subject_splits.parquet")
    want = dict(zip(splits["subject_id"], splits["split"], strict=True))
    assert all(want[s] == split for s, split in samples.select("subject_id", "split").iter_rows())


def test_static_rows_never_become_channels_and_later_rows_never_reach_a_sample(
    simple_static_MEDS_dataset_with_task,
):
    root = simple_static_MEDS_dataset_with_task
    source = open_cohort(root, root / TASK)
    samples = load_samples(source)
    spec = fit_spec(source, samples.filter(pl.col("split") == "train"), DataConfig())
    # HEIGHT has a numeric value but no time (static): not a channel.
    assert spec.channels == ["HR", "TEMP"]
    batch = build_batch_tensors(source, samples, spec, DataConfig())
    first = samples.row(0, named=True)  # subject 68729 at 03:00, its only vitals at 02:30:56
    assert first["subject_id"] == 68729
    assert int(batch["ts_length"][0]) == 1
    data = pl.read_parquet(root / "data/train/1.parquet").filter(
        (pl.col("subject_id") == 68729) & (pl.col("code") == "HR")
    )
    hr = (data["numeric_value"][0] - spec.channel_mean[0]) / spec.channel_std[0]
    assert float(batch["ts_values"][0, 0, 0]) == pytest.approx(hr, rel=1e-5)


def test_channel_prefixes_choose_the_codes(simple_static_MEDS_dataset_with_task):
    root = simple_static_MEDS_dataset_with_task
    source = open_cohort(root, root / TASK, options=MedsOptions(channels=["TEMP"]))
    samples = load_samples(source)
    spec = fit_spec(source, samples.filter(pl.col("split") == "train"), DataConfig())
    assert spec.channels == ["TEMP"]


def _generated(tmp: Path, n: int) -> Path:
    """``build_sample_MEDS_dataset`` (meds-testing-helpers' generator), seeded."""
    out = tmp / "generated"
    script = Path(sys.executable).parent / "build_sample_MEDS_dataset"
    args = [str(script), "seed=7", f"N_subjects={n}", f"output_dir={out}",
            "dataset_spec/data_generator=sample"]  # fmt: skip
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    return out


def _death_task(root: Path, labels: Path) -> None:
    """Labels for the generated data: at each subject's second timed event, does a
    MEDS_DEATH row follow? (The generator writes no task of its own.)"""
    data = pl.scan_parquet(str(root / "data/**/*.parquet")).filter(pl.col("time").is_not_null())
    per = data.group_by("subject_id").agg(
        pl.col("time").unique().sort().get(1, null_on_oob=True).alias("prediction_time"),
        (pl.col("code") == "MEDS_DEATH").any().alias("boolean_value"),
    )
    frame = per.drop_nulls("prediction_time").sort("subject_id").collect()
    labels.mkdir()
    frame.write_parquet(labels / "labels.parquet")


def test_a_generated_dataset_validates_and_builds_batches(tmp_path):
    root = _generated(tmp_path, 200)
    _death_task(root, tmp_path / "labels")
    source = open_cohort(root, tmp_path / "labels")
    report = validate_cohort(source)
    assert report.ok, report.format()
    samples = load_samples(source)
    assert samples.height > 100
    assert set(samples["split"]) == {"train", "tuning", "held_out"}
    spec = fit_spec(source, samples.filter(pl.col("split") == "train"), DataConfig())
    assert spec.n_channels > 0
    batch = build_batch_tensors(source, samples, spec, DataConfig())
    assert batch["ts_values"].shape[0] == samples.height
    assert bool(batch["ts_present"].any())


def test_subject_metadata_from_a_sidecar_subjects_table(
    simple_static_MEDS_dataset_with_task, tmp_path
):
    """Static events say nothing of site here; a sidecar subjects.parquet fills it in."""
    root = simple_static_MEDS_dataset_with_task
    ids = pl.read_parquet(root / "metadata/subject_splits.parquet")["subject_id"].sort()
    sites = ["north" if i % 2 else "south" for i in range(ids.len())]
    pl.DataFrame({"subject_id": ids, "site": sites}).write_parquet(tmp_path / "subjects.parquet")
    samples = load_samples(open_cohort(root, root / TASK, sidecars=tmp_path))
    want = dict(zip(ids.to_list(), sites, strict=True))
    assert samples["site"].to_list() == [want[s] for s in samples["subject_id"]]
