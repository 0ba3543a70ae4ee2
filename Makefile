# The two commands that matter: `make demo` and `make test`.
# Both work on a fresh machine with only Python (and root, for the broker
# package): they create .venv and install what they need on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgeota-installed

.PHONY: conformance demo test lint typecheck system-deps bench clean help

help:
	@echo "make demo   - install into .venv and run the end-to-end demo"
	@echo "make test   - install into .venv (and mosquitto) and run ruff, mypy --strict and the whole test suite"
	@echo "make bench  - run the benchmarks in bench/ (prints ratios against measured limits)"
	@echo "make conformance - the tuf-conformance suite against the device's TUF client"
	@echo "make fuzz-api - schemathesis on /api/v1 and hypothesis on the inference endpoint, long budget"
	@echo "make fuzz   - atheris + hypothesis on every parser (tests/fuzz/), FUZZ_SECONDS each"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Tests that need a broker start their own Mosquitto from the binary; install
# the Debian package when it is missing (root is required for that only).
# The dashboard test drives headless Chromium through chromedriver (Debian's).
# The database tests run on SQLite and on PostgreSQL: make sure one listens on
# 127.0.0.1:5432 (installed and started when missing).
system-deps:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
	  echo "installing mosquitto (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; }
	@test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || { \
	  echo "installing chromium and chromium-driver (Debian packages, for the dashboard test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
	@bash scripts/ensure-postgres.sh

demo: $(STAMP)
	$(BIN)/edgeota demo

lint: $(STAMP)
	$(BIN)/ruff check .

# mypy --strict on every package in [tool.setuptools] package-dir, under its
# edgeota.* name (the script mirrors the folders in build/typecheck and prints
# errors with the real paths); settings in [tool.mypy].
typecheck: $(STAMP)
	$(BIN)/python scripts/typecheck.py

# Tests run on every core (pytest-xdist): most of their time is spent waiting on
# brokers, subprocesses and fsync, so two workers halve the suite on two cores.
# Each test has its own broker port, database and folders; PYTEST_WORKERS=0 runs
# them in this process.
PYTEST_WORKERS ?= auto

test: $(STAMP) system-deps lint typecheck
	$(BIN)/pytest -n $(PYTEST_WORKERS)

# tuf-conformance (113 tests of a TUF client) against the device's repository client;
# needs a checkout of the suite (see scripts/conformance.sh) and Debian's faketime.
conformance: $(STAMP)
	@bash scripts/conformance.sh

# schemathesis against the live OpenAPI of /api/v1 (and hypothesis against the agent's
# inference endpoint) with a long budget; `make test` runs the same tests with a few
# examples per operation. FUZZ_API_EXAMPLES: examples per operation and role.
FUZZ_API_EXAMPLES ?= 300
.PHONY: fuzz-api
fuzz-api: $(STAMP)
	EDGEOTA_FUZZ_API_EXAMPLES=$(FUZZ_API_EXAMPLES) $(BIN)/pytest -p no:cacheprovider -s -q \
	  tests/test_api_fuzz.py

# Coverage-guided fuzzing of every parser of outside bytes (tests/fuzz/fuzz_*.py):
# FUZZ_SECONDS of atheris per harness, then a merge of what added coverage into
# tests/fuzz/corpus/<target>/ (crashes land there too), then its hypothesis
# properties, then (unless FUZZ_TARGETS names some) `make fuzz-api`; `make test`
# replays that corpus (tests/test_fuzz_corpus.py).
# FUZZ_TARGETS=manifest,journal runs a few. atheris comes with the dev extra
# (a wheel on x86_64); elsewhere it is built here, which needs clang and libFuzzer.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=
.PHONY: fuzz fuzz-deps
fuzz: $(STAMP) fuzz-deps
	$(BIN)/python tests/fuzz/run_fuzz.py --seconds $(FUZZ_SECONDS) --targets "$(FUZZ_TARGETS)"
	@test -n "$(FUZZ_TARGETS)" || $(MAKE) --no-print-directory fuzz-api

fuzz-deps: $(STAMP)
	@$(BIN)/python -c "import atheris" 2>/dev/null || { \
	  command -v clang >/dev/null 2>&1 || { \
	    echo "installing clang and libclang-rt-dev (Debian packages, to build atheris)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      clang libclang-rt-dev >/dev/null; }; \
	  CLANG_BIN=clang $(BIN)/pip install --quiet atheris; }

bench: $(STAMP)
	@for b in bench/*.py; do \
	  case $$b in */bench_support.py) continue;; esac; \
	  echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build/typecheck test-artifacts
