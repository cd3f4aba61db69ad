# glmserve developer entry points. Every target first runs the idempotent installer
# (returns in about a second when nothing changed).
VENV ?= .venv
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup serve test test-scale-out bench

setup:
	VENV="$(abspath $(VENV))" bash scripts/setup.sh

serve: setup
	$(VENV)/bin/glmserve serve $(ARGS)

# The scale-out configurations (tests/e2e/test_scale_out.py) start four more vLLM engines, about
# 7 minutes on 2 cores: their own target keeps `make test` inside 30 minutes.
test: setup
	$(VENV)/bin/python -m pytest -q tests/ -m "not scale_out" $(PYTEST_ARGS)

test-scale-out: setup
	$(VENV)/bin/python -m pytest -q tests/e2e/test_scale_out.py $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/glmserve bench $(ARGS)
