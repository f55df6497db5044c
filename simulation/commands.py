"""``clinfuse simulate``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="write a synthetic cohort (Parquet + DICOM) with known true risk",
        description="Write a synthetic ICU cohort in the clinfuse cohort contract, with "
        "real DICOM files and oracle.parquet (true risk, latent factors) beside it. "
        "The population (sites, scanners, allele frequencies, causal genes) comes from "
        "--world-seed, the subjects from --seed: a test cohort of the same world uses "
        "another --seed with the same --world-seed.",
    )
    p.add_argument("--out", required=True, help="cohort directory to create")
    p.add_argument(
        "--subjects", dest="n_subjects", type=int, default=500, help="number of subjects (500)"
    )
    p.add_argument(
        "--sites",
        dest="n_sites",
        type=int,
        default=3,
        choices=range(1, 10),
        metavar="1-9",
        help="hospital sites, 1-9 (3)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the subjects (0)")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the population (0)")
    p.add_argument("--image-size", type=int, default=128, help="film side in pixels (128)")
    p.add_argument(
        "--site-effect",
        choices=("normal", "reversed", "none"),
        default="normal",
        help="link between site and risk: as in training, reversed, or removed (normal)",
    )
    p.add_argument(
        "--ancestry-effect",
        choices=("normal", "reversed", "none"),
        default="none",
        help="a non-genetic link between ancestry and risk (a shortcut the genotypes "
        "reveal): present, reversed, or absent (none)",
    )
    p.add_argument(
        "--new-site",
        action="store_true",
        help="add the world's held-back site (never in training; its subjects are held_out)",
    )
    p.add_argument("--ancestries", dest="n_ancestries", type=int, default=3, help="(3)")
    p.add_argument("--fst", type=float, default=0.08, help="Balding-Nichols Fst (0.08)")
    p.add_argument("--groups", dest="n_groups", type=int, default=20, help="marker genes (20)")
    p.add_argument("--markers-per-group", type=int, default=10, help="(10)")
    p.add_argument("--causal-groups", dest="n_causal_groups", type=int, default=4, help="(4)")
    p.add_argument("--missing-call-rate", type=float, default=0.02, help="(0.02)")
    p.add_argument(
        "--image-missing", type=float, default=0.15, help="share of subjects with no film (0.15)"
    )
    p.add_argument(
        "--image-missing-mode",
        choices=("random", "informative"),
        default="random",
        help="random, or informative: sicker subjects are filmed more often (random)",
    )
    p.add_argument(
        "--genotype-missing",
        type=float,
        default=0.0,
        help="share of subjects never genotyped (0)",
    )
    p.add_argument("--horizon-hours", type=float, default=48.0, help="outcome horizon (48)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument(
        "--report",
        action="store_true",
        help="print the oracle AUROC and per-modality ceilings (logistic regressions "
        "on the latent factors)",
    )

    def run(args: argparse.Namespace) -> int:
        from clinfuse.simulation.simulator import main

        return main(args)

    p.set_defaults(func=run)
