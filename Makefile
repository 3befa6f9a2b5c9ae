# Every target sets up its own pinned environment in .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready

.PHONY: demo test bench report lint clean

$(READY): requirements-dev.txt pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(READY)

demo: $(READY)
	$(PY) -m mimkernels

test: $(READY)
	$(PY) -m pytest -q

bench: $(READY)
	$(PY) -m benchmarks

lint: $(READY)
	$(PY) -m ruff check mimkernels benchmarks tests

report: $(READY)
	$(PY) -m benchmarks.kernel_report

clean:
	rm -rf $(VENV) build *.egg-info
