# Every target sets up its own pinned environment in .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
READY := $(VENV)/.ready

# pytest-xdist workers: the suite is CPU-bound (Triton's interpreter); on 2 cores about 40 minutes in one process, 25 in two
TEST_WORKERS ?= 2
# worksteal: an idle worker takes tests queued on the busy one, so one long test does not hold the run's end
XDIST := -n $(TEST_WORKERS) --dist worksteal

# the requirements files' pins decide, not a machine-wide pip constraint: an image that caches an older torch may
# cap it below our pin, and pip would then refuse to install the pinned stack
PINS_ONLY := PIP_CONSTRAINT=/dev/null

FLOOR_VENV := .venv-floor
FLOOR_READY := $(FLOOR_VENV)/.ready

.PHONY: demo test test-floor bench report lint clean

$(READY): requirements-dev.txt pyproject.toml setup.py $(wildcard csrc/*)
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

clean:
	rm -rf $(VENV) $(FLOOR_VENV) build *.egg-info
