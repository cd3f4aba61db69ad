# glmserve developer entry points. Every target first runs the idempotent installer
# (returns in about a second when nothing changed).
VENV ?= .venv
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup serve test bench

setup:
	VENV="$(abspath $(VENV))" bash scripts/setup.sh

serve: setup
	$(VENV)/bin/glmserve serve $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q tests/ $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/glmserve bench $(ARGS)
