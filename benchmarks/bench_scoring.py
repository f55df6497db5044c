"""Batch scoring throughput and memory: ``python benchmarks/bench_scoring.py``.

Measures, on one tiny trained model (attention fusion, EfficientNet-Lite0 frozen):

* subjects/s scoring a cohort with films decoded from DICOM (no caches);
* subjects/s with cached image embeddings (decoded-pixel cache + the frozen-backbone
  embedding cache of ``encoders/embedding_cache.py``, both warmed by a first run);
* the raw backbone forward throughput on the same images (the limit for the
  decoded path: decoding, fingerprints and fusion only add to it);
* peak RSS of the non-image path (no images.parquet) at two cohort sizes, each in
  its own process, with the same chunk size: chunking keeps it flat.

Large cohorts are built by replicating a simulated cohort's tables under new
subject ids, shard by shard (``events/*.parquet``), so the generator never holds
the whole table either. Targets: >= 5,000 subjects/s with cached embeddings; the
decoded path >= 80 % of raw backbone throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import clinfuse  # noqa: F401  (installs the torchvision compat shim first)

_TRAIN = [
    "data.batch_size=64", "data.max_steps=64", "optim.max_epochs=1", "optim.progress_bar=false",
    "model.encoders.timm_image.embed_dim=32", "model.encoders.gru_d.hidden=32",
    "model.encoders.gru_d.embed_dim=32", "model.encoders.sgl_mlp.hidden=[32]",
    "model.encoders.sgl_mlp.embed_dim=32", "model.fusion.cfg.dim=32", "model.fusion.cfg.heads=2",
]  # fmt: skip


def _simulate(out: Path, subjects: int, image_size: int, seed: int) -> Path:
    from clinfuse.datasets.simulator import SimConfig, simulate_cohort

    simulate_cohort(out, SimConfig(n_subjects=subjects, image_size=image_size, seed=seed,
                                   progress=False))  # fmt: skip
    return out


def _train(cohort: Path, run_dir: Path, image_size: int) -> Path:
    from clinfuse.training.config import load_run_config
    from clinfuse.training.demo import DEMO_CONFIG
    from clinfuse.training.run import train

    overrides = [*_TRAIN, f"data.image_size={image_size}", f"cohort={cohort}"]
    train(load_run_config(DEMO_CONFIG, overrides), run_dir)
    return run_dir / "model"


def _timed_score(model: Path, cohort: Path, out: Path, chunk_size: int, **kwargs) -> float:
    """Samples/s of the chunk loop (read, tensors, forward, fingerprints, write).

    Loading the artifact and planning the run happen once per night and are left out.
    Also prints samples per CPU-second of this process (robust to a loaded machine).
    """
    from clinfuse.scoring.score import ChunkScorer, open_run, write_part

    shutil.rmtree(out, ignore_errors=True)
    artifact, plan, pending = open_run(model, cohort, out, chunk_size)
    scorer = ChunkScorer(artifact, cohort, **kwargs)
    start, cpu = time.perf_counter(), time.process_time()
    for index in pending:
        write_part(out, index, scorer.score(plan.chunk(index)))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = plan.samples.height
    print(f"  {cohort.name} {sorted(kwargs)}: {n / wall:.0f}/s wall, {n / cpu:.0f}/CPU-s",
          file=sys.stderr)  # fmt: skip
    return n / wall


def _raw_backbone(model: Path, cohort: Path, batch_size: int, threads: int = 1) -> float:
    """Images/s of the image encoder's timm backbone alone on pre-decoded films."""
    import polars as pl
    import torch

    from clinfuse.datasets.images import ImageLoader
    from clinfuse.datasets.samples import latest_images
    from clinfuse.scoring.score import scoring_samples
    from clinfuse.training.artifact import load_artifact

    art = load_artifact(model)
    encoder = art.model.encoders["image"]
    paths = latest_images(cohort, scoring_samples(cohort))["path"].drop_nulls()
    images, _ = ImageLoader(art.spec.image_size).load_many(pl.Series(paths).to_list())
    torch.set_num_threads(threads)
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(images), batch_size):
            encoder._run_backbone(images[lo : lo + batch_size], want_tokens=True)
    return len(images) / (time.perf_counter() - start)


def _replicate(src: Path, dst: Path, subjects: int, shard: int = 10_000) -> Path:
    """A cohort of ``subjects`` without images: src's tables repeated under new ids."""
    import polars as pl

    base = {n: pl.read_parquet(src / f"{n}.parquet") for n in ("labels", "subjects", "genotypes")}
    events = pl.read_parquet(src / "events.parquet")
    n_src = base["subjects"].height
    (dst / "events").mkdir(parents=True, exist_ok=True)
    tables: dict[str, list[pl.DataFrame]] = {n: [] for n in base}
    for lo in range(0, subjects, shard):
        hi = min(lo + shard, subjects)
        keep = (pl.col("subject_id") > lo) & (pl.col("subject_id") <= hi)
        offsets = range(lo // n_src, -(-hi // n_src))
        shifted = pl.concat([_shift(events, k * n_src) for k in offsets]).filter(keep)
        shifted.write_parquet(dst / "events" / f"part-{lo // shard:04d}.parquet")
        for name, frame in base.items():
            tables[name] += [_shift(frame, k * n_src).filter(keep) for k in offsets]
    for name, parts in tables.items():
        pl.concat(parts).write_parquet(dst / f"{name}.parquet")
    shutil.copy(src / "markers.parquet", dst / "markers.parquet")
    return dst


def _shift(frame, offset: int):
    import polars as pl

    return frame.with_columns(pl.col("subject_id") + offset)


def _rss_child(model: Path, cohort: Path, chunk_size: int) -> dict:
    """Runs in its own process: scores the cohort, reports speed and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        rate = _timed_score(model, cohort, Path(tmp) / "out", chunk_size=chunk_size)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"subjects_per_s": rate, "peak_rss_mib": peak_kib / 1024}


def _in_child(model: Path, cohort: Path, chunk_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(model), str(cohort), str(chunk_size)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-subjects", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--chunk-size", type=int, default=2000)
    parser.add_argument("--workdir", default=None, help="keep cohorts here (default: temp)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, cohort, chunk = args.child
        print(json.dumps(_rss_child(Path(model), Path(cohort), int(chunk))))
        return
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scoring_"))
    rows = _run(root, args)
    _print_table(rows, args)


def _run(root: Path, args: argparse.Namespace) -> list[tuple[str, str, float, str]]:
    train_cohort = _simulate(root / "train", 300, args.image_size, seed=0)
    model = _train(train_cohort, root / "run", args.image_size)
    cohort = _simulate(root / "score", args.image_subjects, args.image_size, seed=1)
    chunk = args.chunk_size
    decoded = _timed_score(model, cohort, root / "out", chunk_size=chunk, threads=args.threads)
    caches = {"image_cache": root / "pixels", "embedding_cache": root / "features"}
    _timed_score(model, cohort, root / "out", chunk_size=chunk, threads=args.threads, **caches)
    cached = _timed_score(model, cohort, root / "out", chunk_size=chunk, threads=args.threads,
                          **caches)  # fmt: skip
    raw = _raw_backbone(model, cohort, batch_size=256, threads=args.threads)
    n = args.image_subjects
    rows = [
        ("images decoded from DICOM", f"{n}", decoded, f"{decoded / raw:.0%} of raw backbone"),
        ("cached image embeddings", f"{n}", cached, "target >= 5,000/s"),
        ("raw backbone forward (images/s)", f"{n}", raw, "the limit for decoded"),
    ]
    for size in args.sizes:
        big = _replicate(train_cohort, root / f"noimg_{size}", size)
        child = _in_child(model, big, chunk)
        note = f"peak RSS {child['peak_rss_mib']:.0f} MiB"
        rows.append(("non-image path", f"{size}", child["subjects_per_s"], note))
    return rows


def _print_table(rows: list[tuple[str, str, float, str]], args: argparse.Namespace) -> None:
    load = os.getloadavg()
    print(f"\nscoring benchmark ({os.cpu_count()} CPUs, load {load[0]:.1f}/{load[1]:.1f}, "
          f"image {args.image_size} px, chunk {args.chunk_size} subjects)")  # fmt: skip
    print(f"{'path':34s} {'subjects':>9s} {'per s':>9s}  note")
    for name, n, rate, note in rows:
        print(f"{name:34s} {n:>9s} {rate:9.0f}  {note}")


if __name__ == "__main__":
    main()
