# flipsafe: `make demo` runs the offline demo, `make test` runs the test suite.
# Both create .venv on first use. torch is pinned by constraints.txt so pip
# takes the CPU wheel instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.flipsafe-installed
# Trained weights depend on torch's CPU thread count; pinning it makes `make demo` repeatable.
DEMO_THREADS ?= 4

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,deployed]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flipsafe demo --threads $(DEMO_THREADS)

# The numerics tests run again on oneDNN's AVX2 kernels and on ATen's portable kernels:
# other CPUs round convolutions differently, and the suite must hold on every x86-64.
NUMERICS := tests/inject tests/formats tests/campaign

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests
	ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q -n 2 $(NUMERICS)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -n 2 $(NUMERICS)

bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/formats.py
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/last_layer.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
