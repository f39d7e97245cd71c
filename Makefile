# The README's commands: `make demo` and `make test`. Both set up .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of this version lies on the dev/CI machines; on a GPU box pip takes the CUDA build.
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.dsft-installed
PYTEST_ARGS ?=

.PHONY: install test test-all gpu-check lint format bench demo clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first: a bare torch requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" -rs --durations=15 $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# On a machine with a CUDA GPU: every `gpu` test (packed == one-by-one per kernel at micro batch 2, fp16 loss
# scaling, TF32, QLoRA on CUDA, predicted vs measured memory), then the 1.1B throughput table and the memory check.
gpu-check: $(STAMP)
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check needs a CUDA GPU')"
	$(PY) -m pytest -m gpu -rs --durations=15 $(PYTEST_ARGS)
	$(PY) -m benchmarks.train_throughput --size 1b
	$(PY) -m benchmarks.memory_prediction

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
