# spitwall: `make demo` and `make test` set everything up on a fresh Debian 12 machine.
SHELL := /bin/bash
PY    := /usr/bin/python3
VENV  := .venv
VPY   := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test unit integration lint typecheck bench clean

setup: $(STAMP)

# The apt part lives in vagrant/provision.sh (idempotent; CI and Vagrant run the same script).
$(STAMP): pyproject.toml vagrant/provision.sh
	bash vagrant/provision.sh
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VPY) -m ops.demo

test: setup lint
	$(VPY) -m pytest -q -p no:cacheprovider tests

unit: setup
	$(VPY) -m pytest -q -p no:cacheprovider tests/unit

integration: setup
	$(VPY) -m pytest -q -p no:cacheprovider -m integration tests/integration

# ruff, then mypy --strict over the packages, tests/ and bench/ (the list: [tool.mypy] files)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

typecheck: setup
	$(VENV)/bin/mypy

bench: setup
	$(VPY) bench/load.py

# Render the systemd units for this clone (deploy/install.py; docs/deployment.md). As root;
# more options: make install-units INSTALL_UNITS_ARGS='--dry-run --statedir /srv/spitwall'
.PHONY: install-units
install-units: setup
	$(PY) deploy/install.py --prefix $(CURDIR) $(INSTALL_UNITS_ARGS)

clean:
	rm -rf $(VENV) .lab .mypy_cache .ruff_cache
