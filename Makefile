VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
export OMP_NUM_THREADS ?= 2

.PHONY: install install-test run test bench clean

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e .
	touch $@

$(VENV)/.installed-demo: $(VENV)/.installed
	$(PIP) install -c constraints.txt -e ".[demo]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: $(VENV)/.installed-demo
	HF_HUB_OFFLINE=1 $(VENV)/bin/peftkit train

test: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests

bench: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_foundation.py --json docs/bench_foundation.json

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
