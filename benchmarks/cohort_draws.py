"""One model against its peers over several cohort draws, not one held-out split.

Every table of docs/benchmarks.md is measured on one cohort (the simulator's subjects
of seed 0), so its 750 held-out subjects move every difference by about +-0.02. This
script takes ``bench_fusion.py`` (or ``bench_timeseries.py``) output folders, one per
cohort draw (``--cohort-seed``), where the same rows were trained, and prints:

* per draw: the model's AUROC on each training seed and their mean, each peer's AUROC,
  and the mean over seeds of the paired difference model - peer with a paired
  bootstrap 95% interval (the held-out subjects resampled, every seed scored on the
  same resample);
* over all draws: the mean of the per-draw differences, the s.d. across draws, and a
  bootstrap 95% interval of that mean that resamples the held-out subjects of every
  draw independently.

The model's rows are ``<model>`` for seed 0 and ``<model>_seed<k>``; a peer's are named
the same way, each a run directory with ``held_out_logits.npy`` (``gbdt_features``, the
PyPOTS rows of ``bench_timeseries.py``) or a trained row's predictions. A peer's AUROC is
the mean over those of ``--seeds`` that are there (a deterministic peer may have only
seed 0). Each folder's cohort is read from the model's seed-0 run (``bench_result.json``).

    .venv/bin/python benchmarks/cohort_draws.py /work/bench/strat /work/bench/draws/c10 ... \\
        --model candidate_shipped_plain_gxd10 --seeds 0 1 2 --peers gbdt_features
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fusion import RESULT_FILE, Variant, _ceiling_scores, _ceilings  # noqa: E402
from seed_ensemble import peer_logits, split_logits  # noqa: E402

from clinfuse.datasets.samples import load_samples  # noqa: E402
from clinfuse.evaluation.metrics import auroc  # noqa: E402
from clinfuse.simulation.oracle import FEATURE_SETS  # noqa: E402


@dataclass(frozen=True)
class Draw:
    """One cohort draw's held-out labels and logits.

    Attributes:
        name: the output folder's name.
        y: (N,) 0/1 labels of the held-out samples.
        model: (S, N) the model's logits, one row per training seed.
        peers: peer name -> (S', N) logits, one row per seed found (S' <= S).
        ceiling: held-out AUROC of the latent-factor ceiling asked for, if any.
    """

    name: str
    y: np.ndarray
    model: np.ndarray
    peers: dict[str, np.ndarray]
    ceiling: float | None = None


def _run_name(name: str, seed: int) -> str:
    return replace(Variant(name), seed=seed).run_name


def load_draw(
    out: Path, model: str, seeds: list[int], peers: list[str], ceiling: str | None = None
) -> Draw:
    """The held-out logits of ``model`` (each seed) and of each peer in one output folder,
    and the held-out AUROC of the ``ceiling`` feature set (``simulation.oracle``)."""
    runs = out / "runs"
    result = runs / model / RESULT_FILE
    if not result.is_file():
        raise SystemExit(f"{result}: missing (train the model's seed-0 row in {out} first)")
    cohort = Path(json.loads(result.read_text())["config"]["cohort"])
    rows = load_samples(cohort).filter(pl.col("split") == "held_out")
    y = rows["label"].cast(int).to_numpy()
    logits = np.stack([split_logits(runs / _run_name(model, s), rows) for s in seeds])
    peer_rows = {}
    for peer in peers:
        if not (runs / peer).is_dir():
            raise SystemExit(f"{runs / peer}: missing (run the peer's row in {out} first)")
        found = [runs / _run_name(peer, s) for s in seeds if (runs / _run_name(peer, s)).is_dir()]
        peer_rows[peer] = np.stack([peer_logits(run, rows) for run in found])
    value = None if ceiling is None else _ceilings(_ceiling_scores(cohort))[ceiling]
    return Draw(out.name, y, logits, peer_rows, value)


def mean_auroc(y: np.ndarray, logits: np.ndarray) -> float:
    """The mean over rows (seeds) of each row's AUROC."""
    return float(np.mean([auroc(y, row) for row in logits]))


def margin(draw: Draw, peer: str, index: np.ndarray | None = None) -> float:
    """Mean over seeds of AUROC(model) minus the peer's mean AUROC, on ``index`` (a resample)."""
    i = slice(None) if index is None else index
    return mean_auroc(draw.y[i], draw.model[:, i]) - mean_auroc(draw.y[i], draw.peers[peer][:, i])


def bootstrap(draws: list[Draw], peer: str, n: int, seed: int = 0) -> np.ndarray:
    """(n, D) per-draw margins on resamples of each draw's held-out subjects (independent)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, len(draws)))
    for b in range(n):
        for d, draw in enumerate(draws):
            index = rng.integers(0, draw.y.size, draw.y.size)
            while draw.y[index].min() == draw.y[index].max():  # both classes, or no AUROC
                index = rng.integers(0, draw.y.size, draw.y.size)
            out[b, d] = margin(draw, peer, index)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outs", nargs="+", type=Path, help="bench output folders, one per draw")
    ap.add_argument("--model", required=True, help="the row compared (its seed-0 run name)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--peers", nargs="+", default=["gbdt_features"])
    ap.add_argument("--bootstrap", type=int, default=1000, help="resamples per draw")
    ap.add_argument(
        "--ceiling",
        choices=list(FEATURE_SETS),
        default=None,
        help="also the model's mean AUROC over this latent-factor ceiling's, per draw "
        "(fused_interaction: the site-free ceiling of a fused row; timeseries: vitals/labs)",
    )
    ap.add_argument(
        "--ensemble",
        action="store_true",
        help="compare the seeds' ensemble (the mean of their logits), not their mean AUROC",
    )
    args = ap.parse_args(argv)
    draws = [load_draw(out, args.model, args.seeds, args.peers, args.ceiling) for out in args.outs]
    members = [" / ".join(f"{auroc(d.y, row):.3f}" for row in d.model) for d in draws]
    if args.ensemble:
        draws = [replace(d, model=d.model.mean(axis=0, keepdims=True)) for d in draws]

    seeds = " / ".join(map(str, args.seeds))
    which = "ensemble" if args.ensemble else "mean"
    head = f"| draw | n held-out | {args.model}, seeds {seeds} | {which} |"
    head += "".join(f" {p} | - {p} [95% CI] |" for p in args.peers)
    head += f" {args.ceiling} ceiling | x ceiling |" if args.ceiling else ""
    print(head)
    print("|---" * (4 + 2 * len(args.peers) + 2 * bool(args.ceiling)) + "|")
    samples = {p: bootstrap(draws, p, args.bootstrap) for p in args.peers}  # p -> (n, D)
    for d, draw in enumerate(draws):
        per_seed = members[d]
        line = (
            f"| {draw.name} | {draw.y.size} | {per_seed} | {mean_auroc(draw.y, draw.model):.3f} |"
        )
        for p in args.peers:
            low, high = np.percentile(samples[p][:, d], [2.5, 97.5])
            line += f" {mean_auroc(draw.y, draw.peers[p]):.3f} |"
            line += f" {margin(draw, p):+.3f} [{low:+.3f}, {high:+.3f}] |"
        if draw.ceiling is not None:
            ratio = mean_auroc(draw.y, draw.model) / draw.ceiling
            line += f" {draw.ceiling:.3f} | {ratio:.3f} |"
        print(line)
    if args.ceiling:
        ratios = [mean_auroc(draw.y, draw.model) / draw.ceiling for draw in draws]
        print(f"\nx {args.ceiling} ceiling: mean {np.mean(ratios):.3f}, range "
              f"{min(ratios):.3f} - {max(ratios):.3f}")  # fmt: skip
    print(f"\nOver {len(draws)} draws (margin: the model's {which} over seeds minus the peer):")
    print("| peer | mean margin | s.d. across draws | min - max | 95% CI of the mean |")
    print("|---|---|---|---|---|")
    for p in args.peers:
        values = np.array([margin(draw, p) for draw in draws])
        low, high = np.percentile(samples[p].mean(axis=1), [2.5, 97.5])
        spread = values.std(ddof=1) if values.size > 1 else float("nan")
        print(
            f"| {p} | {values.mean():+.4f} | {spread:.4f} | {values.min():+.3f} - "
            f"{values.max():+.3f} | [{low:+.3f}, {high:+.3f}] |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
