"""What a trained model's logit is made of, in the simulator's true risk factors.

Regresses each run's held-out logits (``evaluation/predictions.parquet``) on the true
latent factors of the cohort's ``oracle.parquet`` (lung disease, physiological
severity, genetic score, physiology x modifier carrier, the site's term) by least
squares, and prints the coefficients beside the simulator's own (the same regression
of the true logit), each also relative to the physiology coefficient: a model that
reads a factor through a noisy encoder gives it a smaller weight than the truth does
(regression attenuation), and one that ignores a factor gives it none. With
``--filmed`` only subjects with a film at or before prediction time are kept, so the
image factor is compared where a film could show it.

    .venv/bin/python benchmarks/logit_decomposition.py --cohort COHORT_DIR RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl

from clinfuse.datasets.samples import latest_images
from clinfuse.datasets.schema import ORACLE_FILE
from clinfuse.evaluation.metrics import auroc

FACTORS = ("lung_disease", "physio_severity", "genetic_score", "physio_x_carrier", "site_term")
REFERENCE = "physio_severity"


def latents(cohort: Path) -> pl.DataFrame:
    """One row per subject: the true factors and the true logit."""
    oracle = pl.read_parquet(cohort / ORACLE_FILE)
    product = pl.col("physio_severity") * pl.col("modifier_carrier").cast(pl.Float64)
    return oracle.with_columns(product.alias("physio_x_carrier"))


def decompose(frame: pl.DataFrame, target: str) -> tuple[np.ndarray, float]:
    """Least-squares coefficients of ``target`` on ``FACTORS`` (with an intercept) and R^2."""
    x = np.column_stack(
        [frame[f].to_numpy().astype(np.float64) for f in FACTORS] + [np.ones(frame.height)]
    )
    y = frame[target].to_numpy().astype(np.float64)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    return coef[:-1], float(1.0 - resid.var() / y.var())


def rows(cohort: Path, runs: list[Path], filmed: bool) -> list[dict[str, object]]:
    truth = latents(cohort)
    out = []
    coef, r2 = decompose(truth, "true_logit")
    out.append(
        {
            "run": "truth (simulator)",
            "n": truth.height,
            "auroc": float("nan"),
            "coef": coef,
            "r2": r2,
        }
    )
    for run in runs:
        pred = pl.read_parquet(run / "evaluation" / "predictions.parquet")
        frame = pred.join(truth, on="subject_id")
        if frame.height != pred.height:
            raise SystemExit(
                f"{run}: {pred.height - frame.height} predictions have no oracle row in {cohort}"
            )
        if filmed:  # the sample's own latest film before prediction time, as the model reads it
            frame = frame.filter(latest_images(cohort, frame)["path"].is_not_null())
        coef, r2 = decompose(frame, "logit")
        score = auroc(frame["label"].cast(int).to_numpy(), frame["logit"].to_numpy())
        out.append({"run": run.name, "n": frame.height, "auroc": score, "coef": coef, "r2": r2})
    return out


def table(results: list[dict[str, object]]) -> str:
    ref = FACTORS.index(REFERENCE)
    head = "| run | n | AUROC | " + " | ".join(FACTORS) + " | R^2 |"
    lines = [head, "|" + "---|" * (len(FACTORS) + 4)]
    for r in results:
        coef = r["coef"]
        cells = [f"{c:+.2f} ({c / coef[ref]:.2f})" for c in coef]
        score = "" if np.isnan(r["auroc"]) else f"{r['auroc']:.3f}"
        lines.append(
            f"| {r['run']} | {r['n']} | {score} | " + " | ".join(cells) + f" | {r['r2']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--cohort", required=True, type=Path, help="the simulated cohort the runs trained on"
    )
    ap.add_argument(
        "--filmed", action="store_true", help="only subjects with a film before prediction time"
    )
    ap.add_argument(
        "runs", nargs="+", type=Path, help="run directories (with evaluation/predictions.parquet)"
    )
    args = ap.parse_args(argv)
    print(
        f"Coefficients on the true factors (in brackets: relative to {REFERENCE}); held-out subjects"
        + (", filmed only" if args.filmed else "")
        + "."
    )
    print(table(rows(args.cohort, args.runs, args.filmed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
