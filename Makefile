# drekifs — `make demo` and `make test` work on a fresh Debian machine, as root.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
DEMO_MOUNT ?= /tmp/dreki
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-sim test-mounted deps test-deps venv lint bench clean install
PREFIX ?= /usr/local

deps:
	@PYTHON=$(PYTHON) packaging/install-deps.sh

test-deps:
	@PYTHON=$(PYTHON) packaging/install-deps.sh --test

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

demo: deps
	@$(MAKE) --no-print-directory venv
	@DREKIFS=$(CURDIR)/$(VENV)/bin/drekifs packaging/demo.sh $(DEMO_MOUNT)

lint: venv
	$(VENV)/bin/ruff check drekifs tests bench

# Every layer, and the lint. README.md (Tests) says what each layer covers and how long it takes.
test: test-deps
	@$(MAKE) --no-print-directory venv
	@$(MAKE) --no-print-directory lint
	$(VENV)/bin/pytest -q -ra tests

# unit/ and sim/ run in one process: the packages to build pyfuse3 are all they need.
test-unit: deps
	@$(MAKE) --no-print-directory venv
	$(VENV)/bin/pytest -q -ra tests/unit

test-sim: deps
	@$(MAKE) --no-print-directory venv
	$(VENV)/bin/pytest -q -ra tests/sim

# mounted/ drives the kernel and real processes: root, /dev/fuse, and the tools of --test.
test-mounted: test-deps
	@$(MAKE) --no-print-directory venv
	$(VENV)/bin/pytest -q -ra tests/mounted

bench: test-deps
	@$(MAKE) --no-print-directory venv
	$(VENV)/bin/python bench/find_world.py

# This node's daemon for real: the command, the mount(8) helper, the systemd unit, a config.
install: deps
	@$(MAKE) --no-print-directory venv
	ln -sf $(CURDIR)/$(VENV)/bin/drekifs $(PREFIX)/bin/drekifs
	install -m 0755 packaging/mount.fuse.drekifs /sbin/mount.fuse.drekifs
	install -m 0644 packaging/drekifs.service /etc/systemd/system/drekifs.service
	install -d -m 0755 /etc/drekifs
	test -e /etc/drekifs/drekifs.toml || install -m 0644 packaging/drekifs.toml /etc/drekifs/
	@echo "installed; edit /etc/drekifs/drekifs.toml, then: systemctl enable --now drekifs"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
