from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clinfuse.scoring.parts import MANIFEST
from clinfuse.scoring.score import read_scores, score_cohort

pytestmark = pytest.mark.ray


@pytest.fixture
def local_ray():
    """A 2-CPU local Ray without dashboard or usage reporting, shut down afterwards."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_actor_pool_matches_the_local_path(scoring_run, tmp_path, local_ray):
    from clinfuse.scoring.ray_scoring import score_with_ray

    cohort = scoring_run.cohort
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    score_cohort(scoring_run.run_dir, cohort, local_out, chunk_size=30, progress=False)
    # A local run of the same plan stopped after chunk 0, then Ray finishes it: the resume
    # semantics are shared, so the first chunk must be skipped, not rescored.
    shutil.copytree(local_out, ray_out)
    for part in sorted(ray_out.glob("part-*.parquet"))[1:]:
        part.unlink()
    summary = score_with_ray(
        scoring_run.run_dir, cohort, ray_out, num_actors=2, chunk_size=30, resume=True,
        progress=False,
    )  # fmt: skip
    assert summary["chunks_skipped"] == 1 and summary["chunks_scored"] == 3
    assert (ray_out / MANIFEST).read_text() == (local_out / MANIFEST).read_text()
    local, remote = read_scores(local_out), read_scores(ray_out)
    assert remote.schema == local.schema and remote.height == local.height
    assert remote["subject_id"].to_list() == local["subject_id"].to_list()
    np.testing.assert_allclose(remote["risk"].to_numpy(), local["risk"].to_numpy(), atol=1e-6)
    same = pl.all().exclude("risk", "risk_raw", "ood_score", "top_modality_delta")
    assert remote.select(same).equals(local.select(same))
    assert not list(ray_out.glob(".part-*"))


def test_preflight_names_the_node_and_path_before_anything_is_written(
    scoring_run, tmp_path, local_ray, capsys
):
    """A cohort file a node cannot read, a GPU request no node can hold: one error each
    (exit 2), naming the node and path or resource, no output."""
    from clinfuse.cli import main

    cohort = Path(shutil.copytree(scoring_run.cohort, tmp_path / "cohort"))
    events = cohort / "events.parquet"
    events.write_bytes(events.read_bytes()[:100])  # the driver never opens it; the node does
    out = tmp_path / "scores"
    node = local_ray.get_runtime_context().get_node_id()[:12]

    def score(*extra: str, cohort: Path = cohort) -> str:
        argv = ["score", str(scoring_run.run_dir), "--cohort", str(cohort), "--out", str(out),
                "--ray-address", "auto", "--no-progress", *extra]  # fmt: skip
        assert main(argv) == 2
        return capsys.readouterr().err

    err = score()
    assert "clinfuse score: error: preflight: 1 problem(s) before any scoring task started" in err
    assert re.search(rf"node [\d.]+ \({node}\): cannot read {events} \(ArrowInvalid", err), err
    assert not out.exists()

    err = score("--gpus-per-actor", "0.5", cohort=scoring_run.cohort)
    assert "no alive node can hold one scoring task, which needs 1 CPU and 0.5 GPU" in err
    assert not out.exists()
