# meshbank: the two quick-start commands are `make run` and `make test`.
# Each installs what it needs first (tools/bootstrap.sh, idempotent and fast when done).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV := .venv
BIN := $(VENV)/bin
PROTOS := $(shell cd protos && find meshbank -name '*.proto' | sort)
RELEASED_API := protos/released/meshbank-v1.binpb

.PHONY: run test test-extended bootstrap gen check-gen lint fmt typecheck buf unit integration down status release-api lock clean

## run: bring up PostgreSQL and the three services, seed demo data, print how to call them
run: bootstrap
	$(BIN)/meshbank up --detach

## test: generated-code check, ruff, mypy, buf lint + breaking, then every test
test: bootstrap check-gen lint typecheck buf
	$(BIN)/pytest -q --durations=15 -m "not extended" tests

## test-extended: the e2e suites too long for `make test`: the bank check with every
## fault kind at once, and the region-partition drill on a deployment in network
## namespaces (root)
test-extended: bootstrap
	$(BIN)/pytest -v -m extended tests/e2e

bootstrap:
	@bash tools/bootstrap.sh

down: bootstrap
	$(BIN)/meshbank down

status: bootstrap
	$(BIN)/meshbank status

# Regenerates the one generated tree (gen/): Python messages, gRPC stubs and typed
# .pyi, and the descriptor set the edges' transcoder loads.
gen: bootstrap
	@bash tools/gen.sh gen

# Fails when the committed generated tree differs from a fresh generation.
check-gen: bootstrap
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	bash tools/gen.sh "$$tmp" && \
	if ! diff -r -q -x __pycache__ gen "$$tmp" ; then \
	  echo "gen/ is stale: run 'make gen' and commit the result" >&2; exit 1; fi; \
	echo "generated code is up to date"

lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: bootstrap
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: bootstrap
	$(BIN)/mypy

# buf lint (STANDARD + COMMENTS) and buf breaking against the committed released image.
buf: bootstrap
	$(BIN)/buf lint
	$(BIN)/buf breaking protos --against $(RELEASED_API)
	@echo "buf lint and breaking: clean"

# Deliberately accept the current API as the released one (after a reviewed change).
release-api: bootstrap
	$(BIN)/buf build protos -o $(RELEASED_API)

unit: bootstrap
	$(BIN)/pytest -q tests/unit

integration: bootstrap
	$(BIN)/pytest -q tests/integration

# Re-pin every transitive Python dependency from the current .venv.
lock:
	$(BIN)/pip freeze --exclude-editable | sort -f > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
