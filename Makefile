# vxnet: `make run` shows it working on this machine, `make test` runs every test. Both install what is missing.
PYTHON ?= python3
PYTEST ?= $(PYTHON) -m pytest
PYTEST_ARGS ?=
N ?= 3
# Every test layer; tests/ipsec joins when it exists.
TEST_DIRS := tests/unit tests/kernel tests/e2e $(wildcard tests/ipsec)

.PHONY: deps lint test test-unit test-kernel test-scale test-e2e test-ipsec run clean-run hosts-up hosts-down plugin push bench

deps:
	scripts/install-deps.sh

# ruff, and the import contracts in pyproject.toml (the layers: imports point down only). Part of `make test`.
lint: deps
	$(PYTHON) -m ruff check .
	lint-imports --no-cache

# --durations: the 40 slowest tests at the end of the log, to keep the whole run under 45 minutes on 2 cores.
test: deps lint
	$(PYTEST) --durations=40 $(PYTEST_ARGS) $(TEST_DIRS)

test-unit: deps
	$(PYTEST) $(PYTEST_ARGS) tests/unit

test-kernel: deps
	$(PYTEST) $(PYTEST_ARGS) tests/kernel

# Capacity (issue 14): 2,100 endpoints of one network on one simulated host, about 3-4 minutes on 2 cores; prints
# the attach medians, plugin memory and removal time. Part of tests/kernel, so `make test` runs it too.
test-scale: deps
	$(PYTEST) $(PYTEST_ARGS) -s tests/kernel/test_scale.py

test-e2e: deps
	$(PYTEST) $(PYTEST_ARGS) tests/e2e

# The encrypted data path in a qemu (TCG) guest with Debian's stock kernel: this machine's kernel has no ESP.
test-ipsec: deps
	$(PYTEST) $(PYTEST_ARGS) tests/ipsec

# Benchmarks (issues 3 and 4): vxnet vs Docker's overlay on two simulated hosts; prints ratios, about 5 min.
bench: deps
	$(PYTHON) -m bench $(BENCH_ARGS)

# The managed plugin: build/plugin-<version>/ (config.json + rootfs/), installed and enabled as vxnet:latest on the
# engine of DOCKER_HOST. Settings: make plugin PLUGIN_SETTINGS="VXNET_SCOPE=local". The version is pyproject.toml's
# [project] version unless VERSION=x.y.z is given (the tree is not changed; build/plugin-x.y.z/ differs from the
# others only in its /opt/vxnet/VERSION).
VERSION ?=
plugin: deps
	VXNET_VERSION=$(VERSION) scripts/build-plugin.sh $(PLUGIN_SETTINGS)

# Push it to a registry as PLUGIN_REPO:<version> and PLUGIN_REPO:latest (docker plugin push from the engine of
# DOCKER_HOST, which keeps no copy): make push PLUGIN_REPO=host:port/vxnet [VERSION=x.y.z]. Then on each node:
# docker plugin install --grant-all-permissions PLUGIN_REPO:<version> ETCD_ENDPOINTS=... (README, Swarm).
push: deps
	@test -n "$(PLUGIN_REPO)" || { echo "make push: give PLUGIN_REPO=host:port/vxnet (or USER/vxnet)" >&2; exit 2; }
	VXNET_VERSION=$(VERSION) scripts/push-plugin.sh $(PLUGIN_REPO)

# The demo on this machine (not in a simulated host): dockerd if none answers, the plugin with its embedded
# etcd, network vxnet-demo with two containers, the vxnet command in /usr/local/bin. `make clean-run` removes
# what it made.
run: deps
	scripts/run-demo.sh

clean-run:
	scripts/clean-run.sh

# Simulated Docker hosts for debugging by hand: `make hosts-up N=3 [PLUGIN=1]`, then `make hosts-down`.
# `$(PYTHON) -m tests.harness status` and `$(PYTHON) -m tests.harness shell host1` while they are up.
hosts-up: deps
	$(PYTHON) -m tests.harness up -n $(N) $(if $(PLUGIN),--plugin)

hosts-down:
	$(PYTHON) -m tests.harness down
