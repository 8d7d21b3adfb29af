# Two commands: `make demo` (the whole chain on the CPU demo) and `make test`.
# Both create the virtual environment .venv and install the project into it if needed.
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PYTHON ?= python3
CORES ?= 2

.PHONY: setup demo test lint clean

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(INSTALLED)
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake --profile workflow/profiles/default --cores $(CORES)
	@echo "results: results/demo/metrics.json, results/demo/grid.png"

test: $(INSTALLED)
	PATH=$(CURDIR)/$(BIN):$$PATH pytest -q

lint: $(INSTALLED)
	PATH=$(CURDIR)/$(BIN):$$PATH snakemake --lint

clean:
	rm -rf results .snakemake
