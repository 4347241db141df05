# `make test` and `make demo` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS := test,torch,jax,demo,numba
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: test demo bench lint conformance clean

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

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info brn-results
