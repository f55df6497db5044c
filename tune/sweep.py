"""A sweep: shared data and image features, the Tuner, resume, results and the best model.

``SWEEP_DIR/``
    base_config.yaml        the resolved RunConfig every trial starts from
    sweep.json              the sweep options (read back by ``--resume``)
    data_spec.yaml          the DataSpec fitted once on the train split
    cache/images/           decoded films, shared by all trials
    cache/embeddings/       frozen-backbone features, computed once before the Tuner starts
    ray/<name>/             Tune's experiment (default storage; ``storage_path`` moves it)
    asha_state.json         ASHA's rungs, read back by ``--resume`` (``tune.asha``)
    results.parquet         one row per trial, finished or not (``tune.results``)
    auroc_by_strategy.png   best validation AUROC of each trial by fusion strategy
    best/model              the best trial's exported artifact (``load_artifact``)
    .clinfuse.lock          while the sweep driver runs: its pid and host (``integrity.locks``)

Scheduling: ASHA stops weak trials at epochs ``grace_period * reduction_factor**k``;
Optuna (TPE, define-by-run over the conditional space) proposes trials, at most
``max_concurrent`` at a time.

Before anything is written, ``tune.preflight`` checks that the cluster can hold a
trial and that every node can read the cohort and write the shared folders.

Stopping (``tune.stops``): SIGINT (Ctrl-C) or SIGTERM pauses the sweep. Tune saves
its state, the sweep writes results.parquet with the unfinished trials marked
``interrupted`` or ``pending`` and raises ``SweepInterrupted``, whose message is the
``--resume`` command. A sweep where any trial ended in error raises ``SweepFailed``
after writing its results (and the best model, when a trial finished).
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from clinfuse.config import load_yaml, save_yaml, to_dict
from clinfuse.datasets.datamodule import CohortDataModule, save_spec
from clinfuse.datasets.schema import SPLITS
from clinfuse.encoders import create_encoder
from clinfuse.errors import InputError, IntegrityError, NotFoundError
from clinfuse.integrity.checksums import write_parquet
from clinfuse.integrity.locks import output_lock
from clinfuse.training.checkpoints import load_checkpoint
from clinfuse.training.config import RunConfig
from clinfuse.training.genotype_selection import (
    ENCODER,
    PATH_FILE,
    choose_genotype_groups,
    wants_genotype_path,
)
from clinfuse.training.module import RiskModule
from clinfuse.training.run import export_artifact, first_selected_epoch
from clinfuse.tune.asha import ResumableASHA
from clinfuse.tune.preflight import connect, preflight
from clinfuse.tune.results import (
    RESULTS_FILE,
    UNFINISHED,
    describe,
    load_trials,
    outcome,
    results_table,
)
from clinfuse.tune.space import define_by_run, get_space
from clinfuse.tune.stops import (
    StopSignals,
    SweepFailed,
    SweepInterrupted,
    failure_summary,
    resume_command,
    stopped_before_fit,
)
from clinfuse.tune.trainable import METRIC, SweepData, first_conv, train_fn, trial_config

OPTIONS_FILE = "sweep.json"
BASE_FILE = "base_config.yaml"
PLOT_FILE = "auroc_by_strategy.png"
ASHA_FILE = "asha_state.json"


@dataclass
class SweepOptions:
    """How a sweep runs.

    Attributes:
        space: search space name (``tune.space.SPACES``).
        num_samples: trials to run.
        max_concurrent: trials running at once (Optuna proposes no more).
        cpus_per_trial, gpus_per_trial: resources of one trial (fractional GPUs share one).
        address: None starts Ray in this process; "auto" or "ray://host:port" joins a cluster.
        num_cpus: CPUs of the in-process Ray (None = all of the machine).
        storage_path: local directory or object-store URI; None = ``SWEEP_DIR/ray``.
        name: experiment name under the storage path.
        grace_period: epochs every trial gets before ASHA may stop it.
        reduction_factor: ASHA keeps the top 1/reduction_factor at each rung.
        max_failures: retries of a failed trial (from its last checkpoint).
        seed: Optuna sampler seed.
    """

    space: str = "default"
    num_samples: int = 20
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    address: str | None = None
    num_cpus: int | None = None
    storage_path: str | None = None
    name: str = "sweep"
    grace_period: int = 1
    reduction_factor: int = 2
    max_failures: int = 2
    seed: int = 0


# ------------------------------------------------------------------------ prepare


def sweep_base_config(cfg: RunConfig, out: Path) -> dict[str, Any]:
    """The base config as a dict, with the decoded-image and embedding caches in the sweep.

    Every trial's ``timm_image`` points at one ``cache/embeddings`` and caches spatial
    tokens too, so attention trials with image tokens hit the same entries.
    """
    base = to_dict(cfg)
    if not base["data"].get("cache_dir"):
        base["data"]["cache_dir"] = str(out / "cache" / "images")
    image = base["model"]["encoders"].get("timm_image")
    if image is not None:
        image.setdefault("cache_dir", "")
        image["cache_dir"] = image["cache_dir"] or str(out / "cache" / "embeddings")
        image["cache_tokens"] = True
    return base


def prepare_data(base: dict[str, Any], out: Path) -> CohortDataModule:
    """Reads the cohort once, fits the DataSpec on train and builds every split's tensors."""
    cfg = trial_config(base, {})
    dm = CohortDataModule(cfg.cohort, cfg.data)
    dm.setup("fit")
    out.mkdir(parents=True, exist_ok=True)
    save_spec(dm.spec, out / "data_spec.yaml")
    return dm


def choose_sweep_genotype_groups(base: dict[str, Any], dm: CohortDataModule, out: Path) -> bool:
    """Runs the genotype path once on the driver when the base config asks for it.

    With ``model.encoders.sgl_mlp.select: path`` every trial reads the groups chosen on
    the base config's path (``keep_groups`` set in ``base``; the path goes to
    ``out/genotype_path.json``), as a single training run would. A resumed sweep's base
    already holds them and is left alone.

    Returns:
        True when ``base`` gained ``keep_groups``.
    """
    encoders = base["model"]["encoders"]
    if not wants_genotype_path(encoders) or encoders[ENCODER].get("keep_groups") is not None:
        return False
    path = choose_genotype_groups(encoders, dm, out)
    if path is not None:
        print(f"genotype path: {len(path['groups'])} marker groups kept for every trial")
    return path is not None


def warm_embedding_cache(base: dict[str, Any], dm: CohortDataModule) -> int:
    """One pass of the frozen backbone over every image of every split.

    Returns the number of images that went through the CNN (0 when the cache was
    already warm or the config has no cached image encoder).
    """
    image_cfg = base["model"]["encoders"].get("timm_image")
    if not image_cfg or not image_cfg.get("cache_dir"):
        return 0
    encoder = create_encoder("timm_image", spec=dm.spec, **{**image_cfg, "transfer": "frozen"})
    encoder.eval()
    counter = _ImageCounter()
    hook = first_conv(encoder).register_forward_hook(counter)
    with torch.no_grad():
        for split in SPLITS:
            for batch in dm.dataloader(split):
                encoder(batch)
    hook.remove()
    return counter.images


class _ImageCounter:
    """A forward hook counting the images that pass through a module."""

    def __init__(self) -> None:
        self.images = 0

    def __call__(self, module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        self.images += int(inputs[0].shape[0])


# -------------------------------------------------------------------------- tuner


def start_ray(opts: SweepOptions) -> None:
    """Joins ``opts.address`` or starts a local Ray in this process (no dashboard)."""
    import ray

    if ray.is_initialized():
        return
    if opts.address:
        connect(opts.address)  # one clear error when nothing answers there
    else:
        ray.init(num_cpus=opts.num_cpus, include_dashboard=False, log_to_driver=False)


def experiment_path(opts: SweepOptions) -> str:
    """Where Tune keeps the experiment (local path or URI)."""
    return f"{str(opts.storage_path).rstrip('/')}/{opts.name}"


def make_trainable(
    base: dict[str, Any], dm: CohortDataModule, opts: SweepOptions, image_probe: list[str]
) -> Any:
    """``train_fn`` with the sweep's data (path, config, DataSpec) and per-trial resources.

    ``image_probe``: images the driver read, which each trial checks on its node.
    """
    from ray import tune

    trainable = tune.with_parameters(
        train_fn, base_cfg=base, data=SweepData.of(dm), image_probe=list(image_probe)
    )
    return tune.with_resources(trainable, {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial})


def asha_grace_period(requested: int, base: dict[str, Any], max_epochs: int) -> int:
    """ASHA's grace period, at least past the epochs that model selection ignores.

    While an adversary ramps up (``model.adversary.ramp_epochs``) validation AUROC is
    lowered on purpose, and training keeps no checkpoint from those epochs
    (``optim.select_from_epoch``, ``training.run.selection_start``). ASHA must not
    compare trials there either: it would stop exactly the trials whose adversary acts.
    Nor in the epochs of ``optim.unimodal_epochs``, where only the auxiliary heads train.
    A trial that enables the adversary in the search space counts, so the base
    config's ramp applies whether or not the base enables it.
    """
    ramp = (base.get("model", {}).get("adversary") or {}).get("ramp_epochs")
    optim = base.get("optim") or {}
    start = first_selected_epoch(optim.get("select_from_epoch") or 0, ramp)
    start = max(start, optim.get("unimodal_epochs") or 0)  # before it the fused logit is untrained
    return min(max(requested, start + 1), max(max_epochs, 1))


def make_tuner(trainable: Any, max_epochs: int, opts: SweepOptions, asha_file: Path) -> Any:
    """A fresh Tuner: OptunaSearch behind a ConcurrencyLimiter, ASHA (its rungs kept in
    ``asha_file``), retries, checkpoints."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    # metric and mode go to the searcher and scheduler themselves: OptunaSearch with a
    # define-by-run space does not receive them through TuneConfig.
    searcher = OptunaSearch(
        space=define_by_run(get_space(opts.space)), metric=METRIC, mode="max", seed=opts.seed
    )
    scheduler = ResumableASHA(
        asha_file,
        time_attr="training_iteration",
        metric=METRIC,
        mode="max",
        max_t=max(max_epochs, 1),
        grace_period=min(opts.grace_period, max(max_epochs, 1)),
        reduction_factor=opts.reduction_factor,
    )
    tune_config = tune.TuneConfig(
        search_alg=ConcurrencyLimiter(searcher, max_concurrent=opts.max_concurrent),
        scheduler=scheduler,
        num_samples=opts.num_samples,
    )
    return tune.Tuner(trainable, tune_config=tune_config, run_config=_run_config(opts))


def _run_config(opts: SweepOptions) -> Any:
    from ray import tune

    return tune.RunConfig(
        name=opts.name,
        storage_path=opts.storage_path,
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=METRIC, checkpoint_score_order="max"
        ),
        verbose=1,
    )


def restore_tuner(path: str, trainable: Any) -> Any:
    """The interrupted experiment at ``path``: errored trials resume from their checkpoints."""
    from ray import tune

    if not tune.Tuner.can_restore(path):
        raise NotFoundError("no Tune experiment to resume", path, "run without --resume")
    _check_snapshot(path)
    return tune.Tuner.restore(path, trainable=trainable, resume_errored=True, restart_errored=False)


def _check_snapshot(path: str) -> None:
    """Refuses a torn experiment snapshot (local storage only).

    Tune copies its experiment state into the storage path without an atomic
    rename; a driver killed during that copy leaves a truncated file, and
    restoring from it would silently start a smaller sweep.
    """
    if "://" in path:
        return
    states = sorted(Path(path).glob("experiment_state-*.json"))
    if not states:
        return
    try:
        json.loads(states[-1].read_text())
    except ValueError as err:
        raise IntegrityError(
            "the experiment snapshot is torn (the sweep was killed while Tune wrote it)",
            states[-1],
            "it cannot be resumed; start the sweep again in a new --out",
        ) from err


# ------------------------------------------------------------------------ results


def plot_by_strategy(table: pl.DataFrame, path: Path) -> None:
    """Best validation AUROC of every trial, one column of points per fusion strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = table.filter(pl.col("best_val_auroc").is_not_null())
    if done.height == 0:
        return
    strategies = sorted(done["strategy"].unique().to_list())
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(strategies):
        y = done.filter(pl.col("strategy") == name)["best_val_auroc"].to_numpy()
        x = i + np.linspace(-0.12, 0.12, len(y)) if len(y) > 1 else np.full(len(y), i)
        ax.scatter(x, y, alpha=0.8)
        ax.hlines(y.max(), i - 0.25, i + 0.25, color="k", linewidth=1)
    ax.set_xticks(range(len(strategies)), strategies)
    ax.set_xlabel("fusion strategy")
    ax.set_ylabel("best validation AUROC")
    ax.set_title(f"{done.height} trials (line: best per strategy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------- export


def export_best(results: Any, base: dict[str, Any], dm: CohortDataModule, out: Path) -> dict:
    """Reloads the best trial's best checkpoint into a RiskModule and exports its artifact.

    Writes ``out/model`` (the artifact), ``out/config.yaml`` and ``out/summary.json``.
    The artifact's config drops the sweep's embedding cache path so it stays portable.
    """
    best = results.get_best_result(metric=METRIC, mode="max", scope="all")
    checkpoint = best.get_best_checkpoint(METRIC, "max")
    if checkpoint is None:
        raise RuntimeError(f"trial {best.path}: no checkpoint was reported; nothing to export")
    cfg = trial_config(base, best.config)
    module = RiskModule.create(cfg.model, dm.spec, cfg.optim)
    with checkpoint.as_directory() as folder:
        from clinfuse.tune.trainable import CHECKPOINT_FILE

        state = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
    module.load_state_dict(state["state_dict"])
    module.eval()
    out.mkdir(parents=True, exist_ok=True)
    portable = trial_config(_without_embedding_cache(base), best.config)
    save_yaml(portable, out / "config.yaml")
    path_file = out / PATH_FILE  # the genotype path every trial's genes came from
    genotype_path = json.loads(path_file.read_text()) if path_file.is_file() else None
    summary = export_artifact(module, dm, portable, out, genotype_path=genotype_path)
    summary.update(trial=best.metrics.get("trial_id"), config=best.config, **_best_score(best))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _best_score(best: Any) -> dict[str, Any]:
    history = best.metrics_dataframe
    return {"best_val_auroc": float(history[METRIC].max()), "epochs": int(len(history))}


def _without_embedding_cache(base: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(json.dumps(base))
    image = data["model"]["encoders"].get("timm_image")
    if image is not None:
        image["cache_dir"] = ""
    data["data"]["cache_dir"] = None
    return data


# ---------------------------------------------------------------------------- run


def run_sweep(
    cfg: RunConfig | None, out: str | Path, opts: SweepOptions, resume: bool = False
) -> pl.DataFrame:
    """Runs (or resumes) a sweep and writes results, plot and the best artifact to ``out``.

    Args:
        cfg: the base run config (ignored on resume: the sweep's saved one is used).
        out: the sweep directory.
        opts: sweep options (on resume only ``address``/``num_cpus`` are taken).
        resume: continue the interrupted sweep in ``out``.

    Returns the results table (one row per trial).

    Raises:
        PreflightError: no node can hold a trial, or a node cannot read the cohort or
            write the shared folders; nothing was written.
        SweepInterrupted: SIGINT or SIGTERM paused the sweep; results.parquet holds
            every trial so far and the message names the ``--resume`` command.
        SweepFailed: a trial ended in error; results.parquet is written, and the best
            model too when another trial finished.
        LockHeldError: another process is writing ``out``.
    """
    out = Path(out).resolve()
    # One sweep driver per directory; a directory the lock created is removed again
    # when the sweep writes nothing in it (a failed preflight, a bad option).
    with output_lock(out):
        return _run_sweep(cfg, out, opts, resume)


def _run_sweep(cfg: RunConfig | None, out: Path, opts: SweepOptions, resume: bool) -> pl.DataFrame:
    if resume:
        base, opts = _resume_dir(out), _read_options(out, opts)
    else:
        base, opts = _new_sweep(cfg, out, opts)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    start_ray(opts)
    with StopSignals() as stop:
        try:
            tuner, dm = _setup(base, out, opts, resume)
        except KeyboardInterrupt:
            raise SweepInterrupted(
                stopped_before_fit(out, resume), None, stop.signum or signal.SIGINT
            ) from None
        results = tuner.fit()
    return _finish(results, base, dm, out, opts, stop.signum)


def _setup(base: dict, out: Path, opts: SweepOptions, resume: bool) -> tuple[Any, Any]:
    """Preflight, then the sweep's files, data, embedding cache and Tuner."""
    cfg = trial_config(base, {})
    probe = preflight(
        cfg.cohort,
        _shared_dirs(out, opts),
        cfg.data.image_size,
        opts.cpus_per_trial,
        opts.gpus_per_trial,
        cluster=bool(opts.address),
        needs_images="timm_image" in base["model"]["encoders"],
    )
    if not resume:
        _write_sweep(out, base, opts)
    dm = prepare_data(base, out)
    if choose_sweep_genotype_groups(base, dm, out):
        save_yaml(base, out / BASE_FILE)  # resumed trials read the same genes
    warmed = warm_embedding_cache(base, dm)
    print(f"embedding cache: {warmed} images through the CNN before the sweep")
    trainable = make_trainable(base, dm, opts, probe)
    if resume:
        return restore_tuner(experiment_path(opts), trainable), dm
    max_epochs = int(base["optim"]["max_epochs"])
    grace = asha_grace_period(opts.grace_period, base, max_epochs)
    tuner = make_tuner(trainable, max_epochs, replace(opts, grace_period=grace), out / ASHA_FILE)
    return tuner, dm


def _shared_dirs(out: Path, opts: SweepOptions) -> list[str]:
    """Local folders trials on any node write to: the sweep's caches and Tune's storage."""
    storage = str(opts.storage_path)
    return [str(out)] + ([] if "://" in storage else [storage])


def _finish(
    results: Any, base: dict, dm: CohortDataModule, out: Path, opts: SweepOptions,
    signum: int | None,
) -> pl.DataFrame:  # fmt: skip
    table = results_table(load_trials(experiment_path(opts)), int(base["optim"]["max_epochs"]))
    write_parquet(table, out / RESULTS_FILE)  # with page checksums
    with pl.Config(tbl_rows=-1, tbl_cols=8, fmt_str_lengths=24):
        print(table.select("trial_id", "strategy", "best_val_auroc", "epochs", "status", "retries"))
    plot_by_strategy(table, out / PLOT_FILE)
    counts = outcome(table, opts.num_samples)
    if sum(counts[s] for s in (*UNFINISHED, "unsampled")):
        raise SweepInterrupted(
            f"sweep paused ({describe(counts)}); the trials so far are in "
            f"{out / RESULTS_FILE}. Continue with: {resume_command(out)}",
            table,
            signum or signal.SIGINT,
        )
    finished = counts["completed"] + counts["stopped"]
    if finished:
        summary = export_best(results, base, dm, out / "best")
        print(
            f"best trial {summary['trial']}: val AUROC {summary['best_val_auroc']:.3f}; "
            f"artifact in {out / 'best' / 'model'}"
        )
    if counts["error"]:
        raise SweepFailed(failure_summary(table, counts, finished, out), table)
    return table


def _new_sweep(cfg: RunConfig | None, out: Path, opts: SweepOptions) -> tuple[dict, SweepOptions]:
    """The base config and options of a new sweep (nothing written yet)."""
    if cfg is None or not cfg.cohort:
        raise InputError("cohort is not set", None, "pass --cohort DIR or cohort=DIR")
    opts = replace(opts, storage_path=opts.storage_path or str(out / "ray"))
    return sweep_base_config(cfg, out), opts


def _write_sweep(out: Path, base: dict[str, Any], opts: SweepOptions) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / ASHA_FILE).unlink(missing_ok=True)  # an earlier sweep's rungs are not this one's
    save_yaml(base, out / BASE_FILE)
    (out / OPTIONS_FILE).write_text(json.dumps(asdict(opts), indent=2))


def _resume_dir(out: Path) -> dict[str, Any]:
    """The interrupted sweep's base config (the one its trials were sampled against)."""
    path = out / BASE_FILE
    if not path.is_file():
        raise NotFoundError("no sweep to resume", path, "run without --resume")
    return load_yaml(path)


def _read_options(out: Path, given: SweepOptions) -> SweepOptions:
    """The interrupted sweep's options; only where it runs (address, local CPUs) may change."""
    saved = SweepOptions(**json.loads((out / OPTIONS_FILE).read_text()))
    saved.address = given.address or saved.address
    saved.num_cpus = given.num_cpus or saved.num_cpus
    return saved
