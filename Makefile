# Two commands set up everything: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lancet-installed

# The telemetry/offline environment defaults live in lancet_core/runtime_env.py (applied on
# import by every entry point); only output buffering is the Makefile's business.
export PYTHONUNBUFFERED := 1

.PHONY: install demo test lint bench e2e clean

install: $(STAMP)

# Reinstalls only when the dependency files change.
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (LANCET needs Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,dask,ray]"
	# kronfluence is a peer for tests and benchmarks; its metadata asks for torchvision,
	# which would drag in a CUDA torch, so it goes in without dependencies.
	$(PY) -m pip install -q --no-deps -c constraints.txt kronfluence einconv einops opt-einsum
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/lancet run --config configs/demo.yaml

# The static checks first (seconds), then the suite on TEST_WORKERS processes (pytest-xdist;
# a test file stays on one worker, so its module fixtures are built once). The tests run torch
# on one thread each (tests/conftest.py), so two workers use both cores of a 2-core machine.
TEST_WORKERS ?= 2
test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not e2e" -n $(TEST_WORKERS) --dist loadfile

# Static checks: ruff on every Python folder, mypy on lancet_core ([tool.ruff]/[tool.mypy] in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check lancet_core lancet_cli tasks flows tests benchmarks tools
	$(VENV)/bin/mypy

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/influence.py --quick

# The browser test needs Debian's chromium (Playwright's own browser download cannot work offline);
# its screenshots go to e2e-screenshots/.
e2e: $(STAMP)
	@command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m e2e; rc=$$?; echo "e2e screenshots: $(CURDIR)/e2e-screenshots/"; exit $$rc

clean:
	rm -rf outputs mlruns.db mlartifacts .pytest_cache
