# Two commands set everything up on a fresh Debian machine:
#   make run    create .venv, install spamguardd, run the daemon in the foreground (embedded defaults)
#   make test   install what the tests need (Python packages, Debian's Exim), run the whole suite
# Other targets: make lint (ruff, mypy, the import contract), make bench, make demo (Exim + spamguardd on loopback,
# a compromised account gets frozen; needs root), make clean.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# Debian packages the real-Exim tests drive (exim -be/-bh/-bd, exiqgrep, swaks)
DEBIAN_TEST_PACKAGES := exim4-daemon-light swaks

.PHONY: run test lint bench demo debian-test-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/python -m pip install --quiet --editable . --group dev
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(BIN)/spamguardd $(ARGS)

debian-test-deps:
	@missing=""; for p in $(DEBIAN_TEST_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the Exim tests:$$missing"; \
	  if [ "$$(id -u)" -ne 0 ]; then echo "make test: need root to apt-get install$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

test: $(STAMP) debian-test-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/query_load.py

demo: $(STAMP) debian-test-deps
	$(BIN)/python contrib/demo.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage run var
