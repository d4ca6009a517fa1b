# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Exact versions (constraints.txt); pyproject.toml's extras give only lower bounds.
PIP := $(PY) -m pip install --quiet --constraint constraints.txt

.PHONY: run test lint bench readme coverage timm-names format train-digits clean

# torch and torchvision go in first, in one pip command: PyPI's torchvision only
# imports beside the matching torch, and the oracles (timm, transformers) need it.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PIP) torch torchvision
	$(PIP) -e '.[dev]'
	touch $@

run: $(STAMP)
	$(PY) -m vit_core demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: $(STAMP)
	$(PY) -m pytest -q

# Speed side by side with timm and transformers, and the training step's memory with and
# without gradient checkpointing (minutes; never part of `make test`).
bench: $(STAMP)
	$(PY) benchmarks/run.py --out benchmarks/results
	$(PY) benchmarks/embed.py --out benchmarks/results
	$(PY) benchmarks/training.py --out benchmarks/results

# The README's parity and speed tables, from the test suite's recorded differences
# (docs/parity.json, written here) and the last `make bench` (benchmarks/results/bench.json).
# The one test that checks the README against those files runs after, in `make test`.
readme: $(STAMP)
	$(PY) -m pytest -q tests --parity-json docs/parity.json \
		--deselect tests/vit_core/test_docs.py::test_readme_tables_are_the_generated_ones
	$(PY) scripts/readme_tables.py

# How much of timm's ViT zoo converts: every pretrained tag built (2 blocks), converted by
# its name, run in both backends and compared with timm (tens of minutes; never part of
# `make test`). Writes docs/coverage.json and the README's coverage table.
# `$(PY) scripts/coverage.py --only PATTERN` re-runs some tags, merged into the file.
coverage: $(STAMP)
	$(PY) scripts/coverage.py
	$(PY) scripts/readme_tables.py

# vit_core/timm_names.json from the installed timm (after a timm upgrade; a test checks it).
timm-names: $(STAMP)
	$(PY) scripts/generate_timm_names.py

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Re-trains the shipped digits model (reproducible; seeds fixed).
train-digits: $(STAMP)
	$(PY) scripts/train_digits.py --out vit_core/assets/vit-digits --force

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
