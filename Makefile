# make demo: the whole workflow on the bundled sample, on the CPU, in a few minutes.
# make test: the test suite. Each sets up .venv first, from requirements.lock (every package pinned
# with its hashes; pyproject.toml keeps the loose ranges for library users).
# make lock: re-resolve requirements.lock (LOCK_ARGS=--upgrade for the newest releases); make audit:
# pip-audit on it (needs PyPI's JSON API or OSV: network). pip-tools and pip-audit live in $(TOOLS).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
STAMP  := $(VENV)/.pneumo-installed
EXTRAS := test,tensorboard,mlflow,dicom,dicom-node,onnx,ray,postgres
LOCK   := requirements.lock
TOOLS  ?= .venv-tools
# TORCH="torch==... --index-url ..." installs another PyTorch build and resolves the rest from
# pyproject.toml's ranges: not locked (README, "Install size, and PyTorch's CPU build").
TORCH  ?=
# The interpreter and machine a lock is for, as its "# platform:" line says: cpython-311-linux-x86_64.
PLATFORM_OF = $(1) -c 'import platform, sys; print(f"{sys.implementation.cache_tag}-{sys.platform}-{platform.machine()}")'

.PHONY: install demo test lint lock audit bench-extra clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK) tools/install_browser.sh tools/install_pacs.sh
	test -x $(PY) || python3 -m venv $(VENV)
ifeq ($(strip $(TORCH)),)
	@want=$$(sed -n 's/^# platform: \([^ ]*\).*/\1/p' $(LOCK)); have=$$($(call PLATFORM_OF,$(PY))); test "$$want" = "$$have" || \
	  { echo "$(LOCK) is for $$want, $(VENV) is $$have: run make lock with this Python (README, Locked install)" >&2; exit 1; }
	$(PIP) install --require-hashes -r $(LOCK)
	$(PIP) install --no-deps --no-build-isolation -e .
else
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[$(EXTRAS)]"
endif
	bash tools/install_browser.sh $(VENV) || echo "warning: Chromium not installed; the browser test will be skipped"
	bash tools/install_pacs.sh || echo "warning: Orthanc/DCMTK not installed; the Orthanc tests will be skipped"
	touch $(STAMP)

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash tools/demo.sh

# The layers (import-linter contracts in pyproject.toml) and ruff's lint and format checks come first:
# a module that imports a layer above it, or an import cycle, fails `make test` like a failing test.
lint: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check src tests bench tools
	$(VENV)/bin/ruff format --check src tests bench tools

test: lint
	$(PY) -m pytest -q

$(TOOLS)/bin/pip-compile:
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q --disable-pip-version-check pip-tools==7.7.0 pip-audit==2.10.1

# Keeps every pin that still satisfies pyproject.toml and requirements.in (the torch release);
# LOCK_ARGS=--upgrade takes the newest releases, LOCK_ARGS="--upgrade-package NAME" one package's.
# pip's own configuration (extra indexes, find-links) is used but not written into the lock.
lock: $(TOOLS)/bin/pip-compile
	CUSTOM_COMPILE_COMMAND="make lock" $(TOOLS)/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
	  --no-emit-find-links --extra $(EXTRAS) $(LOCK_ARGS) \
	  -o $(LOCK) pyproject.toml requirements.in
	{ echo "# platform: $$($(call PLATFORM_OF,$(TOOLS)/bin/python)) (Python, OS, machine: make install checks it)"; \
	  echo "# What make install and CI install, every package pinned with its hashes (pip --require-hashes),"; \
	  echo "# for this platform only: elsewhere torch's dependencies differ, so run make lock there."; \
	  echo "# pneumo itself goes on top with pip install --no-deps -e ."; cat $(LOCK); } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

# --strict: a package the service cannot look up fails the audit instead of passing unchecked.
# AUDIT_ARGS="-s osv" asks OSV instead of PyPI.
audit: $(TOOLS)/bin/pip-compile
	$(TOOLS)/bin/pip-audit --strict --disable-pip --require-hashes -r $(LOCK) --progress-spinner off $(AUDIT_ARGS)

bench-extra: install
	$(PIP) install -e ".[bench]"

clean:
	rm -rf $(VENV) $(TOOLS) demo-output .pytest_cache
