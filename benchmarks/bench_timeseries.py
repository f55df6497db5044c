"""Vitals and labs alone: our GRU-D against PyPOTS classifiers, same data, same split.

One table, one run: held-out AUROC (mean and s.d. over training seeds) and seconds
per training epoch of

* ``clinfuse_gru_d``: our GRU-D encoder with a linear risk head, trained by
  ``training.run.train`` on the cohort's irregular events (the vitals-only row of
  ``bench_fusion.py``; the bench base preset, adversary off);
* ``pypots_grud`` and ``pypots_<other>``: PyPOTS 1.5 classifiers on the same
  subjects, from an hourly grid of the same window (mean per hour, NaN where a
  channel has no value), standardized with the training split's statistics, early
  stopped on the tuning split;
* ``gbdt_timeseries``: the gradient-boosting baseline on per-channel features;
* ``ceiling_timeseries``: a logistic regression on the true physiological
  severity (``simulation.oracle``), what a perfect vitals encoder could reach.

PyPOTS pins an older ``huggingface_hub`` than our stack, so it runs in its own
virtual environment (``.venv-peers``, built by ``make bench-peers``) as a
subprocess reading the exported grid (``benchmarks/peers/pypots_peer.py``).

    make bench-peers            # builds .venv-peers, then runs this file
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_timeseries.py \\
        --subjects 5000 --epochs 15 --patience 4 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

import clinfuse  # noqa: F401  (installs the compat shim before timm/torch imports)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fusion as bf  # noqa: E402  (the same cohort, presets and run machinery)

from clinfuse.config import apply_overrides, load_yaml  # noqa: E402
from clinfuse.datasets.samples import (  # noqa: E402
    US_PER_HOUR,
    scan_events,
    window_events,
)
from clinfuse.datasets.spec import DataSpec  # noqa: E402
from clinfuse.evaluation.metrics import auroc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
VITALS_ONLY = bf.Variant("only_vitals", ("vitals/labs",), "early")
PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "pypots_peer.py"


def hourly_grid(cohort: Path, samples: pl.DataFrame, spec: DataSpec) -> np.ndarray:
    """Mean value per hour of the window and channel, standardized; NaN where none.

    Hour ``k`` covers ``(pt - window + k h, pt - window + (k + 1) h]``, so the last
    bin ends at prediction_time and nothing later enters (the rule of time).

    Shapes:
        returns: (N, ceil(window_hours), C) float32
    """
    steps = int(np.ceil(spec.window_hours))
    index = pl.DataFrame({"code": spec.channels, "channel": np.arange(spec.n_channels)})
    start = pl.col("prediction_time") - pl.duration(microseconds=int(steps * US_PER_HOUR))
    hour = ((pl.col("time") - start).dt.total_microseconds() - 1) // US_PER_HOUR
    binned = (
        window_events(scan_events(cohort, samples["subject_id"]), samples, spec.window_hours)
        .filter(pl.col("numeric_value").is_finite())
        .join(index.lazy(), on="code")
        .with_columns(hour.clip(0, steps - 1).alias("hour"))
        .group_by("sample", "hour", "channel")
        .agg(pl.col("numeric_value").cast(pl.Float64).mean())
        .collect()
    )
    grid = np.full((samples.height, steps, spec.n_channels), np.nan, dtype=np.float32)
    ch = binned["channel"].to_numpy()
    mean, std = np.asarray(spec.channel_mean)[ch], np.asarray(spec.channel_std)[ch]
    value = (binned["numeric_value"].to_numpy() - mean) / std
    grid[binned["sample"].to_numpy(), binned["hour"].to_numpy(), ch] = value
    return grid


def export_grid(ctx: bf.Context, path: Path) -> dict[str, np.ndarray]:
    """Writes the train/tuning/held_out grids and labels to ``path`` (npz); returns them."""
    cohort = ctx.cohorts["train"]
    samples, spec, _ = bf.samples_and_spec(ctx, VITALS_ONLY)
    arrays = {}
    for split in ("train", "tuning", "held_out"):
        rows = samples.filter(pl.col("split") == split)
        arrays[f"X_{split}"] = hourly_grid(cohort, rows, spec)
        arrays[f"y_{split}"] = rows["label"].cast(pl.Int64).to_numpy()
    np.savez_compressed(path, **arrays)
    return arrays


def run_peers(
    data: Path, out: Path, args: argparse.Namespace, runs: Path | None = None
) -> list[dict[str, Any]]:
    """The PyPOTS classifiers, in their own environment; rows as ``ours`` gives them.

    With ``runs``, each row's held-out logits (from its probabilities, in the held-out
    samples' order) go to ``runs/<model>[_seed<k>]/held_out_logits.npy``, as a
    ``bench_fusion.py`` peer row keeps them, for paired comparisons
    (``seed_ensemble.py --peer``, ``cohort_draws.py``)."""
    if not PEER_PYTHON.is_file():
        raise SystemExit(f"{PEER_PYTHON} is missing: run `make bench-peers` to build it")
    cmd = [
        str(PEER_PYTHON), str(PEER_SCRIPT), "--data", str(data), "--out", str(out),
        "--epochs", str(args.epochs), "--patience", str(args.patience),
        "--models", *args.peer_models, "--seeds", *map(str, args.seeds),
    ]  # fmt: skip
    if args.peer_lrs:
        cmd += ["--lrs", *map(str, args.peer_lrs)]
    if not out.is_file():
        subprocess.run(cmd, check=True)
    rows = json.loads(out.read_text())
    for row in rows:
        proba = row.pop("held_out_proba", None)  # absent in results of earlier versions
        if runs is None or proba is None:
            continue
        run_dir = runs / replace(bf.Variant(row["model"]), seed=row["seed"]).run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        p = np.clip(np.asarray(proba, dtype=np.float64), 1e-12, 1.0 - 1e-12)
        np.save(run_dir / "held_out_logits.npy", np.log(p) - np.log1p(-p))
    return rows


def ours(
    ctx: bf.Context, seeds: list[int], name: str = "", edits: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Our GRU-D, vitals and labs only, once per seed.

    Args:
        name: a candidate's name (rows ``clinfuse_gru_d_<name>``, runs
            ``only_vitals_no_adv_<name>``); empty for the base preset's row.
        edits: ``key=value`` edits of the base preset for this candidate
            (``config.apply_overrides``), e.g. ``model.encoders.gru_d.readout=mean``.
    """
    if edits:
        ctx = replace(ctx, base=apply_overrides(ctx.base, list(edits)))
    suffix = f"_{name}" if name else ""
    rows = []
    for seed in seeds:
        v = bf.Variant(f"only_vitals_no_adv{suffix}", ("vitals/labs",), "early", False, seed=seed)
        result = ctx.run(v)
        m = result["metrics"]
        rows.append(
            {
                "model": f"clinfuse_gru_d{suffix}",
                "seed": seed,
                "auroc": m["auroc"],
                "epochs": result["epochs"],
                # The epochs alone (training and validation), as PyPOTS's fit time is;
                # runs cached before fit_s was recorded fall back to the whole run.
                "s_per_epoch": (result.get("fit_s") or result["train_s"])
                / max(result["epochs"], 1),
            }
        )
    return rows


def gbdt_row(ctx: bf.Context) -> dict[str, Any]:
    """The gradient-boosting baseline on per-channel window features (vitals only)."""
    from clinfuse.evaluation.baseline import fit_baseline

    cohort = ctx.cohorts["train"]
    samples, spec, _ = bf.samples_and_spec(ctx, VITALS_ONLY)
    start = time.perf_counter()
    fitted = fit_baseline(cohort, samples, spec, ("timeseries",))
    seconds = time.perf_counter() - start
    rows = samples.filter(pl.col("split") == "held_out")
    score = auroc(rows["label"].cast(pl.Int64).to_numpy(), fitted.logit(cohort, rows))
    return {"model": "gbdt_timeseries", "seed": 0, "auroc": score, "epochs": fitted.n_iter,
            "s_per_epoch": seconds / max(fitted.n_iter, 1)}  # fmt: skip


def ceiling_row(ctx: bf.Context) -> dict[str, Any]:
    scores = bf._ceiling_scores(ctx.cohorts["train"])
    y = scores["outcome"].to_numpy().astype(int)
    p = scores["timeseries"].to_numpy()
    value = auroc(y, p)
    return {"model": "ceiling_timeseries (true physiology, logistic)", "seeds": "-",
            "auroc_mean": value, "auroc_sd": 0.0, "auroc_min": value, "auroc_max": value,
            "s_per_epoch_mean": 0.0}  # fmt: skip


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, s.d., min and max of AUROC and seconds per epoch per model."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        aucs = [r["auroc"] for r in group]
        out.append(
            {
                "model": model,
                "seeds": len(group),
                "auroc_mean": statistics.fmean(aucs),
                "auroc_sd": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
                "auroc_min": min(aucs),
                "auroc_max": max(aucs),
                "s_per_epoch_mean": statistics.fmean(r["s_per_epoch"] for r in group),
            }
        )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--subjects", type=int, default=5000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--cohort-seed",
        type=int,
        default=0,
        help="simulator seed that draws the cohort's subjects (bench_fusion.py's; 0 = the "
        "cohort every table uses; give another --out)",
    )
    ap.add_argument("--bootstrap", type=int, default=500)
    ap.add_argument("--peer-models", nargs="+", default=["GRUD", "BRITS"])
    ap.add_argument(
        "--peer-lrs",
        type=float,
        nargs="+",
        default=None,
        help="Adam learning rates of the PyPOTS models, one row each (default: PyPOTS's 1e-3)",
    )
    ap.add_argument("--config", default=str(bf.BASE_PRESET))
    ap.add_argument(
        "--candidates",
        help="YAML of name -> [key=value edits of the base preset]; each is a row "
        "clinfuse_gru_d_<name> (e.g. benchmarks/candidates/grud.yaml)",
    )
    ap.add_argument("--only", nargs="+", help="candidate names to run (default: all)")
    ap.add_argument("--no-base", action="store_true", help="skip the unedited clinfuse_gru_d row")
    ap.add_argument("--no-peers", action="store_true", help="skip PyPOTS (development runs)")
    ap.add_argument("--out", default="runs/bench_fusion", help="shared with bench_fusion.py")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fusion_args = bf.parse_args(["--subjects", str(args.subjects), "--image-size",
                                 str(args.image_size), "--epochs", str(args.epochs),
                                 "--patience", str(args.patience), "--config", args.config,
                                 "--bootstrap", str(args.bootstrap), "--out", args.out,
                                 "--cohort-seed", str(args.cohort_seed)])  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = bf._context(fusion_args, args.subjects, out)
    peers_dir = out / "timeseries_peers"
    peers_dir.mkdir(exist_ok=True)
    draw = bf._draw_suffix(args.cohort_seed)
    data = peers_dir / f"grid_n{args.subjects}{draw}.npz"
    if not data.is_file():
        export_grid(ctx, data)
    rows = [] if args.no_base else ours(ctx, args.seeds)
    candidates = load_yaml(args.candidates) if args.candidates else {}
    for name, edits in candidates.items():
        if args.only is None or name in args.only:
            rows += ours(ctx, args.seeds, name, tuple(edits))
    seeds = "-".join(map(str, args.seeds))
    if not args.no_peers:
        models = "-".join(args.peer_models)
        lrs = "" if not args.peer_lrs else "_lr" + "-".join(f"{lr:g}" for lr in args.peer_lrs)
        cache = peers_dir / f"pypots_{models}_e{args.epochs}_s{seeds}{lrs}{draw}.json"
        rows += run_peers(data, cache, args, out / "runs")
    rows.append(gbdt_row(ctx))
    summary = summarize(rows) + [ceiling_row(ctx)]
    note = (
        f"Vitals and labs only, {args.subjects} subjects, held-out AUROC over seeds "
        f"{args.seeds}; seconds per epoch on this machine (gbdt: per boosting iteration)."
    )
    print(bf.write_outputs(out, "timeseries_peers", rows, note))
    print(bf.write_outputs(out, "timeseries_peers_seeds", summary, note))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
