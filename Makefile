# mmkit: `make demo` and `make test` do all their own set-up.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.mmkit-setup
TORCH   ?= torch==2.13.0

.PHONY: setup test demo bench lint format clean

setup: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes. An already installed torch
# (e.g. a user's CUDA build) is kept; pyproject only asks for torch>=2.6.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning; with several processes on
# few cores (torchrun tests, shared machines) spinning threads slowed tiny-model steps up to 50x.
test: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest tests -x --durations=15

demo: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m mmkit.cli.main demo --out outputs/demo --overwrite

bench: setup
	$(PY) benchmarks/run_all.py

lint: setup
	$(PY) -m ruff check mmkit tests benchmarks
	$(PY) -m ruff format --check mmkit tests benchmarks

format: setup
	$(PY) -m ruff format mmkit tests benchmarks
	$(PY) -m ruff check --fix mmkit tests benchmarks

clean:
	rm -rf .venv outputs .pytest_cache
