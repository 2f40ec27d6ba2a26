# lincomp: two commands do everything on a fresh machine.
#   make demo   runs the main job (spec -> tune -> compile -> linearise MiniLM -> distil -> report)
#   make test   checks the import layering (lint-imports) and runs the test suite (CPU; Triton under
#               TRITON_INTERPRET=1, TVM on LLVM)
#   make wheel-check  builds the wheel, installs it into a fresh venv and runs a shipped tuning entry
# Both create .venv with the pinned toolchain (requirements/lock.txt) on first use.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lincomp-installed
PYTEST_ARGS ?=

.PHONY: demo test test-all lint-imports wheel-check bench bench-models bench-distributed gpu-check lock clean

$(STAMP): requirements/lock.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/lock.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/lincomp demo

test: $(STAMP) lint-imports
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow" --timeout=900 $(PYTEST_ARGS)

# One-way layering (the contracts in pyproject.toml [tool.importlinter]): no cycles, no upward imports.
lint-imports: $(STAMP)
	$(VENV)/bin/lint-imports

wheel-check: $(STAMP)
	bash .ci/wheel_check.sh $(PY)

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 HYPOTHESIS_PROFILE=dev $(PY) -m pytest -q --timeout=3600 $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_cpu.py

bench-models: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_models.py

bench-distributed: $(STAMP)
	$(PY) benchmarks/bench_distributed.py

# On a GPU machine with torch + triton preinstalled (no venv, no internet): PYTHONPATH=. python3 ...
gpu-check:
	PYTHONPATH=. python3 benchmarks/gpu_check.py

lock: $(STAMP)
	$(PY) -m pip freeze | grep -v -e '^-e' -e '^lincomp' | sed 's/^torch==\(.*\)+cpu/torch==\1/' > requirements/lock.txt.new
	mv requirements/lock.txt.new requirements/lock.txt

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis out
