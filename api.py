"""The Python API: simulate, open, train, evaluate and score, as the CLI does.

Re-exported by the package (``clinfuse.train`` ...). Each function imports the
heavy libraries (torch, Lightning) when called, so ``import clinfuse`` stays quick.
The command line calls these same functions (``training/commands.py``,
``training/demo.py``), so a notebook and a terminal run the same code.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clinfuse.errors import CohortError, InputError, NotFoundError, config_errors

if TYPE_CHECKING:
    import polars as pl

    from clinfuse.simulation.simulator import SimConfig

PathLike = str | Path


@dataclass(frozen=True)
class Cohort:
    """A cohort directory (``docs/cohort-format.md``) or a MEDS root with its label
    directory and sidecars (``docs/meds.md``); get one from ``Cohort.open`` or ``simulate``.

    Attributes:
        path: the cohort directory or MEDS root.
        labels: a MEDS root's label directory (None for a cohort directory).
        sidecars: a MEDS root's images/genotypes/markers folder (None: the root).
    """

    path: Path
    labels: Path | None = None
    sidecars: Path | None = None

    @classmethod
    def open(
        cls,
        path: PathLike,
        *,
        labels: PathLike | None = None,
        sidecars: PathLike | None = None,
        pixels: bool = False,
    ) -> Cohort:
        """Checks a cohort directory, or a MEDS root (detected by its ``data/`` and
        ``metadata/`` folders) with its labels and sidecars, and returns it.

        Args:
            path: the cohort directory or MEDS root.
            labels: a MEDS root's label directory.
            sidecars: a MEDS root's folder of images/genotypes/markers tables.
            pixels: also decode every DICOM film (slow); by default headers only, as
                training does.

        Raises:
            CohortError: listing every error (``.problems``); warnings do not raise.
        """
        from clinfuse.datasets.validate import validate_cohort

        cohort = cls(
            Path(path),
            Path(labels) if labels is not None else None,
            Path(sidecars) if sidecars is not None else None,
        )
        report = validate_cohort(cohort.source(), pixels=pixels)
        if not report.ok:
            n = len(report.errors)
            raise CohortError(
                f"the cohort breaks the contract ({n} error{'s' if n > 1 else ''})",
                path,
                "fix the files named, see docs/cohort-format.md or docs/meds.md",
                problems=[" ".join(str(p).split()) for p in report.errors],
            )
        return cohort

    @property
    def is_meds(self) -> bool:
        """Whether ``path`` is a MEDS root."""
        from clinfuse.datasets.meds import is_meds_root

        return is_meds_root(self.path)

    def source(self, data_config: Mapping[str, Any] | None = None) -> Any:
        """What the readers take: the directory, or a ``datasets.meds.MedsSource`` built
        with the MEDS options of ``data_config`` (a run's ``data`` section)."""
        from clinfuse.datasets.meds.source import cohort_for_model

        return cohort_for_model(self.path, self.labels, self.sidecars, dict(data_config or {}))

    def __fspath__(self) -> str:
        return str(self.path)


def _as_cohort(cohort: Cohort | PathLike | Any) -> Cohort:
    """A ``Cohort`` from a Cohort, a path, or a ``MedsSource``."""
    if isinstance(cohort, Cohort):
        return cohort
    if hasattr(cohort, "scan_table"):  # a datasets.meds.MedsSource
        return Cohort(cohort.root, cohort.labels, cohort.sidecars)
    return Cohort(Path(cohort))


@dataclass(frozen=True)
class Run:
    """A training run directory (``training/run.py`` lists its files).

    Attributes:
        path: the run directory.
        summary: ``summary.json``: best validation AUROC, epochs, temperature...
    """

    path: Path
    summary: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def load(cls, path: PathLike) -> Run:
        """Opens a run directory written by ``train``.

        Raises:
            NotFoundError: the directory holds no exported model (``model/``).
        """
        path = Path(path)
        if not (path / "model" / "artifact.json").is_file():
            raise NotFoundError(
                "no trained model in this run directory (model/artifact.json)",
                path,
                "pass a directory written by clinfuse.train or clinfuse train",
            )
        summary = path / "summary.json"
        return cls(path, json.loads(summary.read_text()) if summary.is_file() else {})

    @property
    def model_dir(self) -> Path:
        """The exported model artifact, ``path/model``."""
        return self.path / "model"

    def __fspath__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Report:
    """What ``evaluate`` wrote.

    Attributes:
        path: the evaluation directory.
        metrics: the content of ``metrics.json``.
    """

    path: Path
    metrics: dict[str, Any] = field(compare=False)

    @property
    def html(self) -> Path:
        """``report.html``: plots, subgroup tables, the confound audit."""
        return self.path / "report.html"

    @property
    def predictions(self) -> pl.DataFrame:
        """``predictions.parquet``: one row per evaluated sample (keys, label, risk, split)."""
        import polars as pl

        from clinfuse.evaluation.evaluate import PREDICTIONS_FILE

        return pl.read_parquet(self.path / PREDICTIONS_FILE)


def simulate(path: PathLike, subjects: int = 500, seed: int = 0, **sim_options: Any) -> Cohort:
    """Writes a synthetic cohort with known true risk (``oracle.parquet`` beside it).

    Args:
        path: the cohort directory to write.
        subjects: number of subjects.
        seed: draws the subjects (``world_seed`` draws the population).
        **sim_options: any other ``SimConfig`` field, e.g. ``image_size=32``,
            ``n_sites=4``, ``site_effect="reversed"``, ``progress=False``.

    Raises:
        InputError: an unknown option or a value out of range.
    """
    from clinfuse.simulation.simulator import SimConfig

    with config_errors(None, "see clinfuse.simulation.simulator.SimConfig"):
        try:
            cfg = SimConfig(n_subjects=subjects, seed=seed, **sim_options)
        except TypeError as err:  # an unknown keyword
            raise InputError(f"unknown simulator option ({err})") from err
    return simulate_config(path, cfg)


def simulate_config(path: PathLike, cfg: SimConfig) -> Cohort:
    """``simulate`` from a ``SimConfig`` (what ``clinfuse simulate`` builds)."""
    from clinfuse.simulation.simulator import simulate_cohort

    return Cohort(simulate_cohort(path, cfg))


def train(
    cohort: Cohort | PathLike | None,
    config: PathLike | None = "demo",
    *,
    run_dir: PathLike,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    resume: bool = False,
    ray_address: str | None = None,
    num_workers: int | None = None,
    gpus_per_worker: float | None = None,
    storage_path: str | None = None,
    max_failures: int | None = None,
    placement_strategy: str | None = None,
) -> Run:
    """Trains, calibrates and exports a model into ``run_dir``.

    With ``ray_address`` the same model trains data-parallel on that Ray cluster
    (``training.distributed``, ``docs/distributed.md``); without it, in this process.

    Args:
        cohort: the training cohort (its ``subject_splits`` give train and tuning);
            None takes ``cohort`` from the config.
        config: a preset shipped with the package (``"demo"``), a YAML path, or
            None for the defaults of ``RunConfig``.
        run_dir: the run directory to write.
        overrides: config fields by dotted path, ``{"optim.max_epochs": 2}`` or
            ``["optim.max_epochs=2"]``; ``{"model.encoders.timm_image": None}``
            drops that encoder.
        resume: continue from ``checkpoints/last.ckpt`` when it exists (on a cluster:
            from the Ray Train run's latest checkpoint).
        ray_address: a Ray cluster (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``).
        num_workers: data-parallel workers on the cluster (2); ``data.batch_size``
            is the global batch, split among them.
        gpus_per_worker: GPUs per worker (0: CPU with gloo; > 0: NCCL).
        storage_path: Ray Train's checkpoints and state: a shared directory or an
            object-store URI (default ``RUN_DIR/ray``).
        max_failures: worker-group restarts after a worker or node failure (3).
        placement_strategy: ``PACK`` (few nodes, the default) or ``SPREAD`` (one per node).

    Raises:
        InputError: a bad config or a cohort that breaks the contract; a cluster
            option without ``ray_address``.
        LockHeldError: another process is writing ``run_dir``.
    """
    from clinfuse.training.config import load_run_config
    from clinfuse.training.run import train as train_run

    cluster = {
        "num_workers": num_workers, "gpus_per_worker": gpus_per_worker,
        "storage_path": storage_path, "max_failures": max_failures,
        "placement_strategy": placement_strategy,
    }  # fmt: skip
    cluster = {k: v for k, v in cluster.items() if v is not None}
    if cluster and not ray_address:
        raise InputError(
            f"{', '.join(sorted(cluster))} need(s) a Ray cluster",
            fix="pass ray_address (--ray-address) too, or drop the cluster options",
        )
    cfg = load_run_config(config, override_items(overrides))
    if cohort is not None:
        chosen = _as_cohort(cohort)
        cfg.cohort = str(chosen.path)
        cfg.labels = str(chosen.labels) if chosen.labels is not None else cfg.labels
        cfg.sidecars = str(chosen.sidecars) if chosen.sidecars is not None else cfg.sidecars
    if ray_address:
        from clinfuse.training.distributed import RayTrainOptions, train_on_ray

        train_on_ray(cfg, run_dir, RayTrainOptions(ray_address, **cluster), resume=resume)
    else:
        train_run(cfg, run_dir, resume=resume)
    return Run.load(run_dir)


def evaluate(
    run: Run | PathLike,
    cohort: Cohort | PathLike,
    out: PathLike | None = None,
    *,
    split: str | None = None,
    bootstrap: int = 1000,
    baseline: bool = True,
    shifted: Cohort | PathLike | None = None,
    seed: int = 0,
) -> Report:
    """Metrics with bootstrap CIs, the confound audit, ``report.html`` and
    ``predictions.parquet`` for a run on a cohort.

    Args:
        run: the trained run.
        cohort: the cohort to evaluate on (the training cohort, or another one).
        out: output directory (default ``RUN/evaluation``).
        split: ``held_out`` (the default when present), ``tuning``, ``train`` or ``all``.
        bootstrap: bootstrap resamples for the confidence intervals.
        baseline: also fit the gradient-boosting baselines (as it comes, and given the
            default model's confound treatment) on the run's training split.
        shifted: a second cohort (e.g. the same world with the site or ancestry link to
            the outcome reversed) scored on every labelled sample;
            ``report.metrics["shift"]`` holds its AUROC and the drop.
        seed: seeds the bootstrap and the audit probes.
    """
    from clinfuse.evaluation.evaluate import evaluate as evaluate_run

    run_dir = Path(run)
    out_dir = Path(out) if out else run_dir / "evaluation"
    source = _as_cohort(cohort).source(_run_data_config(run_dir))
    metrics = evaluate_run(
        run_dir, source, out_dir, split, n_bootstrap=bootstrap, seed=seed,
        baseline=baseline, shifted=_shifted_source(shifted, run_dir),
    )  # fmt: skip
    return Report(out_dir, metrics)


def score(
    run: Run | PathLike,
    cohort: Cohort | PathLike,
    out: PathLike | None = None,
    **options: Any,
) -> pl.DataFrame:
    """Calibrated risk, OOD score and flags for every sample of a cohort.

    Args:
        run: the trained run (or its ``model/`` directory).
        cohort: the cohort to score (each labels.parquet row, or every subject at ``at``).
        out: a directory to keep the Parquet part files in (resumable, for large
            cohorts); None scores into a temporary directory removed afterwards.
        **options: ``scoring.score.score_cohort`` options, e.g. ``at=datetime(...)``,
            ``chunk_size``, ``workers``, ``target_prevalence``, ``progress=False``.

    Returns:
        Every scored row, read back through the checksum-verifying reader.
    """
    from clinfuse.scoring.score import read_scores, score_cohort

    source = _as_cohort(cohort).source(_artifact_data_config(run))
    if out is not None:
        score_cohort(Path(run), source, out, **options)
        return read_scores(out)
    with tempfile.TemporaryDirectory(prefix="clinfuse-score-") as tmp:
        score_cohort(Path(run), source, tmp, **options)
        return read_scores(tmp)


def _shifted_source(shifted: Cohort | PathLike | None, run_dir: Path) -> Any:
    """The shifted cohort of ``evaluate`` as the readers take it (None when not given)."""
    if shifted is None:
        return None
    return _as_cohort(shifted).source(_run_data_config(run_dir))


def _run_data_config(run: Run | PathLike) -> dict[str, Any]:
    """The ``data`` section of a run's resolved ``config.yaml`` ({} when absent)."""
    from clinfuse.config import load_yaml

    path = Path(run) / "config.yaml"
    return dict(load_yaml(path).get("data") or {}) if path.is_file() else {}


def _artifact_data_config(model: Run | PathLike) -> dict[str, Any]:
    """The data config recorded in a model artifact ({} when unreadable: scoring then
    reports the artifact's problem itself)."""
    from clinfuse.scoring.score import resolve_artifact_dir
    from clinfuse.training.artifact import META

    try:
        meta = json.loads((resolve_artifact_dir(Path(model)) / META).read_text())
    except (OSError, ValueError):
        return {}
    return dict(meta.get("data_config") or {})


def override_items(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``key=value`` items from a mapping of typed values or a list of items.

    Mapping values are written as JSON, which the override parser (YAML) reads back
    unchanged: ``None`` -> null, ``[16]`` -> [16], ``"gated"`` -> gated.
    """
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise InputError(f"overrides {overrides!r}: expected a dict or a list of key=value")
    if isinstance(overrides, Mapping):
        return [f"{k}={json.dumps(v, default=str)}" for k, v in overrides.items()]
    return [str(item) for item in overrides]
