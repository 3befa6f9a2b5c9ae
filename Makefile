# Every target sets up its own pinned environment in .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready

# pytest-xdist workers: the suite is CPU-bound (Triton's interpreter); on 2 cores about 29 minutes in two processes
TEST_WORKERS ?= 2
# worksteal: an idle worker takes tests queued on the busy one, so one long test does not hold the run's end
XDIST := -n $(TEST_WORKERS) --dist worksteal

# the requirements files' pins decide, not a machine-wide pip constraint: an image that caches an older torch may
# cap it below our pin, and pip would then refuse to install the pinned stack
PINS_ONLY := PIP_CONSTRAINT=/dev/null

FLOOR_VENV := .venv-floor
FLOOR_READY := $(FLOOR_VENV)/.ready

.PHONY: demo test test-floor bench report lint clean triton-cache

# the newest stack's wheels (requirements-dev.txt) need Python 3.11+: say so before pip fails on them
$(READY): requirements-dev.txt pyproject.toml setup.py $(wildcard csrc/*)
	@py=$(PY); test -x $$py || py=$(PYTHON); $$py -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "make: requirements-dev.txt pins torch and Triton releases with no wheels for $$($$py -V); run with" \
	    "PYTHON=python3.11 or newer. On 3.10, make test-floor PYTHON=python3.10 tests the oldest supported" \
	    "stack (README, Supported versions)" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir --upgrade pip
	$(PINS_ONLY) $(PY) -m pip install --quiet --no-cache-dir -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-cache-dir --no-build-isolation --no-deps -e .
	touch $(READY)

# the oldest supported torch / Triton (requirements-floor.txt), used through an installed wheel
$(FLOOR_READY): requirements-floor.txt
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --no-cache-dir --upgrade pip
	$(PINS_ONLY) $(FLOOR_VENV)/bin/python -m pip install --quiet --no-cache-dir -r requirements-floor.txt
	touch $(FLOOR_READY)

demo: $(READY)
	$(PY) -m mimkernels

test: $(READY)
	$(PY) -m pytest -q $(XDIST)

test-floor: $(FLOOR_READY)
	bash tests/test_installed_wheel.sh $(FLOOR_VENV) $(XDIST)

bench: $(READY)
	$(PY) -m benchmarks

lint: $(READY)
	$(PY) -m ruff check mimkernels benchmarks tests

report: $(READY)
	$(PY) -m benchmarks.kernel_report

# Triton's compile cache for the next lent GPU, compiled here without one (benchmarks/triton_cache.py; 14 minutes on
# 2 cores): the GPU machine runs the floor's Triton under Python $(GPU_PYTHON), whose Triton wheel is part of every
# cache key, so it is fetched for its key. A device call that names benchmarks/.triton-cache in carry takes the archive.
# From a copy of the sources: the checkout's extension is built for .venv's torch, not the floor's.
GPU_PYTHON ?= 3.12
TRITON_CACHE_ARCHIVE := benchmarks/.triton-cache/sm90.tar.xz
triton-cache: SHELL := bash
triton-cache: $(FLOOR_READY)
	mkdir -p $(FLOOR_VENV)/wheels
	$(FLOOR_VENV)/bin/python -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
	  --python-version $(GPU_PYTHON) --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(FLOOR_VENV)/wheels \
	  triton==$$($(FLOOR_VENV)/bin/python -c 'import triton; print(triton.__version__)')
	rm -rf build/triton-cache-src && mkdir -p build/triton-cache-src
	git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do \
	  [ -e "$$f" ] && printf '%s\0' "$$f"; done | xargs -0 cp --parents -t build/triton-cache-src
	cd build/triton-cache-src && env -u TRITON_INTERPRET PYTHONPATH=$$PWD \
	  MIMKERNELS_COMMIT=$$(git -C $(CURDIR) rev-parse HEAD)$$(git -C $(CURDIR) diff --quiet HEAD || echo -dirty) \
	  $(CURDIR)/$(FLOOR_VENV)/bin/python -m benchmarks.triton_cache warm --out $(CURDIR)/$(TRITON_CACHE_ARCHIVE) \
	  --wheel $$(ls $(CURDIR)/$(FLOOR_VENV)/wheels/triton-*-cp$(subst .,,$(GPU_PYTHON))-*.whl | tail -n 1)

clean:
	rm -rf $(VENV) $(FLOOR_VENV) build *.egg-info
