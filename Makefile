# A fresh clone needs only `make demo` and `make test`: both install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.clinfuse-installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

export RAY_USAGE_STATS_ENABLED := 0
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install demo test test-all lint bench bench-peers bench-sgl aces clean

install: $(STAMP)

# Re-runs only when the dependency files change; pip itself is quick when
# everything is already satisfied. constraints.txt holds the versions measured
# together on a CPU machine (torch 2.13.0 CPU build, torchvision 0.28.0).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23.2"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -c "import clinfuse, timm, pydicom, polars, ray, torch_geometric, pytorch_forecasting, concept_erasure, neuroCombat"
	touch $(STAMP)

demo: install
	$(BIN)/clinfuse demo --out $(DEMO_DIR)

test: install aces
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: install aces
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

bench: install
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

# PyPOTS pins versions that conflict with ours: the peer runs in its own venv,
# which this target builds (torch from the same on-disk wheel) before the benchmark.
PEERS_VENV := .venv-peers
$(PEERS_VENV)/.installed:
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet "torch==2.13.0" "pypots==1.5" scikit-learn
	touch $@

bench-peers: install $(PEERS_VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_timeseries.py $(BENCH_ARGS)

# ACES (es-aces) pins polars<2, which our polars pin excludes: `clinfuse labels --aces`
# runs its aces-cli from this venv (docs/meds.md).
ACES_VENV := .venv-aces
$(ACES_VENV)/.installed:
	test -x $(ACES_VENV)/bin/python || $(PYTHON) -m venv $(ACES_VENV)
	$(ACES_VENV)/bin/python -m pip install --quiet "es-aces==0.7.3" "polars==1.44.2"
	touch $@

aces: $(ACES_VENV)/.installed

# groupyr pins scikit-optimize and copt and needs scikit-learn < 1.6: the linear sparse-group-lasso peer of
# bench_sgl_selection.py runs in its own small venv (numpy and scikit-learn only).
SGL_VENV := .venv-sgl
$(SGL_VENV)/.installed:
	test -x $(SGL_VENV)/bin/python || $(PYTHON) -m venv $(SGL_VENV)
	$(SGL_VENV)/bin/python -m pip install --quiet "groupyr==0.3.4" "scikit-learn<1.6"  # groupyr calls _validate_data, gone in 1.6
	touch $@

bench-sgl: install $(SGL_VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_sgl_selection.py $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache build *.egg-info
