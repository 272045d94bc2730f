# The two commands a newcomer types (each sets up .venv first if needed):
#   make default   run the embedded default config (every figure, CPU, minutes); print the claims
#   make test      run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= all

XLA_VENV := .venv-xla
XLA_STAMP := $(XLA_VENV)/.installed

.PHONY: default test test-thorough test-slurm test-xla lint resume report bench clean help stale

help:
	@grep -E '^#   make' Makefile | sed 's/^#   //'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[workflow,dev]"
	touch $(STAMP)

default: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)
	@$(BIN)/python -m pipeline.claims results/claims.parquet

# Two pytest workers (a test file per worker, so module fixtures run once), then the tests that
# time the embedded default alone on the machine.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slurm and not xla and not serial" -n 2 --dist loadfile -q \
		--durations=15
	$(BIN)/python -m pytest -m "serial" -q --durations=5

# The property tests with many larger, freshly drawn examples (Hypothesis profile "thorough";
# make test runs them small and derandomized).
test-thorough: $(STAMP)
	HYPOTHESIS_PROFILE=thorough $(BIN)/python -m pytest -q --hypothesis-show-statistics \
		tests/test_properties_*.py

# A real single-node SLURM cluster (installs Debian's slurm packages; needs root): the tiny config
# through the shipped profiles/slurm on a 2-CPU node, a training job stopped and resumed, compared
# with a local run; stops the daemons it started (by PID) and removes the slurm.conf it wrote.
test-slurm: $(STAMP)
	$(BIN)/python -m pytest -m slurm -q tests/test_slurm.py

# device: xla on the CPU PJRT device, in its own environment (torch 2.9.0 + torch-xla 2.9.0).
$(XLA_STAMP): pyproject.toml
	test -x $(XLA_VENV)/bin/python || $(PYTHON) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/pip install --quiet torch==2.9.0 torch-xla==2.9.0
	$(XLA_VENV)/bin/pip install --quiet numpy scipy scikit-learn h5py pyarrow pandas matplotlib \
		tqdm pyyaml jsonschema pillow pytest
	$(XLA_VENV)/bin/pip install --quiet --no-deps -e .
	touch $(XLA_STAMP)

test-xla: $(XLA_STAMP)
	PJRT_DEVICE=CPU REQUIRE_XLA=1 $(XLA_VENV)/bin/python -m pytest -m xla -q -p no:cacheprovider \
		tests/test_xla.py

lint: $(STAMP)
	$(BIN)/ruff check src tests workflow/scripts benchmarks
	$(BIN)/snakemake --lint

# After a kill: make resume [TARGET=results/fig6.pdf] [CONFIG=config/paper/x.yaml] [PROFILE=profiles/slurm]
# resumes what was running (default: every target of the embedded default, on this machine).
PROFILE ?= profiles/local
RESUME_ARGS = $(if $(CONFIG),--configfile $(CONFIG)) $(TARGET)
resume: $(STAMP)
	$(BIN)/snakemake --unlock $(RESUME_ARGS)
	$(BIN)/snakemake --profile $(PROFILE) $(RESUME_ARGS)

# Trained runs whose code changed, in studies with rerun_on_code_change: false (one output per
# line; force them with: snakemake --cores all --forcerun $$(make -s stale)). CONFIG=path for
# another config; ACCEPT=1 records today's code as theirs instead (re-runs nothing).
stale: $(STAMP)
	@$(BIN)/python -m pipeline.stale $(if $(CONFIG),--configfile $(CONFIG)) $(if $(ACCEPT),--accept)

report: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --report results/report.html

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf results .snakemake
