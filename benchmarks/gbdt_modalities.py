"""Gradient boosting on the fixed features of each subset of the modalities.

The ``gbdt_features`` row of ``bench_fusion.py`` reads all three modalities; this fits
the same peer (``evaluation.baseline``, the bench cohort's train split, early stopped on
tuning) on each single modality, on films and vitals/labs together (what is left when
genotypes are missing) and on all three, and scores each on the held-out split: the
peer's side of a comparison with a model that reads the same subset.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gbdt_modalities.py --subjects 5000 \\
        --site-effect none --out /work/bench/nosite_strat

Takes the options of ``bench_fusion.py`` that choose the cohort (``--subjects``,
``--site-effect``, ``--image-size``, ``--out``: the cohort is simulated there if absent),
and ``--input-size`` (the side the films are resized to before the frozen backbone).

``--settings LR:LEAVES ...`` fits the peer on all three modalities once per boosting
setting instead (learning rate and most leaves per tree, the rest as
``evaluation.baseline.BaselineConfig``): how much of a difference between two runs is
the peer's own settings. Its held-out scores are for reading, not for choosing a setting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fusion import (  # noqa: E402
    Variant,
    _context,
    _gbdt_image_source,
    _split_filter,
    parse_args,
    samples_and_spec,
)

from clinfuse.evaluation.baseline import BaselineConfig, fit_baseline  # noqa: E402
from clinfuse.evaluation.metrics import auroc, bootstrap_ci  # noqa: E402

SUBSETS = (
    ("image",),
    ("timeseries",),
    ("genomics",),
    ("image", "timeseries"),
    ("image", "timeseries", "genomics"),
)


def _setting(text: str) -> tuple[float, int]:
    try:
        rate, leaves = text.split(":")
        return float(rate), int(leaves)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--settings {text!r}: expected LEARNING_RATE:LEAVES, e.g. 0.05:15"
        ) from err


def main(argv: list[str] | None = None) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--settings", type=_setting, nargs="+", default=None)
    extra, rest = own.parse_known_args(argv)
    args = parse_args(rest)
    ctx = _context(args, args.subjects, Path(args.out))
    cohort = ctx.cohorts["train"]
    samples, spec, cfg = samples_and_spec(ctx, Variant("fusion_early"))
    image = _gbdt_image_source(ctx, spec, cfg)
    held = samples.filter(_split_filter("held_out"))
    y = held["label"].cast(int).to_numpy()
    if extra.settings:
        fits = [
            (f"{' + '.join(SUBSETS[-1])}; learning rate {rate:g}, {leaves} leaves", SUBSETS[-1],
             BaselineConfig(learning_rate=rate, max_leaf_nodes=leaves))
            for rate, leaves in extra.settings
        ]  # fmt: skip
    else:
        fits = [(" + ".join(subset), subset, None) for subset in SUBSETS]
    print("| modalities | held-out AUROC [95% CI] | boosting iterations |")
    print("|---|---|---|")
    for name, subset, settings in fits:
        source = image if "image" in subset else None
        fitted = fit_baseline(cohort, samples, spec, subset, source, settings)
        logit = fitted.logit(cohort, held)
        low, high = bootstrap_ci(auroc, y, logit, args.bootstrap)
        print(
            f"| {name} | {auroc(y, logit):.3f} [{low:.3f}, {high:.3f}] | {fitted.n_iter} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
