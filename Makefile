# `make run`: set up .venv and train the embedded demo on 4 CPU processes.
# `make test`: set up .venv with every extra, lint, and run the test suite.
# Both are idempotent: the venv is only (re)installed when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Extras a GPU cluster installs (docker/Dockerfile installs exactly these); tests add dev.
CLUSTER_EXTRAS := mpi,deepspeed,megatron
TEST_EXTRAS := dev,$(CLUSTER_EXTRAS)
# constraints.txt pins torch==2.13.0 (the CPU wheel on this machine's disk) and the versions tested here.
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
PYTEST_ARGS ?=

export DS_ACCELERATOR := cpu
export TRITON_INTERPRET := 1

.PHONY: run test lint format clean setup setup-test cluster-tools

run: $(VENV)/.installed-run
	$(BIN)/sparsetron train

test: $(VENV)/.installed-test lint cluster-tools
	$(BIN)/python -m pytest -q --timeout=900 $(PYTEST_ARGS)

# The real-Slurm launch tests need Slurm and munge. As root with apt (CI), install them when missing;
# elsewhere say why those tests will be skipped. A failed install (no mirror) skips them too.
cluster-tools:
	@if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing slurm-wlm munge libpmix-dev for the real-Slurm tests"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge libpmix-dev >/dev/null 2>&1 \
	  || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	       slurm-wlm munge libpmix-dev >/dev/null 2>&1; } \
	  || echo "could not install Slurm: the real-Slurm tests will be skipped"; \
	else echo "Slurm is not installed and this is not root with apt: the real-Slurm tests will be skipped"; fi

lint: $(VENV)/.installed-test
	$(BIN)/ruff check sparsetron tests benchmarks
	$(BIN)/ruff format --check sparsetron tests benchmarks

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix sparsetron tests benchmarks
	$(BIN)/ruff format sparsetron tests benchmarks

setup: $(VENV)/.installed-run
setup-test: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: $(BIN)/python pyproject.toml constraints.txt
	$(PIP_INSTALL) -e .
	touch $@

# The test install is a superset of the run install, so it satisfies `make run` too.
$(VENV)/.installed-test: $(BIN)/python pyproject.toml constraints.txt
	$(PIP_INSTALL) -e '.[$(TEST_EXTRAS)]'
	touch $@ $(VENV)/.installed-run

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
