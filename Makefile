# Set-up and entry points. `make run` and `make test` are the README's two commands.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default. On a GPU cluster pick the CUDA build, e.g.
#   make setup TORCH_SPEC=torch==2.13.0 TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"
# On a machine whose pip would pull the multi-GB CUDA wheel for a CPU-only box, use
#   TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
CORES ?= 2
PROFILE ?=
SNAKEMAKE_ARGS ?=
# pytest-xdist workers for `make test` (0 = one process); each worker runs whole test modules, so
# a module's fixtures are built once, and torch uses one thread per worker (tests/conftest.py).
# One more than the cores: the worker running the SLURM modules mostly waits on the scheduler.
TEST_WORKERS ?= $(shell echo $$(( $(CORES) + 1 )))

.PHONY: setup run test lint bench clean

$(BIN)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev,download]"
	# img2dataset declares pandas<3; it runs with the lock's pandas 3.1.1 (pyproject.toml, download)
	$(BIN)/python -m pip install -q -c requirements.lock --no-deps img2dataset
	touch $@

setup: $(BIN)/.installed

# The main job: the whole DAG on the embedded default (config/config.yaml).
run: setup
	$(BIN)/snakemake --cores $(CORES) $(if $(PROFILE),--profile $(PROFILE)) $(SNAKEMAKE_ARGS) all

# The test suite, with the system tools it needs (Java for pycocoevalcap, TeX, a local SLURM).
# The local SLURM runs for the whole session: Snakemake's SLURM executor plugin runs
# `scontrol show config` whenever snakemake starts, which blocks ~9 s while SLURM is installed
# but its controller is down — on each of the suite's many snakemake calls.
test: setup
	bash scripts/install_system_deps.sh
	started=0; \
	if command -v slurmctld >/dev/null && ! bash scripts/slurm_local.sh status >/dev/null 2>&1; then \
	    bash scripts/slurm_local.sh start && started=1 || true; \
	fi; \
	$(BIN)/python -m pytest -q -ra --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; \
	if [ $$started = 1 ]; then bash scripts/slurm_local.sh stop; fi; \
	exit $$rc

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf results .snakemake
