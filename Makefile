# meshgate: every target installs what it needs first (scripts/bootstrap.sh is
# idempotent), so each works on a fresh Debian machine as root.
PY := .venv/bin/python
PYTEST := .venv/bin/pytest

.PHONY: install protos docs lint test run bench bench-10k clean-state help

help:
	@echo "make run      start etcd, control plane and key service locally, then the egress demo"
	@echo "make test     make lint, then the whole test suite (what CI runs)"
	@echo "make lint     static checks: ruff, mypy, import-linter's layer contracts"
	@echo "make bench    print BENCH lines for every benchmark"
	@echo "make bench-10k  the convergence benchmark at 10,000 agents, one replica then two (~30 min)"
	@echo "make protos   regenerate the API code and the SDK from protos/"
	@echo "make docs     regenerate docs/cli.md from the CLI"
	@echo "make install  install Debian packages and the .venv"

install:
	@bash scripts/bootstrap.sh

protos: install
	$(PY) scripts/gen_protos.py
	$(PY) clients/sdk/scripts/gen_sdk.py

docs: install
	$(PY) clients/sdk/scripts/gen_cli_docs.py

# Static checks, a few seconds: ruff (ruff.toml), mypy (mypy.ini) and the layer
# contracts (.importlinter). All three run even when one fails.
lint: install
	@rc=0; \
	echo "lint: ruff"; .venv/bin/ruff check --quiet --output-format concise . || rc=1; \
	echo "lint: mypy"; .venv/bin/mypy || rc=1; \
	echo "lint: import-linter"; .venv/bin/lint-imports --no-cache --no-logo || rc=1; \
	exit $$rc

# The suite in TEST_WORKERS processes (pytest-xdist): most of its time is spent
# waiting (etcd, gRPC, service processes, agents and WireGuard handshakes between
# network namespaces), not computing, so workers overlap the waits. Tests never
# share a name, port or file (random namespace and interface names, free ports,
# a prefix or an etcd of their own). --dist loadfile keeps each file on one
# worker, so a module-scoped topology is built once. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: lint
	$(PYTEST) -q -n $(TEST_WORKERS) --dist loadfile

run: install
	$(PY) scripts/devstack.py

bench: install
	@set -e; for f in tests/bench/bench_*.py; do $(PY) $$f; done

# Issue 18's figures: 10,000 simulated agents, reps reduced to keep each run
# within about a quarter of an hour on two cores.
BENCH_10K := tests/bench/bench_convergence.py --agents 10000 --enroll-concurrency 16 --reps 5 --reps-one 20 --psk-reps 1
bench-10k: install
	@set -e; $(PY) $(BENCH_10K); $(PY) $(BENCH_10K) --replicas 2 --psk-reps 0

clean-state:
	rm -rf state
