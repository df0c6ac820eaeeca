# Development entry points. Every target creates the pinned environment first (.venv, from
# requirements-dev.txt) and installs the package into it in editable mode.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: env test test-fast lint format demo bench bench-autoencoder docs clean

env: $(STAMP)

$(STAMP): requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Triton kernels run through Triton's interpreter on the CPU (set before triton is imported).
test: env
	TRITON_INTERPRET=1 $(PY) -m pytest

test-fast: env
	TRITON_INTERPRET=1 $(PY) -m pytest -m "not slow and not distributed"

lint: env
	$(PY) -m ruff check kfac_ef kernels tests benchmarks
	$(PY) -m ruff format --check kfac_ef kernels tests benchmarks
	$(PY) -m mypy

format: env
	$(PY) -m ruff check --fix kfac_ef kernels tests benchmarks
	$(PY) -m ruff format kfac_ef kernels tests benchmarks

demo: env
	$(PY) benchmarks/demo.py

docs: env
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The CPU suite (about an hour on 2 cores): the language models (lm.py, about 35 minutes) and
# the defaults under every optimizer (defaults.py), step cost, memory, time to target on the
# three tasks (3 seeds), then the plots and the tables of README.md and docs/benchmarks.md (each
# shows the run its marker names: edit the marker to show the new one). Progress bars on a
# terminal; CSVs in benchmarks/results/.
bench: env
	$(PY) benchmarks/lm.py
	$(PY) benchmarks/defaults.py
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/time_to_target.py
	$(PY) benchmarks/plot.py
	$(PY) benchmarks/tables.py

# The digits autoencoder's levers, damping sweep and step cost, and the published peer (about
# 30 minutes). The peer needs `pip install asdfghjkl==0.1a5` (the `bench` extra); without it
# peer.py prints how to install it and exits.
bench-autoencoder: env
	$(PY) benchmarks/autoencoder.py --levers --damping --cost
	$(PY) benchmarks/peer.py --tasks autoencoder --seeds 2
	$(PY) benchmarks/plot.py
	$(PY) benchmarks/tables.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
