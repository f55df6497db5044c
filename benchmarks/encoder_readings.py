"""How well a trained fused model's encoders read their own true factor.

For each run, the held-out samples of the cohort go through the run's exported model
(``model/``), and each auxiliary risk head's logit (the risk one modality carries alone,
``model.aux_heads``; the model needs ``aux_weight > 0``) is correlated with the
simulator's factor that modality measures: the film with the lung disease, the
vitals/labs with the physiological severity, the genotypes with the genetic score (on
the samples where the modality is present). With a gene x environment term, its
modifier is correlated with the true carrier flag and with the modifier-group score.
``benchmarks/reader_ceiling.py`` gives the same correlations for linear readers of the
fixed features, told the truth or trained on the outcome: side by side, they say which
encoder reads its factor worse than the features allow.

    .venv/bin/python benchmarks/encoder_readings.py --cohort COHORT_DIR RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl
import torch

from clinfuse.datasets.samples import load_samples
from clinfuse.datasets.schema import ORACLE_FILE
from clinfuse.evaluation.evaluate import artifact_batches
from clinfuse.fusion.gene_environment import GENE_MODALITY
from clinfuse.training.artifact import load_artifact

FACTOR = {"image": "lung_disease", "timeseries": "physio_severity", "genomics": "genetic_score"}


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


@torch.no_grad()
def readings(run: Path, cohort: Path) -> dict[str, float]:
    """Held-out correlation of each auxiliary logit (and the term's modifier) with its factor."""
    art = load_artifact(run / "model")
    model = art.model.eval()
    if model.aux_heads is None:
        raise SystemExit(f"{run}: the model has no auxiliary heads (aux_weight 0)")
    samples = load_samples(cohort).filter(pl.col("split") == "held_out")
    aux, present, modifier = [], [], []
    for batch in artifact_batches(cohort, samples, art, run / "image_cache"):
        out = model(batch)
        logits, here = model.aux_logits(out)
        aux.append(logits.numpy())
        present.append(here.numpy())
        if model.gxe is not None and model.gene_environment_input == "dosages":
            genes = model.encoders[GENE_MODALITY].interaction_inputs(batch)  # the term's input
            modifier.append(model.gxe.modifier_score(genes).numpy())
    logits, here = np.concatenate(aux), np.concatenate(present)
    truth = samples.select("subject_id").join(
        pl.read_parquet(cohort / ORACLE_FILE), on="subject_id", how="left"
    )
    row = {}
    for i, m in enumerate(model.aux_heads):
        rows = here[:, i]
        row[m] = _corr(logits[rows, i], truth[FACTOR[m]].to_numpy()[rows])
    if modifier:
        score = np.concatenate(modifier)
        row["modifier ~ carrier"] = _corr(score, truth["modifier_carrier"].to_numpy().astype(float))
        row["modifier ~ modifier score"] = _corr(score, truth["modifier_score"].to_numpy())
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--cohort", required=True, type=Path, help="the simulated cohort the runs trained on"
    )
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (with model/)")
    args = ap.parse_args(argv)
    results = {run.name: readings(run, args.cohort) for run in args.runs}
    columns = list(dict.fromkeys(k for r in results.values() for k in r))
    print("| run | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in results.items():
        cells = [f"{row[c]:.3f}" if c in row else "" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
