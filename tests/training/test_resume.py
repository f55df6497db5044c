"""SIGKILL during training, then --resume: the run ends where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.batch_size=32", "data.image_size=32", "data.max_steps=32",
        "model.encoders={timm_image: {embed_dim: 8}, gru_d: {hidden: 8, embed_dim: 8}, sgl_mlp: {embed_dim: 8, hidden: [8]}}",
        "model.fusion.cfg={dim: 8, heads: 2}", "optim.max_epochs=4", "optim.patience=10",
        "optim.progress_bar=false"]  # fmt: skip


def _train_cmd(cohort: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "clinfuse.cli", "train", "--config", str(ROOT / "configs" / "demo.yaml"),
            "--cohort", str(cohort), "--run-dir", str(run_dir), *extra, *TINY]  # fmt: skip


def _epoch_of(ckpt: Path) -> int | None:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001  (a checkpoint caught mid-write)
        return None


@pytest.mark.slow
# With the adversary's ramp over 2 epochs, the kill lands in an epoch that model
# selection skips (it still writes last.ckpt). With head_steps the adversary heads'
# own optimiser state must come back too, or the resumed weights differ.
@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["model.adversary.ramp_epochs=2"],
        ["model.adversary.head_steps=3"],
        ["optim.ema_decay=0.9"],  # the weight average must come back as well
        # Killed after the unimodal epoch: the resumed run lowers the encoders' rates
        # at the switch exactly once, as the uninterrupted one did.
        ["optim.unimodal_epochs=1", "optim.encoder_lr_after_unimodal=0.1"],
    ],
    ids=["plain", "ramp", "head_steps", "ema", "unimodal"],
)
def test_sigkill_then_resume_matches_uninterrupted_run(tiny_cohort, tmp_path, extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(
        _train_cmd(tiny_cohort, reference, *extra), check=True, env=env, capture_output=True
    )

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(tiny_cohort, killed, *extra), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if last.is_file() and _epoch_of(last) == 0:  # one epoch done, more to go
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    assert _epoch_of(last) is not None and _epoch_of(last) < 3

    subprocess.run(
        _train_cmd(tiny_cohort, killed, "--resume", *extra),
        check=True,
        env=env,
        capture_output=True,
    )
    ref = json.loads((reference / "summary.json").read_text())
    res = json.loads((killed / "summary.json").read_text())
    assert res["epochs"] == ref["epochs"]
    assert res["best_val_auroc"] == ref["best_val_auroc"]
    assert res["model_id"] == ref["model_id"]  # bit-identical exported weights
    # The epochs logged before the kill are kept beside the resumed log.
    assert (killed / "logs" / "metrics-before-resume-1.csv").is_file()
    if "model.adversary.ramp_epochs=2" in extra:  # best: trained at full adversary strength
        assert _epoch_of(killed / "checkpoints" / "best.ckpt") >= 2
        assert _epoch_of(reference / "checkpoints" / "best.ckpt") >= 2
