# One command each: `make test` sets up and runs the tests, `make demo` the local cluster.
# Both work on a fresh Debian machine: as root they install what is missing from the
# distribution's packages (scripts/setup-host.sh); otherwise they say what to install.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PYTEST_ARGS ?=
# Test modules run side by side, a module per worker at a time (they own their etcd,
# HAProxy, ports and containers; module fixtures stay shared). Most of a test waits on a
# real part, so 4 workers pay on 2 cores. TEST_JOBS=0 runs them one after another.
TEST_JOBS ?= 4

.PHONY: help setup test lint demo demo-deploy demo-down bench clean images e2e e2e-swarm

help:
	@echo "make test       set up (venv, etcd, HAProxy, Docker) and run every test"
	@echo "make demo       bring up the local cluster (etcd, HAProxy+reloader, sidekick, demo app)"
	@echo "make demo-deploy a git push deploy of the demo app onto the running demo"
	@echo "make demo-down  stop it"
	@echo "make bench      run the benchmarks, write docs/BENCHMARKS.md"
	@echo "make lint       ruff + mypy"
	@echo "make images     build the wheels and Docker images (base image too, without a registry)"
	@echo "make e2e        the end-to-end test on the Docker engine (compose, scale, promote)"
	@echo "make e2e-swarm  a node of a two-node swarm (two private dockerds) fails, under load"

# The venv in two steps: what running fluster needs (the demo stops here: its CLI and the
# pip that builds the images' wheels), then the test and lint tools on top.
$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed
	scripts/setup-host.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup lint
	$(VENV)/bin/pytest -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)

demo: $(VENV)/.runtime
	scripts/setup-host.sh demo
	scripts/demo.sh up

demo-deploy: $(VENV)/.runtime
	scripts/demo.sh deploy

demo-down:
	scripts/demo.sh down

images: $(VENV)/.installed
	scripts/start-dockerd.sh
	scripts/build-images.sh

e2e: setup
	$(VENV)/bin/pytest tests/test_e2e_compose.py $(PYTEST_ARGS)

# Opt-in: two private dockerds joined to one swarm, the worker killed under a request loop.
e2e-swarm: setup
	FLUSTER_E2E_SWARM=1 $(VENV)/bin/pytest -s tests/test_swarm_nodes.py $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
