"""The public surface: ``import clinfuse`` is light, names resolve, inputs are checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import clinfuse
from clinfuse.api import override_items
from clinfuse.config import apply_overrides
from clinfuse.errors import InputError, NotFoundError, UserError

REPO = Path(__file__).resolve().parents[1]


def test_import_clinfuse_loads_no_torch_and_timm_still_imports():
    code = (
        "import sys, clinfuse; print('torch' in sys.modules); "
        "import timm; print(timm.create_model is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_all_names_resolve_and_are_documented():
    for name in clinfuse.__all__:
        obj = getattr(clinfuse, name)
        assert name == "__version__" or obj.__doc__, name
    page = (REPO / "docs" / "python-api.md").read_text()
    for name in ("simulate", "Cohort.open", "train", "Run.load", "evaluate", "score"):
        assert f"clinfuse.{name}(" in page, name


def test_dict_overrides_keep_their_types():
    wanted = {"a": {"b": None}, "c": [16], "d": "gated", "e": 1e-3, "f": True, "g": "runs/x.1"}
    items = override_items({"a.b": None, "c": [16], "d": "gated", "e": 1e-3, "f": True,
                            "g": "runs/x.1"})  # fmt: skip
    assert apply_overrides({}, items) == wanted
    assert override_items(["optim.lr=3e-4"]) == ["optim.lr=3e-4"]
    with pytest.raises(InputError, match="dict or a list"):
        override_items("optim.lr=3e-4")


def test_a_preset_name_reads_the_packaged_file():
    from clinfuse.training.config import load_run_config, preset_names

    assert "demo" in preset_names()
    assert load_run_config("demo") == load_run_config(REPO / "configs" / "demo.yaml")
    with pytest.raises(NotFoundError, match="'dem0'.*demo"):
        load_run_config("dem0")


def test_run_load_refuses_a_directory_without_a_model(tmp_path):
    with pytest.raises(NotFoundError, match="no trained model"):
        clinfuse.Run.load(tmp_path)


def test_simulate_names_an_unknown_option(tmp_path):
    with pytest.raises(InputError, match="n_sitez"):
        clinfuse.simulate(tmp_path / "c", subjects=10, n_sitez=2)
    with pytest.raises(InputError, match="image_size"):
        clinfuse.simulate(tmp_path / "c", subjects=10, image_size=8)


def test_cohort_open_lists_every_error_in_one_line(tmp_path):
    cohort = clinfuse.simulate(tmp_path / "c", subjects=40, seed=0, image_size=32,
                               progress=False)  # fmt: skip
    assert clinfuse.Cohort.open(cohort.path) == cohort
    labels = pl.read_parquet(cohort.path / "labels.parquet")
    labels.with_columns(boolean_value=pl.lit(None, pl.Boolean)).write_parquet(
        cohort.path / "labels.parquet"
    )
    (cohort.path / "markers.parquet").unlink()  # genotypes without their markers
    with pytest.raises(clinfuse.CohortError) as caught:
        clinfuse.Cohort.open(cohort.path)
    err = caught.value
    assert isinstance(err, UserError) and isinstance(err, ValueError)
    assert len(err.problems) >= 2
    assert any("labels.parquet:boolean_value" in p for p in err.problems)
    assert any("markers.parquet" in p for p in err.problems)
    message = str(err)
    assert "\n" not in message
    assert all(p in message for p in err.problems)


def test_the_default_preset_is_the_previous_one_with_the_measured_treatments():
    from clinfuse.training.config import load_run_config

    treated = [
        "model.encoders.timm_image.harmonize=combat",
        "model.confound_offsets=[site,ancestry]",
        "model.adversary.enabled=false",
        "model.encoders.sgl_mlp.path_interaction=timeseries",
        "model.encoders.sgl_mlp.path_max_false=1.0",
        "model.gene_environment=timeseries",
        "model.gene_environment_lr=10",
    ]
    assert load_run_config("demo") == load_run_config("adversary", treated)
