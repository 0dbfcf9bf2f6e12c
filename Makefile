# meshgate: every target installs what it needs first (scripts/bootstrap.sh is
# idempotent), so each works on a fresh Debian machine as root.
PY := .venv/bin/python
PYTEST := .venv/bin/pytest

.PHONY: install protos docs test run bench clean-state help

help:
	@echo "make run      start etcd, control plane and key service locally, then the egress demo"
	@echo "make test     run the whole test suite (what CI runs)"
	@echo "make bench    print BENCH lines for every benchmark"
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

test: install
	$(PYTEST) -q

run: install
	$(PY) scripts/devstack.py

bench: install
	@set -e; for f in tests/bench/bench_*.py; do $(PY) $$f; done

clean-state:
	rm -rf state
