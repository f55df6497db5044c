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
"""

from __future__ import annotations

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

from clinfuse.evaluation.baseline import fit_baseline  # noqa: E402
from clinfuse.evaluation.metrics import auroc, bootstrap_ci  # noqa: E402

SUBSETS = (
    ("image",),
    ("timeseries",),
    ("genomics",),
    ("image", "timeseries"),
    ("image", "timeseries", "genomics"),
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = _context(args, args.subjects, Path(args.out))
    cohort = ctx.cohorts["train"]
    samples, spec, cfg = samples_and_spec(ctx, Variant("fusion_early"))
    image = _gbdt_image_source(ctx, spec, cfg)
    held = samples.filter(_split_filter("held_out"))
    y = held["label"].cast(int).to_numpy()
    print("| modalities | held-out AUROC [95% CI] | boosting iterations |")
    print("|---|---|---|")
    for subset in SUBSETS:
        fitted = fit_baseline(cohort, samples, spec, subset, image if "image" in subset else None)
        logit = fitted.logit(cohort, held)
        low, high = bootstrap_ci(auroc, y, logit, args.bootstrap)
        print(
            f"| {' + '.join(subset)} | {auroc(y, logit):.3f} [{low:.3f}, {high:.3f}] | "
            f"{fitted.n_iter} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
