# Two commands: `make demo` (the whole chain on the CPU demo) and `make test`.
# Both create the virtual environment .venv and install the project into it if needed.
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PYTHON ?= python3
CORES ?= 2
# Test processes (pytest-xdist). Most tests wait on subprocesses (Snakemake jobs, SLURM, DVC), so two
# processes keep both cores busy; each process and its stages run torch on one thread (tests/conftest.py).
# One file runs in one process, so that the expensive module and session fixtures of a file are made
# once; the files go in the order of tests/conftest.py (the longest first).
TEST_WORKERS ?= 2
PYTEST := PATH=$(CURDIR)/$(BIN):$$PATH pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: setup demo test test-fast lint clean

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# Snakemake runs the chain (its jobs in parallel); `dvc commit` then records every output in dvc.lock
# and the DVC cache, so that `dvc status` is clean, `dvc push` carries the results and `dvc repro`
# has nothing to do.
demo: $(INSTALLED)
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake --profile workflow/profiles/default --cores $(CORES)
	PATH=$(CURDIR)/$(BIN):$$PATH dvc commit --force --quiet
	@echo "results: results/demo/metrics.json, results/demo/grid.png"

test: $(INSTALLED)
	$(PYTEST)

# The edit-test loop: everything but the whole-pipeline (e2e) and SLURM tests.
test-fast: $(INSTALLED)
	$(PYTEST) -m "not e2e and not slurm"

lint: $(INSTALLED)
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake --lint

clean:
	rm -rf results .snakemake
