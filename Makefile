# feishu-gpt-bot. Every target bootstraps .venv on first use (Python 3.11+ and pip are enough)
# and reinstalls only when pyproject.toml changes. Running the bot needs only the runtime
# dependencies (`make install`); the development tools (pytest, mypy, ruff, hypothesis) are
# added by the targets that use them (`make test`, `lint`, `format`, `bench`).

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
ARGS ?=
SOURCES := bot tests $(wildcard bench)

.DEFAULT_GOAL := help
.PHONY: help install install-dev run chat doctor keys test test-all lint format bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	@touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(DEV_STAMP)

install: $(STAMP) ## create .venv with what running the bot needs (no development tools)

install-dev: $(DEV_STAMP) ## add the development tools (tests, linters) to .venv

run: $(STAMP) ## start the bot from settings.yaml (ARGS="--config other.yaml")
	$(BIN)/python -m bot run $(ARGS)

chat: $(STAMP) ## chat with the LLM in this terminal
	$(BIN)/python -m bot chat $(ARGS)

doctor: $(STAMP) ## check the configuration and connectivity
	$(BIN)/python -m bot doctor $(ARGS)

keys: $(STAMP) ## manage the API key pool (ARGS="list")
	$(BIN)/python -m bot keys $(ARGS)

# pytest exits 5 when it collected no test: that is a broken setup, never a pass.
PYTEST = $(BIN)/python -m pytest $(1) $(ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: the test setup is broken" >&2; fi; \
	exit $$status

test: $(DEV_STAMP) ## run the fast test suite
	@$(call PYTEST,-m "not slow")

test-all: $(DEV_STAMP) ## run every test, including the slow end-to-end suites
	@$(call PYTEST,)

lint: $(DEV_STAMP) ## ruff check, ruff format --check, mypy --strict on bot/
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/mypy

format: $(DEV_STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix $(SOURCES)
	$(BIN)/ruff format $(SOURCES)

bench: $(DEV_STAMP) ## run the benchmarks in bench/ and print their numbers
	@set -e; for script in $(filter-out bench/_%,$(wildcard bench/*.py)); do echo "== $$script"; $(BIN)/python $$script; done

clean: ## remove the virtualenv and caches (keeps data/)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
