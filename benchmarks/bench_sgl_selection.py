"""Genotype group selection: our data-chosen sparse-group-lasso path against groupyr.

A two-population design: allele frequencies of the two populations diverge
(Balding-Nichols, ``--fst``), a few groups are causal, a few others are
ancestry-only (their frequencies differ by ``--ancestry-delta`` between the
populations but they carry no risk), and ancestry itself shifts the outcome's
prevalence (``--ancestry-logit``), so every ancestry-only marker is associated with
the outcome. The world (frequencies, causal and ancestry-only groups, effects) is
drawn from ``--world-seed``; each of ``--seeds`` draws new subjects of that world,
split 70 / 15 / 15 into train, tuning and held-out.

Rows, on the same dosages and the same split:

* ``ours``: ``encoders.sgl_path.regularization_path`` (adaptive weights, relaxed
  fits scored on the tuning split, the ``1se`` rule) adjusting for ``--pcs``
  principal components of the training dosages; AUROC of its relaxed logistic fit
  (the chosen groups plus the PC scores) on the held-out subjects.
* ``ours_unadjusted``: the same path without the ancestry adjustment.
* with several ``--rule`` (``1se``, ``min``, ``stability``), one ``ours_RULE`` and one
  ``ours_unadj_RULE`` row per rule.
* ``groupyr``: ``groupyr.LogisticSGLCV`` (l1_ratio 0.5, 20 strengths, 5-fold
  cross-validation on the train split), run in its own virtual environment
  (``.venv-sgl``, ``make bench-sgl`` builds it) on the same standardized dosages.

Columns: groups kept, precision / recall / F1 against the causal groups, ancestry-only
groups kept, held-out AUROC, fit seconds, and per row the mean pairwise Jaccard index
of the kept sets across seeds.

    make bench-sgl
    # = OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sgl_selection.py --seeds 0 1 2

``--cohort DIR ...`` instead runs the path exactly as training does (the preset's
settings) on simulator cohorts (``clinfuse simulate``) and scores the kept groups
against ``oracle_groups.parquet``:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sgl_selection.py \
        --rule 1se min stability --cohort runs/sim_w0_s0 runs/sim_w0_s1 ...

(a table of the rules side by side, with the stable groups' frequencies).
``--interaction`` adds, per rule, a ``RULE+gxe`` column: the same path with each
group's dosage x vitals/labs-risk columns (``path_interaction: timeseries``, the
environment cross-fitted as training does), which is how a modifier gene is found.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from clinfuse.datasets.datamodule import genotype_principal_axes
from clinfuse.datasets.spec import DataSpec
from clinfuse.encoders.genomics import group_selection_metrics
from clinfuse.encoders.sgl_path import (
    RULES,
    GenotypeDesign,
    path_group_names,
    refit_logistic,
    regularization_path,
)

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-sgl" / "bin" / "python"
PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "groupyr_peer.py"
SPLIT = (0.7, 0.15)  # train, tuning; the rest is held out


def draw_world(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Population frequencies (2, M), causal and ancestry-only groups, marker effects (M,)."""
    rng = np.random.default_rng(args.world_seed)
    m = args.groups * args.per_group
    p = rng.uniform(0.1, 0.5, m)
    a, b = p * (1 - args.fst) / args.fst, (1 - p) * (1 - args.fst) / args.fst
    freq = rng.beta(a, b, size=(2, m))  # (2, M)
    order = rng.permutation(args.groups)
    causal, ancestral = order[: args.causal], order[args.causal : args.causal + args.ancestry]
    for g in ancestral:
        cols = slice(g * args.per_group, (g + 1) * args.per_group)
        shift = args.ancestry_delta * rng.choice([-1.0, 1.0], args.per_group)
        freq[1, cols] = freq[0, cols] + shift
    freq = np.clip(freq, 0.02, 0.98)
    beta = np.zeros(m)
    for g in causal:
        cols = slice(g * args.per_group, (g + 1) * args.per_group)
        beta[cols] = rng.choice([-1.0, 1.0], args.per_group) / np.sqrt(args.per_group)
    return {"freq": freq, "causal": causal, "ancestral": ancestral, "beta": beta}


def draw_subjects(world: dict, n: int, ancestry_logit: float, seed: int, world_seed: int):
    """Dosages (N, M) float32, outcomes (N,) and the population of each subject."""
    rng = np.random.default_rng([world_seed, seed])
    pop = rng.integers(0, 2, n)
    x = rng.binomial(2, world["freq"][pop]).astype(np.float32)  # (N, M)
    p0 = world["freq"].mean(0)
    z = (x - 2 * p0) / np.sqrt(2 * p0 * (1 - p0))  # centred on the pooled frequencies
    logit = -1.0 + z @ world["beta"] + ancestry_logit * (pop - 0.5)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return x, y


def split_index(n: int, seed: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    a, b = int(SPLIT[0] * n), int((SPLIT[0] + SPLIT[1]) * n)
    return {"train": order[:a], "tuning": order[a:b], "held_out": order[b:]}


def make_spec(x_train: np.ndarray, args: argparse.Namespace) -> DataSpec:
    m = x_train.shape[1]
    mean = torch.from_numpy(x_train.mean(0)).double()
    calls = {
        "genotype": torch.from_numpy(x_train),
        "genotype_mask": torch.ones(x_train.shape),
        "genotype_present": torch.ones(x_train.shape[0], dtype=torch.bool),
    }
    return DataSpec(
        markers=[f"rs{i}" for i in range(m)],
        marker_groups=[i // args.per_group for i in range(m)],
        groups=[f"G{g:02d}" for g in range(args.groups)],
        marker_mean=mean.tolist(),
        marker_pcs=genotype_principal_axes(calls, mean.float(), max(args.pcs, 1)),
    )


def batch(x: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
    return {
        "genotype": torch.from_numpy(x),
        "genotype_mask": torch.ones(x.shape),
        "genotype_present": torch.ones(x.shape[0], dtype=torch.bool),
        "label": torch.from_numpy(y),
    }


def ours(
    spec: DataSpec, data: dict, pcs: int, rule: str = "1se"
) -> tuple[list[str], float, float, object]:
    """Our path: kept groups, held-out AUROC of the relaxed fit, seconds, the path."""
    start = time.perf_counter()
    path = regularization_path(spec, data["train"], data["tuning"], ancestry_pcs=pcs, rule=rule)
    design = GenotypeDesign.fit(
        spec, data["train"]["genotype"], data["train"]["genotype_mask"], pcs
    )
    keep = torch.tensor([spec.groups[g] in set(path.groups) for g in spec.marker_groups])
    x, cov = design.transform(data["train"]["genotype"], data["train"]["genotype_mask"])
    w = refit_logistic(torch.cat([x[:, keep], cov], 1), data["train"]["label"].double())
    seconds = time.perf_counter() - start
    xh, covh = design.transform(data["held_out"]["genotype"], data["held_out"]["genotype_mask"])
    score = torch.cat([xh[:, keep], covh], 1) @ w
    return path.groups, roc_auc_score(data["held_out"]["label"], score), seconds, path


def groupyr(spec: DataSpec, xs: dict, ys: dict, work: Path) -> tuple[list[str], float, float]:
    """groupyr's LogisticSGLCV in its own venv: kept groups, held-out AUROC, seconds."""
    if not PEER_PYTHON.is_file():
        raise SystemExit(f"{PEER_PYTHON} is missing: run `make bench-sgl` to build it")
    mean, sd = xs["train"].mean(0), xs["train"].std(0) + 1e-6
    arrays = {f"X_{s}": (xs[s] - mean) / sd for s in xs} | {f"y_{s}": ys[s] for s in ys}
    arrays["group"] = np.array(spec.marker_groups)
    np.savez(work / "dosages.npz", **arrays)
    cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), str(work / "dosages.npz"), str(work / "peer.json")]
    subprocess.run(cmd, check=True)
    result = json.loads((work / "peer.json").read_text())
    return [spec.groups[g] for g in result["selected"]], result["auroc"], result["seconds"]


def row(name: str, seed: int, kept: list[str], auc: float, secs: float, truth: dict) -> dict:
    m = group_selection_metrics(kept, truth["causal"])
    f1 = 2 * m["precision"] * m["recall"] / max(m["precision"] + m["recall"], 1e-12)
    return {"model": name, "seed": seed, "kept": sorted(kept), "n": len(kept), **m, "f1": f1,
            "ancestry_kept": len(set(kept) & set(truth["ancestral"])), "auroc": auc,
            "seconds": secs}  # fmt: skip


def jaccard(sets: list[list[str]]) -> float:
    pairs = list(itertools.combinations([set(s) for s in sets], 2))
    if not pairs:
        return float("nan")
    return float(np.mean([len(a & b) / max(len(a | b), 1) for a, b in pairs]))


def print_path(path, truth: dict) -> None:
    print(f"\nour path (first seed, {path.rule} rule, chosen lambda {path.lambda_:.3g}):")
    print(f"{'lambda':>9} {'kept':>4} {'precision':>9} {'recall':>6} {'tuning loss':>11}")
    for i, lam in enumerate(path.lambdas):
        m = group_selection_metrics(path.selected[i], truth["causal"])
        mark = "  <- chosen" if i == path.chosen else ""
        print(
            f"{lam:>9.3g} {path.n_selected[i]:>4d} {m['precision']:>9.2f} {m['recall']:>6.2f} "
            f"{path.tuning_loss[i]:>11.4f}{mark}"
        )
    if path.stability is not None:
        freq = dict(zip(truth["names"], path.stability["frequency"], strict=True))
        print(f"stable groups {path.groups}; frequencies: " + ", ".join(
            f"{g} {f:.2f}" for g, f in sorted(freq.items(), key=lambda kv: -kv[1]) if f > 0
        ))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--groups", type=int, default=20)
    ap.add_argument("--per-group", type=int, default=5)
    ap.add_argument("--causal", type=int, default=3)
    ap.add_argument("--ancestry", type=int, default=3, help="ancestry-only groups")
    ap.add_argument("--ancestry-delta", type=float, default=0.25)
    ap.add_argument("--ancestry-logit", type=float, default=1.0)
    ap.add_argument("--fst", type=float, default=0.05)
    ap.add_argument("--pcs", type=int, default=5)
    ap.add_argument("--world-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-peer", action="store_true", help="skip the groupyr row")
    ap.add_argument("--cohort", nargs="+", help="simulator cohorts: the preset's path on each")
    ap.add_argument(
        "--rule", nargs="+", default=["1se"], choices=RULES,
        help="how our path keeps groups; several give one row (one column with --cohort) each",
    )  # fmt: skip
    ap.add_argument(
        "--max-false", type=float, default=2.0,
        help="the stability rule's bound on expected false selections (path_max_false)",
    )  # fmt: skip
    ap.add_argument(
        "--interaction", action="store_true",
        help="with --cohort: also each rule with the gene x vitals/labs-risk columns",
    )  # fmt: skip
    args = ap.parse_args()
    if args.cohort:
        results = [
            cohort_path(c, args.pcs, args.rule, args.interaction, args.max_false)
            for c in args.cohort
        ]
        columns = [r + s for r in args.rule for s in (["", "+gxe"] if args.interaction else [""])]
        cohort_table(results, columns)
        return
    world = draw_world(args)
    names = [f"G{g:02d}" for g in range(args.groups)]
    truth = {k: [names[g] for g in world[k]] for k in ("causal", "ancestral")}
    truth["names"] = names
    print(f"causal groups: {sorted(truth['causal'])}; ancestry-only: {sorted(truth['ancestral'])}")
    rows = []
    for seed in args.seeds:
        x, y = draw_subjects(world, args.n, args.ancestry_logit, seed, args.world_seed)
        idx = split_index(args.n, seed)
        xs, ys = {s: x[i] for s, i in idx.items()}, {s: y[i] for s, i in idx.items()}
        spec = make_spec(xs["train"], args)
        data = {s: batch(xs[s], ys[s]) for s in idx}
        for rule in args.rule:
            name = "ours" if len(args.rule) == 1 else f"ours_{rule}"
            kept, auc, secs, path = ours(spec, data, args.pcs, rule)
            rows.append(row(name, seed, kept, auc, secs, truth))
            if seed == args.seeds[0]:
                print_path(path, truth)
        for rule in args.rule:
            name = "ours_unadjusted" if len(args.rule) == 1 else f"ours_unadj_{rule}"
            kept, auc, secs, _ = ours(spec, data, 0, rule)
            rows.append(row(name, seed, kept, auc, secs, truth))
        if not args.no_peer:
            with tempfile.TemporaryDirectory() as work:
                kept, auc, secs = groupyr(spec, xs, ys, Path(work))
            rows.append(row("groupyr", seed, kept, auc, secs, truth))
    print_table(rows)


def cohort_path(
    cohort: str, pcs: int, rules: list[str], interaction: bool = False, max_false: float = 2.0
) -> dict[str, dict]:
    """The preset's path on a simulator cohort's train and tuning splits, scored per rule
    (and per rule with the gene x vitals/labs-risk columns, ``RULE+gxe``)."""
    import polars as pl

    from clinfuse.datasets.datamodule import CohortDataModule, DataConfig
    from clinfuse.training.genotype_selection import timeseries_environment

    dm = CohortDataModule(cohort, DataConfig(genotype_pcs=pcs, image_size=32))
    dm.setup("fit")
    truth = pl.read_parquet(Path(cohort) / "oracle_groups.parquet").filter(pl.col("causal"))
    causal = {"causal": truth["group"].to_list(), "ancestral": []}
    roles = dict(zip(truth["group"], truth["role"], strict=True))
    out = {}
    env_seconds, environment = 0.0, None
    if interaction:
        start = time.perf_counter()
        *environment, info = timeseries_environment(dm)
        env_seconds = time.perf_counter() - start
        print(f"{cohort}: vitals/labs score AUROC {info['train_auroc']:.3f} (cross-fitted), "
              f"{env_seconds:.0f} s")  # fmt: skip
    runs = [(r, None) for r in rules]
    if interaction:
        runs = [(r + s, e) for r in rules for s, e in (("", None), ("+gxe", environment))]
    for name, env in runs:
        start = time.perf_counter()
        path = regularization_path(
            dm.spec, dm.datasets["train"].tensors, dm.datasets["tuning"].tensors,
            ancestry_pcs=pcs, rule=name.removesuffix("+gxe"),
            environment=None if env is None else tuple(env),
            stability={"max_false": max_false},
        )  # fmt: skip
        secs = time.perf_counter() - start + (env_seconds if env is not None else 0.0)
        r = row(name, 0, path.groups, float("nan"), secs, causal)
        r["missed"] = [f"{g} ({roles[g]})" for g in causal["causal"] if g not in path.groups]
        r["main_kept"] = all(g in path.groups for g in causal["causal"] if roles[g] == "main")
        out[name] = r
        print(
            f"{cohort} [{name}]: kept {r['n']} {r['kept']}, precision {r['precision']:.2f}, "
            f"recall {r['recall']:.2f}, missed {r['missed'] or 'none'}, {r['seconds']:.0f} s",
            flush=True,
        )
        if path.stability is not None:
            names = path_group_names(dm.spec.groups, path.interaction)
            freq = dict(zip(names, path.stability["frequency"], strict=True))
            print("    frequencies: " + ", ".join(
                f"{g} {f:.2f}" for g, f in sorted(freq.items(), key=lambda kv: -kv[1]) if f > 0
            ))  # fmt: skip
    return {"cohort": cohort, **out}


def cohort_table(results: list[dict], rules: list[str]) -> None:
    """Kept groups and precision / recall of every rule side by side, one cohort a row."""
    print("\n| cohort | " + " | ".join(rules) + " |")
    print("|---" * (len(rules) + 1) + "|")
    for res in results:
        cells = []
        for rule in rules:
            r = res[rule]
            cells.append(
                f"{r['n']} ({r['precision']:.2f} / {r['recall']:.2f})" if r["n"] else "none"
            )
        print(f"| {Path(res['cohort']).name} | " + " | ".join(cells) + " |")
    for rule in rules:
        rs = [res[rule] for res in results]
        print(
            f"{rule}: mean precision {np.mean([r['precision'] for r in rs]):.2f}, recall "
            f"{np.mean([r['recall'] for r in rs]):.2f}, empty {sum(r['n'] == 0 for r in rs)}, "
            f"main genes all kept {sum(r['main_kept'] for r in rs)}/{len(rs)}, "
            f"mean {np.mean([r['seconds'] for r in rs]):.1f} s"
        )


def print_table(rows: list[dict]) -> None:
    head = f"{'model':<16} {'seed':>4} {'kept':>4} {'prec':>5} {'recall':>6} {'F1':>5} "
    head += f"{'anc.':>4} {'AUROC':>6} {'s':>6}  kept groups"
    print("\n" + head)
    for r in rows:
        print(
            f"{r['model']:<16} {r['seed']:>4} {r['n']:>4} {r['precision']:>5.2f} "
            f"{r['recall']:>6.2f} {r['f1']:>5.2f} {r['ancestry_kept']:>4} {r['auroc']:>6.3f} "
            f"{r['seconds']:>6.1f}  {','.join(r['kept'])}"
        )
    print(
        f"\n{'model':<16} {'prec':>5} {'recall':>6} {'F1':>5} {'AUROC':>6} {'s':>6} {'Jaccard':>7}"
    )
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        mean = {k: np.mean([r[k] for r in mine]) for k in ("precision", "recall", "f1", "auroc")}
        secs = np.mean([r["seconds"] for r in mine])
        print(
            f"{name:<16} {mean['precision']:>5.2f} {mean['recall']:>6.2f} {mean['f1']:>5.2f} "
            f"{mean['auroc']:>6.3f} {secs:>6.1f} {jaccard([r['kept'] for r in mine]):>7.2f}"
        )


if __name__ == "__main__":
    main()
