# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
OUT    ?= runs/demo
DEMO_ARGS ?=

.PHONY: install test lint typecheck unit slow demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	# torch first, pinned: the CPU wheel on this machine's disk (any other torch pulls GBs).
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(VENV)/bin/pytest

test: lint typecheck unit

slow: install
	$(VENV)/bin/pytest -m slow -q

demo: install
	$(VENV)/bin/gradfree demo --out $(OUT) --overwrite $(DEMO_ARGS)

bench: install
	$(PY) scripts/bench_capture.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
