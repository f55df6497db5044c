"""``clinfuse simulate``."""

from __future__ import annotations

import argparse

from clinfuse.cli_options import NO_PROGRESS, OUT, add_command, option


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "simulate", _simulate, _OPTIONS)


def _simulate(args: argparse.Namespace) -> int:
    """write a synthetic cohort (Parquet + DICOM) with known true risk

    Write a synthetic ICU cohort in the clinfuse cohort contract, with real DICOM files
    and oracle.parquet (true risk, latent factors) beside it. The population (sites,
    scanners, allele frequencies, causal genes) comes from --world-seed, the subjects
    from --seed: a test cohort of the same world uses another --seed with the same
    --world-seed.
    """
    from clinfuse.simulation.simulator import main

    return main(args)


_EFFECTS = ("normal", "reversed", "none")

_OPTIONS = [
    OUT(required=True, help="cohort directory to create"),
    option("--subjects", dest="n_subjects", type=int, default=500,
           help="number of subjects (500)"),
    option("--sites", dest="n_sites", type=int, default=3, choices=range(1, 10), metavar="1-9",
           help="hospital sites, 1-9 (3)"),
    option("--seed", type=int, default=0, help="seed of the subjects (0)"),
    option("--world-seed", type=int, default=0, help="seed of the population (0)"),
    option("--image-size", type=int, default=128, help="film side in pixels (128)"),
    option("--site-effect", choices=_EFFECTS, default="normal",
           help="link between site and risk: as in training, reversed, or removed (normal)"),
    option("--ancestry-effect", choices=_EFFECTS, default="none",
           help="a non-genetic link between ancestry and risk (a shortcut the genotypes "
           "reveal): present, reversed, or absent (none)"),
    option("--new-site", action="store_true",
           help="add the world's held-back site (never in training; its subjects are held_out)"),
    option("--ancestries", dest="n_ancestries", type=int, default=3, help="(3)"),
    option("--fst", type=float, default=0.08, help="Balding-Nichols Fst (0.08)"),
    option("--groups", dest="n_groups", type=int, default=20, help="marker genes (20)"),
    option("--markers-per-group", type=int, default=10, help="(10)"),
    option("--causal-groups", dest="n_causal_groups", type=int, default=4, help="(4)"),
    option("--missing-call-rate", type=float, default=0.02, help="(0.02)"),
    option("--image-missing", type=float, default=0.15,
           help="share of subjects with no film (0.15)"),
    option("--image-missing-mode", choices=("random", "informative"), default="random",
           help="random, or informative: sicker subjects are filmed more often (random)"),
    option("--genotype-missing", type=float, default=0.0,
           help="share of subjects never genotyped (0)"),
    option("--horizon-hours", type=float, default=48.0, help="outcome horizon (48)"),
    NO_PROGRESS,
    option("--report", action="store_true",
           help="print the oracle AUROC and per-modality ceilings (logistic regressions on "
           "the latent factors)"),
]  # fmt: skip
