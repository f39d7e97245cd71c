# The README's commands: `make demo` and `make test`. Both set up .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of this version lies on the dev/CI machines; on a GPU box pip takes the CUDA build.
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.dsft-installed
PYTEST_ARGS ?=

.PHONY: install test test-all lint format bench demo clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first: a bare torch requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" --durations=15 $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m benchmarks.run

demo: $(STAMP)
	bash launch/demo.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo_out bench_out
