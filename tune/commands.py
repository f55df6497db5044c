"""``clinfuse tune``: a Ray Tune sweep over fusion strategies and hyperparameters.

Exit status: 0 when every trial finished; 1 when a trial ended in error (with a
summary); 2 when the preflight found a problem (a ``UserError``, as for any bad
input); 130 (SIGINT) or 143 (SIGTERM) when the sweep was paused, with the
``--resume`` command that continues it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clinfuse.cli_options import (
    COHORT,
    CONFIG,
    OUT,
    OVERRIDES,
    RESUME,
    add_command,
    option,
    values_for,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "tune", _run, _OPTIONS)


_OPTIONS = [
    CONFIG(help="base YAML preset, e.g. configs/sweep.yaml"),
    COHORT,
    OUT(required=True, help="sweep directory"),
    option("--space", default="default", help="search space: default or tiny"),
    option("--num-samples", type=int, default=20, help="trials (20)"),
    option("--max-concurrent", type=int, default=2, help="trials at once (2)"),
    option("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (1)"),
    option("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, e.g. 0.25"),
    option("--num-cpus", type=int, help="CPUs of the local Ray (default: all)"),
    option("--address", help="join a Ray cluster: auto or ray://host:port"),
    option("--storage-path", help="experiment storage: dir or URI (SWEEP_DIR/ray)"),
    option("--name", default="sweep", help="experiment name (sweep)"),
    option("--grace-period", type=int, default=1, help="ASHA grace epochs (1)"),
    option("--max-failures", type=int, default=2, help="retries per trial (2)"),
    option("--seed", type=int, default=0, help="Optuna sampler seed (0)"),
    RESUME(help="continue the sweep in --out"),
    OVERRIDES(help="base config overrides"),
]


def _run(args: argparse.Namespace) -> int:
    """hyperparameter sweep with Ray Tune (ASHA + Optuna); exports the best model

    Sample fusion strategies and hyperparameters (search spaces in clinfuse.tune.space),
    train trials in parallel with ASHA early stopping, write SWEEP_DIR/results.parquet,
    auroc_by_strategy.png and the best trial's model artifact in SWEEP_DIR/best/model.
    Frozen-backbone image features are computed once and shared by all trials. Ctrl-C
    (or SIGTERM) pauses the sweep: results.parquet marks the unfinished trials and
    --resume continues them. Exits 1 when a trial ended in error, 2 when the preflight
    refused, 130/143 when paused.
    """
    from clinfuse.training.config import load_run_config
    from clinfuse.tune.stops import SweepError, SweepInterrupted, resume_command
    from clinfuse.tune.sweep import SweepOptions, run_sweep

    opts = SweepOptions(**values_for(args, SweepOptions))
    cfg = None
    if not args.resume:
        overrides = list(args.overrides) + ([f"cohort={args.cohort}"] if args.cohort else [])
        cfg = load_run_config(args.config, overrides)
    try:
        run_sweep(cfg, args.out, opts, resume=args.resume)
    except SweepInterrupted as err:  # a pause, not an error
        print(f"clinfuse tune: {err}", file=sys.stderr)
        return err.exit_code
    except SweepError as err:  # trials ended in error; a PreflightError is a UserError
        print(f"clinfuse tune: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C cut Tune's last save short
        print(
            "clinfuse tune: stopped at once; the sweep continues from Tune's last saved "
            f"state with: {resume_command(Path(args.out).resolve())}",
            file=sys.stderr,
        )
        return 130
    return 0
