# `make test` and `make demo` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS := test,torch,jax,demo,numba
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: test demo bench lint conformance clean gpu gpu-wheels gpu-dry-run

$(STAMP): pyproject.toml requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements-test.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 --dist loadgroup --pyargs tests portable_brn.conformance

demo: $(STAMP)
	$(VENV)/bin/portable-brn reproduce

conformance: $(STAMP)
	$(VENV)/bin/portable-brn conformance

bench: $(STAMP)
	$(PY) -m pip install --quiet -c requirements-test.txt -e '.[$(EXTRAS),bench]'
	for script in benchmarks/bench_*.py; do $(PY) $$script || exit 1; done

# Pure-Python dependencies a GPU machine without network may lack, carried as wheels.
GPU_WHEELS := build/gpu-wheels
gpu-wheels: $(STAMP)
	$(PY) -m pip download --quiet --no-deps -c requirements-test.txt -d $(GPU_WHEELS) \
		array-api-compat

# On a machine with an NVIDIA GPU and CUDA torch, JAX and CuPy installed (no network):
# copy the repository with build/gpu-wheels there, then `make gpu PYTHON=python3`.
gpu:
	benchmarks/gpu.sh --python $(PYTHON)

gpu-dry-run: $(STAMP)
	benchmarks/gpu.sh --dry-run --python $(PY)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info brn-results
