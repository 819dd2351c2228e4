# Developer shortcuts. `make install` once, then the rest run inside the active environment.
PY ?= python

.PHONY: install test test-fast lint format bench cuda-check gpu-wheels gpu-check demo families

install:
	$(PY) -m pip install torch==2.13.0 'setuptools>=77' wheel
	$(PY) -m pip install --no-build-isolation -e '.[dev]'

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

lint:
	ruff check .
	ruff format --check .

format:
	ruff check --fix .
	ruff format .

bench:
	mkdir -p docs/bench
	moe-runtime bench profile --json docs/bench/profile.json
	moe-runtime bench tune --json docs/bench/tune.json
	moe-runtime bench esft-quality --steps 100 --json docs/bench/esft_quality.json
	moe-runtime bench reroute --json docs/bench/reroute.json
	moe-runtime bench peft-mixed --repeats 3 --json docs/bench/peft_mixed.json

cuda-check:
	bash .ci/cuda_compile_check.sh

# the GPU check (docs/gpu.md): fetch the wheels here, run the check on a GPU machine
gpu-wheels:
	bash scripts/gpu_wheels.sh

gpu-check:
	OUT=$${OUT:-/tmp/moe-gpu-check} bash scripts/gpu_check.sh --device $${DEVICE:-cuda}

demo:
	moe-runtime demo

families:
	$(PY) -m moe_runtime.testing.support_table --out docs/families.md
