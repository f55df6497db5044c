"""Training batches from a MEDS root vs from the cohort layout: events/s and peak RSS.

Writes the same synthetic events twice (no images, no genotypes): as a MEDS root
(``data/train/N.parquet`` shards with static ``SITE//`` rows, metadata, a label
directory) and as a cohort directory (``events/part-N.parquet``, labels, subjects,
splits). Each layout is then measured in its own process, so each peak RSS is its
own: read the samples (labels, splits, subject metadata), then build the batch
tensors of every sample (``datamodule.build_batch_tensors``: the as-of window join,
GRU-D values, masks and deltas) chunk by chunk of subjects, reading the events by
subject range. Events/s counts every event of the dataset over that wall time.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_meds.py [--events 50000000]``
(about 2 GB of Parquet under ``--workdir``; ``--keep`` keeps it for another run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

VITALS = ("VITAL//HR", "VITAL//SBP", "VITAL//DBP", "VITAL//RR", "VITAL//SPO2", "VITAL//TEMP")
LABS = ("LAB//LACTATE", "LAB//CREATININE", "LAB//WBC")
SITES = ("north", "south", "east")
T0_US = int(dt.datetime(2150, 1, 1, tzinfo=dt.timezone.utc).timestamp() * 1e6)
HOUR_US = 3_600_000_000
STAY_HOURS = 96


def shard_events(first: int, n: int, per_subject: int, rng: np.random.Generator) -> pl.DataFrame:
    """Vitals charted in rounds, labs alone, over a 96 h stay; sorted by subject and time."""
    rounds = per_subject // (len(VITALS) + 1)
    subject = np.repeat(np.arange(first, first + n), rounds)
    start = T0_US + rng.integers(0, 365 * 24, n) * HOUR_US  # admission per subject
    minute = rng.integers(0, STAY_HOURS * 60, subject.size)
    vit_t = np.repeat(start[subject - first] + minute * 60_000_000, len(VITALS))
    lab_t = start[subject - first] + rng.integers(0, STAY_HOURS * 60, subject.size) * 60_000_000
    codes = np.asarray(VITALS + LABS)
    code = np.concatenate([
        np.tile(np.arange(len(VITALS)), subject.size),
        len(VITALS) + rng.integers(0, len(LABS), subject.size),
    ])  # fmt: skip
    frame = pl.DataFrame({
        "subject_id": np.concatenate([np.repeat(subject, len(VITALS)), subject]),
        "time": np.concatenate([vit_t, lab_t]),
        "code": codes[code],
        "numeric_value": rng.normal(0.0, 1.0, code.size).astype(np.float32),
    })  # fmt: skip
    frame = frame.with_columns(pl.col("time").cast(pl.Datetime("us")))
    return frame.sort("subject_id", "time", maintain_order=True)


def generate(work: Path, n_events: int, per_subject: int, shard_subjects: int) -> None:
    """Both layouts of the same events; labels at admission + 72 h."""
    import meds
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    n_subjects = n_events // per_subject
    root, cohort = work / "meds", work / "cohort"
    for folder in (root / "data/train", root / "metadata", work / "labels", cohort / "events"):
        folder.mkdir(parents=True, exist_ok=True)
    labels, subjects = [], []
    for i, first in enumerate(range(0, n_subjects, shard_subjects)):
        n = min(shard_subjects, n_subjects - first)
        events = shard_events(first, n, per_subject, rng)
        site = pl.DataFrame({
            "subject_id": np.arange(first, first + n), "site": rng.choice(SITES, n),
        })  # fmt: skip
        start = events.group_by("subject_id").agg(pl.col("time").min()).sort("subject_id")
        labels.append(start.select(
            "subject_id", (pl.col("time") + dt.timedelta(hours=72)).alias("prediction_time"),
            boolean_value=pl.Series(rng.random(n) < 0.2),
        ))  # fmt: skip
        subjects.append(site)
        static = site.select(
            "subject_id", pl.lit(None, pl.Datetime("us")).alias("time"),
            (pl.lit("SITE//") + pl.col("site")).alias("code"),
            pl.lit(None, pl.Float32).alias("numeric_value"),
        )  # fmt: skip
        data = pl.concat([static, events]).sort("subject_id", "time", maintain_order=True)
        pq.write_table(meds.DataSchema.align(data.to_arrow()), root / f"data/train/{i}.parquet")
        events.write_parquet(cohort / f"events/part-{i:04d}.parquet")
    label_frame, subject_frame = pl.concat(labels), pl.concat(subjects)
    splits = subject_frame.select("subject_id", split=pl.lit("train"))
    label_frame.write_parquet(work / "labels/labels.parquet")
    label_frame.write_parquet(cohort / "labels.parquet")
    subject_frame.write_parquet(cohort / "subjects.parquet")
    splits.write_parquet(cohort / "subject_splits.parquet")
    pq.write_table(
        meds.SubjectSplitSchema.align(splits.to_arrow()), root / meds.subject_splits_filepath
    )
    codes = pl.DataFrame({"code": list(VITALS + LABS)})
    pq.write_table(
        meds.CodeMetadataSchema.align(codes.to_arrow()), root / meds.code_metadata_filepath
    )
    (root / meds.dataset_metadata_filepath).write_text(json.dumps({"dataset_name": "bench"}))


def measure(work: Path, layout: str, chunk_subjects: int) -> dict:
    """Samples, then every sample's batch tensors, chunk by chunk; in this process."""
    from clinfuse.datasets.datamodule import DataConfig, build_batch_tensors
    from clinfuse.datasets.meds import open_cohort
    from clinfuse.datasets.samples import load_samples
    from clinfuse.datasets.spec import DataSpec

    cohort = open_cohort(work / "meds", work / "labels") if layout == "meds" else work / "cohort"
    channels = sorted(VITALS + LABS)
    spec = DataSpec(channels=channels, channel_mean=[0.0] * 9, channel_std=[1.0] * 9,
                    max_steps=256, window_hours=72.0, sites=list(SITES))  # fmt: skip
    cfg = DataConfig(max_steps=256)
    start = time.perf_counter()
    samples = load_samples(cohort)
    ids = samples["subject_id"].unique().sort()
    observed = 0
    for first in range(0, ids.len(), chunk_subjects):
        chunk_ids = ids.slice(first, chunk_subjects)
        chunk = samples.filter(pl.col("subject_id").is_in(chunk_ids.implode()))
        batch = build_batch_tensors(cohort, chunk, spec, cfg)
        observed += int(batch["ts_mask"].sum())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    return {"seconds": seconds, "peak_rss_mib": peak, "samples": samples.height,
            "observed_cells": observed}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000_000)
    parser.add_argument("--events-per-subject", type=int, default=250)
    parser.add_argument("--shard-subjects", type=int, default=5000)
    parser.add_argument("--chunk-subjects", type=int, default=5000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/clinfuse-bench-meds"))
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the data")
    parser.add_argument("--measure", choices=("meds", "cohort"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.workdir / f"{args.events}"
    if args.measure:  # the child process
        print(json.dumps(measure(work, args.measure, args.chunk_subjects)))
        return
    if not (work / "meds").is_dir():
        start = time.perf_counter()
        generate(work, args.events, args.events_per_subject, args.shard_subjects)
        print(f"wrote both layouts in {time.perf_counter() - start:.0f} s to {work}")
    n_events = (
        pl.scan_parquet(str(work / "cohort/events/*.parquet")).select(pl.len()).collect().item()
    )
    rows = {}
    for layout in ("cohort", "meds"):
        child = [sys.executable, __file__, "--measure", layout, "--workdir", str(args.workdir),
                 "--events", str(args.events), "--chunk-subjects", str(args.chunk_subjects)]  # fmt: skip
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        rows[layout] = json.loads(out.strip().splitlines()[-1])
    assert rows["meds"]["observed_cells"] == rows["cohort"]["observed_cells"]
    print(f"{n_events:,} events, {rows['meds']['samples']:,} samples, "
          f"chunks of {args.chunk_subjects} subjects")  # fmt: skip
    print(f"{'layout':<8} {'seconds':>8} {'events/s':>12} {'peak RSS MiB':>13}")
    for layout, r in rows.items():
        rate = n_events / r["seconds"]
        print(f"{layout:<8} {r['seconds']:>8.1f} {rate:>12,.0f} {r['peak_rss_mib']:>13,.0f}")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
