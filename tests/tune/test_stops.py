"""How a sweep stops: a pause on SIGINT/SIGTERM, an error summary, a failed preflight,
a trial that cannot read its images, and ASHA's rungs across ``--resume``."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import yaml
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from clinfuse.config import from_dict
from clinfuse.simulation.simulator import SimConfig, simulate_cohort
from clinfuse.training.config import RunConfig
from clinfuse.tune.asha import ResumableASHA
from clinfuse.tune.preflight import PreflightError, check_node, cohort_files, shared_markers
from clinfuse.tune.results import UNFINISHED
from clinfuse.tune.sweep import (
    RESULTS_FILE,
    SweepFailed,
    SweepOptions,
    run_sweep,
)

TINY = {
    "seed": 0,
    "data": {"batch_size": 32, "image_size": 32, "max_steps": 16},
    "model": {
        "encoders": {
            "timm_image": {"model_name": "efficientnet_lite0", "embed_dim": 8},
            "gru_d": {"hidden": 8, "embed_dim": 8},
            "sgl_mlp": {"hidden": [8], "embed_dim": 8},
        },
        "fusion": {"name": "attention", "cfg": {"dim": 16, "heads": 2}},
    },
    "optim": {"max_epochs": 2, "patience": 2, "progress_bar": False, "accelerator": "cpu"},
}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stops") / "cohort"
    cfg = SimConfig(
        n_subjects=100, image_size=32, n_groups=5, markers_per_group=4, n_causal_groups=2,
        progress=False,
    )  # fmt: skip
    return simulate_cohort(out, cfg)


@pytest.fixture
def ray_local(monkeypatch):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    yield
    ray.shutdown()


def _config(cohort: Path) -> RunConfig:
    return from_dict(RunConfig, {**TINY, "cohort": str(cohort)})


# ------------------------------------------------------------------------ ASHA


def _asha(cls, **extra):
    return cls(
        time_attr="training_iteration", metric="val_auroc", mode="max", max_t=4,
        grace_period=1, reduction_factor=2, **extra,
    )  # fmt: skip


def _report(scheduler, trial_id: str, epoch: int, score: float) -> str:
    trial = SimpleNamespace(trial_id=trial_id)
    return scheduler.on_trial_result(None, trial, {"training_iteration": epoch, "val_auroc": score})


@pytest.mark.parametrize("cls", [ASHAScheduler, ResumableASHA])
def test_asha_rungs_survive_the_pickled_copy_a_resume_gets(cls, tmp_path: Path) -> None:
    extra = {"state_file": tmp_path / "asha.json"} if cls is ResumableASHA else {}
    scheduler = _asha(cls, **extra)
    saved_at_start = pickle.dumps(scheduler)  # what Tune keeps in tuner.pkl
    for i, score in enumerate([0.6, 0.7, 0.8, 0.9]):  # each above the rung so far
        scheduler.on_trial_add(None, SimpleNamespace(trial_id=f"t{i}"))
        assert _report(scheduler, f"t{i}", 1, score) == TrialScheduler.CONTINUE
    # The sweep resumes: Tune restores the copy pickled at the start.
    restored = pickle.loads(saved_at_start)
    restored.on_trial_add(None, SimpleNamespace(trial_id="weak"))
    action = _report(restored, "weak", 1, 0.1)
    # Rung 1 holds 0.6..0.9 (cutoff 0.75): a 0.1 stops. Plain ASHA forgot the rung.
    expected = TrialScheduler.STOP if cls is ResumableASHA else TrialScheduler.CONTINUE
    assert action == expected


# ------------------------------------------------------------------- preflight


def test_check_node_names_each_path_it_cannot_use(cohort: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(cohort, tmp_path / "cohort"))
    files = cohort_files(copy)
    assert str(copy / "labels.parquet") in files
    (copy / "labels.parquet").unlink()
    film = next((copy / "images").rglob("*.dcm"))
    film.write_bytes(b"not a DICOM file")
    with shared_markers([tmp_path / "shared"]) as markers:
        # Another node's view of the folder: the driver's marker is not there.
        elsewhere = {str(tmp_path / "elsewhere" / Path(m).name): t for m, t in markers.items()}
        problems = check_node(files, [str(film)], {**markers, **elsewhere}, 32)
    assert len(problems) == 3, problems
    assert f"cannot read {copy / 'labels.parquet'} (FileNotFoundError" in problems[0]
    assert f"cannot read image {film}" in problems[1]
    assert f"does not see the driver's {tmp_path / 'elsewhere'}" in problems[2]
    assert all(p.startswith("this machine: ") for p in problems)
    assert not (tmp_path / "shared").exists()  # created for the check, removed after


def test_preflight_refuses_before_writing_anything(cohort: Path, tmp_path: Path, ray_local) -> None:
    out = tmp_path / "sweep"
    gpus = SweepOptions(space="tiny", num_samples=2, num_cpus=1, gpus_per_trial=0.25)
    with pytest.raises(PreflightError, match=r"needs 1 CPU and 0.25 GPU .* 1 CPU, 0 GPU"):
        run_sweep(_config(cohort), out, gpus)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    storage = SweepOptions(
        space="tiny", num_samples=2, num_cpus=1, storage_path=str(blocker / "ray")
    )
    with pytest.raises(PreflightError, match=f"driver.*cannot write {blocker}/ray .*NotADirectory"):
        run_sweep(_config(cohort), out, storage)
    hidden = Path(shutil.copytree(cohort, tmp_path / "hidden"))
    shutil.rmtree(hidden / "images")
    with pytest.raises(
        PreflightError,
        match=r"driver\): none of 8 sampled images .*00.dcm \(DicomReadError: cannot open",
    ):
        run_sweep(_config(hidden), out, SweepOptions(space="tiny", num_samples=2, num_cpus=1))
    assert not out.exists()


# ---------------------------------------------------------- lost images, errors


@pytest.mark.ray
def test_trial_that_cannot_read_its_images_fails_and_the_sweep_says_so(
    cohort: Path, tmp_path: Path, ray_local, monkeypatch
) -> None:
    import clinfuse.tune.sweep as sweep_module

    copy = Path(shutil.copytree(cohort, tmp_path / "cohort"))
    real_warm = sweep_module.warm_embedding_cache

    def warm_then_hide_images(base, dm):
        n = real_warm(base, dm)
        # After the driver prepared the data, the images vanish from the trials'
        # view, as on a node that does not mount the cohort.
        (copy / "images").rename(copy / "images-elsewhere")
        return n

    monkeypatch.setattr(sweep_module, "warm_embedding_cache", warm_then_hide_images)
    out = tmp_path / "sweep"
    opts = SweepOptions(space="tiny", num_samples=2, max_concurrent=2, num_cpus=2, max_failures=0)
    with pytest.raises(SweepFailed, match="2 of 2 trials ended in error") as failed:
        run_sweep(_config(copy), out, opts)
    message = str(failed.value)
    assert "no trial finished, so no model was exported" in message
    assert "unreadable here" in message and "images" in message
    table = pl.read_parquet(out / RESULTS_FILE)
    assert table.equals(failed.value.table)
    assert table.height == 2 and (table["status"] == "error").all()
    assert (table["failures"] == 1).all() and (table["retries"] == 0).all()
    assert table["error"].str.contains("without its image modality").all()
    assert not (out / "best").exists()


# ------------------------------------------------------------------ Ctrl-C


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "clinfuse.cli", "tune", *args]


def _wait_for_a_result(out: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not list((out / "ray" / "sweep").glob("*/result.json")):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)


def _start(cohort: Path, tmp_path: Path, samples: int) -> tuple[subprocess.Popen, Path, Path]:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out, log = tmp_path / "sweep", tmp_path / "tune.log"
    args = ["--config", str(config), "--cohort", str(cohort), "--out", str(out),
            "--space", "tiny", "--num-samples", str(samples), "--max-concurrent", "3",
            "--num-cpus", "2"]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _cli(args), cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    return proc, out, log


def _stop(proc: subprocess.Popen, signum: int) -> int:
    proc.send_signal(signum)  # the driver alone, as a terminal's Ctrl-C or a scheduler would
    try:
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.ray
def test_ctrl_c_pauses_the_sweep_and_names_the_resume_command(cohort: Path, tmp_path: Path) -> None:
    # 2 CPUs, 3 trials at once, 6 in all: at the first result most are still to run.
    proc, out, log = _start(cohort, tmp_path, samples=6)
    _wait_for_a_result(out, proc, log)
    code = _stop(proc, signal.SIGINT)
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert f"Continue with: clinfuse tune --out {out} --resume" in text
    table = pl.read_parquet(out / RESULTS_FILE)
    assert 1 <= table.height <= 6 and table["trial_id"].n_unique() == table.height
    unfinished = table["status"].is_in(UNFINISHED).sum() + 6 - table.height
    assert unfinished >= 1, table
    assert "sweep paused (6 trials: " in text
    assert table["status"].is_in(["completed", "stopped", *UNFINISHED]).all(), table
    assert not (out / "best").exists()  # the best model waits for the whole sweep


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_pauses_and_resume_runs_every_trial_once(cohort: Path, tmp_path: Path) -> None:
    proc, out, log = _start(cohort, tmp_path, samples=6)
    _wait_for_a_result(out, proc, log)
    assert _stop(proc, signal.SIGTERM) == 143, log.read_text()[-3000:]
    paused = pl.read_parquet(out / RESULTS_FILE)
    rungs = (out / "asha_state.json").read_text()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    resumed = subprocess.run(
        _cli(["--out", str(out), "--resume"]), cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=900, start_new_session=True,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    table = pl.read_parquet(out / RESULTS_FILE)
    assert table.height == 6 and table["trial_id"].n_unique() == 6
    assert set(table["status"]) <= {"completed", "stopped"}
    # Trials that finished before the pause are not run again; ASHA kept their scores.
    epochs = dict(table.select("trial_id", "epochs").iter_rows())
    for trial_id, status, n in paused.select("trial_id", "status", "epochs").iter_rows():
        if status in ("completed", "stopped"):
            assert epochs[trial_id] == n
        if n > 0:
            assert trial_id in rungs
    assert (out / "best" / "model" / "artifact.json").is_file()
