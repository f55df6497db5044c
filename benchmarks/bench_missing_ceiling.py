"""What missing modalities cost any model: the information ceiling per missing share.

For each cohort of ``bench_fusion.py --experiment missing`` (``MISSING_GRID``: films
missing for 25 / 50 / 75% of subjects, genotypes for 50 / 90%), a logistic regression
on the true latent factors each subject's data carries
(``simulation.oracle.observed_ceiling_scores``: a missing modality's factors zeroed,
one presence indicator per modality), fit on the train split and scored on the
held-out split, with a bootstrap 95% interval and its drop from the complete cohort.
A model's drop on the same cohorts minus the ceiling's drop is what it loses beyond
what the data lost. The ground truth, splits and presence come from the simulator
without charting events or rendering films (``sample_oracle``, ``sample_presence``),
so the whole table takes seconds; ``bench_fusion``'s ``ceiling_observed`` row computes
the same from the written cohorts.

The last columns are the same ceiling allowed to read each subject's site and ancestry
as well (``confounds``): what a model reading their proxies (the scanner in the film
features, the ancestry in the genotypes) can add on each cohort, which a model made not
to read them (``configs/demo.yaml``) gives up by design. ``--site-effect none`` draws
the cohorts without the site's link to the outcome, as ``bench_fusion``'s option.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_missing_ceiling.py --subjects 5000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fusion import MISSING_GRID  # noqa: E402

from clinfuse.evaluation.metrics import auroc, bootstrap_ci  # noqa: E402
from clinfuse.simulation.oracle import observed_ceiling_scores  # noqa: E402
from clinfuse.simulation.simulator import SimConfig, sample_oracle, sample_presence  # noqa: E402


def ceiling_row(
    cfg: SimConfig, n_bootstrap: int, confounds: tuple[str, ...] = ()
) -> dict[str, float]:
    """Held-out AUROC of the observed-data ceiling of the cohort ``cfg`` describes
    (reading ``confounds`` too, when given)."""
    oracle, presence = sample_oracle(cfg), sample_presence(cfg)
    present = {
        "image": presence["filmed"].to_numpy(),
        "genomics": presence["genotyped"].to_numpy(),
    }
    splits = presence.select("subject_id", "split")
    scores = observed_ceiling_scores(oracle, splits, present, confounds=confounds)
    y = scores["outcome"].to_numpy().astype(int)
    p = scores["observed_interaction"].to_numpy()
    low, high = bootstrap_ci(auroc, y, p, n_bootstrap)
    return {
        "auroc": auroc(y, p),
        "ci_low": low,
        "ci_high": high,
        "filmed": float(presence["filmed"].mean()),
        "genotyped": float(presence["genotyped"].mean()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0, help="cohort seed (bench_fusion uses 0)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument(
        "--missing-mode",
        choices=["informative", "random"],
        default="informative",
        help="film missingness, as bench_fusion's --missing-mode",
    )
    ap.add_argument(
        "--site-effect",
        choices=["normal", "none"],
        default="normal",
        help="link between site and outcome, as bench_fusion's --site-effect",
    )
    ap.add_argument("--bootstrap", type=int, default=500)
    args = ap.parse_args(argv)
    print(
        "| missing | share | ceiling AUROC [95% CI] | ceiling drop | filmed | genotyped "
        "| + site and ancestry [95% CI] | what they add |"
    )
    print("|---|---|---|---|---|---|---|---|")
    complete = None
    for modality, share in MISSING_GRID:
        cfg = SimConfig(
            n_subjects=args.subjects,
            image_size=args.image_size,
            seed=args.seed,
            image_missing=share if modality == "image" else 0.0,
            image_missing_mode=args.missing_mode,
            genotype_missing=share if modality == "genotypes" else 0.0,
            site_effect=args.site_effect,
            progress=False,
        )
        row = ceiling_row(cfg, args.bootstrap)
        told = ceiling_row(cfg, args.bootstrap, confounds=("site", "ancestry"))
        complete = row["auroc"] if complete is None else complete
        print(
            f"| {modality} | {share:g} | {row['auroc']:.3f} [{row['ci_low']:.3f}, "
            f"{row['ci_high']:.3f}] | {complete - row['auroc']:.3f} | {row['filmed']:.2f} | "
            f"{row['genotyped']:.2f} | {told['auroc']:.3f} [{told['ci_low']:.3f}, "
            f"{told['ci_high']:.3f}] | {told['auroc'] - row['auroc']:+.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
