# Two commands set everything up on a fresh Debian machine:
#   make run    create .venv, install spamguardd, run the daemon in the foreground (embedded defaults)
#   make test   install what the tests need (Python packages, Debian's Exim), run the whole suite
# Other targets: make lint (ruff, mypy, the import contract), make bench (single host, then fleet mode
# against Debian's redis-server), make demo (Exim + spamguardd on loopback,
# a compromised account gets frozen; needs root), make deb (the Debian package in dist/; needs root for apt),
# make lab (build the package, install it in a throwaway root under a real systemd, run the admin's story),
# make clean.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# Debian packages the real-Exim tests drive (exim -be/-bh/-bd, exiqgrep, swaks; socat and jq as the
# docs use them; systemd and iproute2 for the systemd lab; redis-server for fleet mode's shared store),
# and those the package build needs
# (dh-virtualenv bundles the Python dependencies; lintian checks the result)
DEBIAN_TEST_PACKAGES := exim4-daemon-light swaks socat jq systemd iproute2 redis-server
DEBIAN_BUILD_PACKAGES := build-essential debhelper dh-virtualenv lintian python3-dev python3-venv
DEB_BUILD_DIR := build/deb

# Install the Debian packages in $(1) that are missing (apt-get update first; needs root).
define apt_install
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" -ne 0 ]; then echo "make $@: need root to apt-get install$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

.PHONY: run test lint bench demo deb lab debian-test-deps debian-build-deps clean

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
	$(call apt_install,$(DEBIAN_TEST_PACKAGES))

debian-build-deps:
	$(call apt_install,$(DEBIAN_BUILD_PACKAGES))

# dpkg-buildpackage writes beside the source tree, so build in a copy under build/ (the
# checkout's own files, without the venv and caches) and collect the .deb in dist/.
deb: debian-build-deps
	rm -rf $(DEB_BUILD_DIR) && mkdir -p $(DEB_BUILD_DIR)/src dist
	tar -c --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./.git \
	    --exclude=./run --exclude=./var --exclude='*cache*' --exclude=__pycache__ . | \
	    tar -x -C $(DEB_BUILD_DIR)/src
	cd $(DEB_BUILD_DIR)/src && dpkg-buildpackage -us -uc -b --no-sign
	mv $(DEB_BUILD_DIR)/*.deb dist/
	lintian --fail-on error,warning dist/spamguardd_*.deb

# The suite includes the systemd lab (tests/test_deploy.py), which installs dist/'s package.
test: $(STAMP) debian-test-deps deb
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lab: $(STAMP) debian-test-deps deb
	$(BIN)/python -m pytest -s tests/test_deploy.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP) debian-test-deps
	$(BIN)/python bench/query_load.py
	$(BIN)/python bench/fleet_load.py

demo: $(STAMP) debian-test-deps
	$(BIN)/python contrib/demo.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .coverage run var build dist
