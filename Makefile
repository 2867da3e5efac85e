# Targets a newcomer can guess; CI (.ci/run) calls `make test`, nothing else.
# Works in a fresh clone with Python >= 3.11, make and apt: everything else is fetched.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules

VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
NODE_CLIENT_STAMP := clients/node/node_modules/.installed
# Interpreter that creates the venv; override with `make venv PYTHON=/path/to/python3.11`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# Only paths that exist, so ruff does not fail before bench/ is written.
LINT_PATHS := $(wildcard registry clients tests bench tools)
ARGS ?=
PYTEST_ARGS ?=
# Set by test-fast; kept apart from PYTEST_ARGS so `make test-fast PYTEST_ARGS=-x` still skips slow.
PYTEST_MARK :=
IS_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo yes)
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: help venv lock redis-check node-deps run test test-fast lint fmt typecheck proto \
	proto-check buf-lint buf-breaking bench clean node-client-deps node-client-test

help: ## List targets
	@echo "usage: make <target> [ARGS=...] [PYTEST_ARGS=...]"
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) \
		| awk 'BEGIN {FS = ":.*## "}; {printf "  %-18s %s\n", $$1, $$2}'

# --------------------------------------------------------------------------- environment

venv: $(VENV_STAMP) ## Create .venv and install both packages (editable) with dev tools

$(PY):
	@if [ -z "$(PYTHON)" ]; then echo "python3.11 not found; install Python >= 3.11" >&2; exit 1; fi
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "$(PYTHON) is older than 3.11; run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	@# Debian splits venv/ensurepip into pythonX.Y-venv; install it when we may.
	@if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then \
		pkg="python$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"; \
		if [ "$(IS_ROOT)" = yes ]; then $(APT_GET) update && $(APT_GET) install -y "$$pkg"; \
		else echo "missing Python venv support; run: sudo apt-get install -y $$pkg" >&2; exit 1; fi; \
	fi
	$(PYTHON) -m venv $(VENV)

# Reinstalls whenever the lock or a pyproject.toml changes (the stamp is older than it).
# Third-party packages come from requirements.lock, exact versions checked against their
# hashes; the two local packages go on top without dependencies (they are in the lock).
$(VENV_STAMP): requirements.lock pyproject.toml clients/python/pyproject.toml | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install --require-hashes --no-deps -r requirements.lock
	$(PY) -m pip install --no-deps -e clients/python -e '.[dev]'
	$(PY) -m pip check
	@touch $@

lock: $(PY) ## Re-resolve requirements.lock from requirements.in and pyproject.toml (needs PyPI)
	$(PY) -m pip install --quiet 'pip-tools>=7.4,<8'
	$(PY) tools/lock.py

redis-check: ## Make sure redis-server is installed (apt-get when root)
	@if ! command -v redis-server >/dev/null 2>&1; then \
		if [ "$(IS_ROOT)" = yes ]; then \
			echo "redis-server not found; installing it with apt-get"; \
			$(APT_GET) update && $(APT_GET) install -y redis-server; \
		else \
			echo "redis-server not found; install it with:" >&2; \
			echo "sudo apt-get install -y redis-server" >&2; \
			exit 1; \
		fi; \
	fi

node-deps: $(NODE_STAMP) ## Install buf from package-lock.json (npm ci)

# npm ci wipes node_modules, so the stamp is written after it.
$(NODE_STAMP): package.json package-lock.json
	@if ! command -v npm >/dev/null 2>&1; then \
		if [ "$(IS_ROOT)" = yes ]; then \
			echo "npm not found; installing nodejs and npm with apt-get"; \
			$(APT_GET) update && $(APT_GET) install -y nodejs npm; \
		else \
			echo "npm not found (needed for buf); install Node.js >= 18 and npm, e.g.:" >&2; \
			echo "sudo apt-get install -y nodejs npm" >&2; \
			exit 1; \
		fi; \
	fi
	npm ci --no-audit --no-fund
	@touch $@

# --------------------------------------------------------------------------- run

run: venv redis-check ## Run the sidecar (embedded Redis unless REGISTRY_REDIS_URL is set); ARGS=...
	$(PY) -m registry serve $(ARGS)

bench: venv redis-check ## Run the benchmarks; ARGS=...
	$(PY) -m bench $(ARGS)

# --------------------------------------------------------------------------- checks

test: venv redis-check node-deps node-client-deps lint typecheck proto-check buf-lint buf-breaking ## Every check, then the whole test suite (Python, then the Node.js client's)
	$(PY) -m pytest $(PYTEST_MARK) $(PYTEST_ARGS)
	cd clients/node && npm test

node-client-deps: $(NODE_CLIENT_STAMP) ## Install the Node.js client's packages (npm ci in clients/node)

$(NODE_CLIENT_STAMP): clients/node/package.json clients/node/package-lock.json $(NODE_STAMP)
	cd clients/node && npm ci --no-audit --no-fund
	@touch $@

node-client-test: venv redis-check node-client-deps ## npm test in clients/node (its own redis-server and sidecar)
	cd clients/node && npm test

test-fast: PYTEST_MARK := -m "not slow"
test-fast: test ## Like test, but skips the slow fault-injection tests

lint: venv ## ruff check and format check
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

fmt: venv ## Format and autofix
	$(PY) -m ruff format $(LINT_PATHS)
	$(PY) -m ruff check --fix $(LINT_PATHS)

typecheck: venv ## mypy --strict on registry and the Python client
	$(PY) -m mypy

proto: venv ## Regenerate the Python stubs from proto/
	$(PY) tools/genproto.py

proto-check: venv ## Fail when the committed stubs are stale
	$(PY) tools/genproto.py --check

buf-lint: node-deps ## buf lint proto/ (see buf.yaml)
	npx --no-install buf lint

# The contract must not break silently: proto/ against the previous commit (and against
# HEAD too when proto/ has uncommitted changes). Lint-only without a previous proto.
buf-breaking: node-deps ## buf breaking: proto/ against the previous commit (FILE rules)
	@if ! git rev-parse -q --verify 'HEAD~1^{commit}' >/dev/null 2>&1 \
		|| ! git cat-file -e 'HEAD~1:proto' 2>/dev/null; then \
		echo "buf breaking: no previous commit with proto/ (shallow or first clone): lint only"; \
	else \
		echo "buf breaking against HEAD~1"; \
		npx --no-install buf breaking --against '.git#ref=HEAD~1'; \
		if ! git diff --quiet HEAD -- proto; then \
			echo "buf breaking against HEAD (proto/ has uncommitted changes)"; \
			npx --no-install buf breaking --against '.git#ref=HEAD'; \
		fi; \
	fi

# --------------------------------------------------------------------------- housekeeping

clean: ## Remove the venv, node_modules, caches and embedded Redis data
	rm -rf $(VENV) node_modules clients/node/node_modules clients/node/build-test \
		clients/node/dist .mypy_cache .ruff_cache .pytest_cache .hypothesis \
		.registry-data build dist *.egg-info clients/python/*.egg-info clients/python/build
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
