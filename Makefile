# The two commands of the README: `make run` (main job) and `make test` (whole suite).
# Each creates .venv and installs the package on first use (CPU torch pinned in constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test test-fast phase-diagram
run: $(VENV)/.installed
	$(PY) -m advisor.tune

test: $(VENV)/.installed
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

phase-diagram: $(VENV)/.installed
	$(PY) -m advisor.phase_diagram

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $@
