# The README's two commands: `make demo` (install + tiny DPO run) and `make test` (install + test suite).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install demo demo-sft test test-fast

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"

demo: install
	$(PYTHON) deepy.py train.py configs/tiny/dpo.yml

demo-sft: install
	$(PYTHON) deepy.py train.py configs/tiny/sft.yml

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"
