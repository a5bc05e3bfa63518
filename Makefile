# make demo: the whole workflow on the bundled sample, on the CPU, in a few minutes.
# make test: the test suite. Each sets up .venv first (pip; torch from the pinned release).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.pneumo-installed

.PHONY: install demo test lint bench-extra clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile tools/install_browser.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH)
	$(PIP) install -q --disable-pip-version-check -e ".[test,tensorboard,mlflow,dicom,onnx,ray,postgres]"
	bash tools/install_browser.sh $(VENV) || echo "warning: Chromium not installed; the browser test will be skipped"
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

bench-extra: install
	$(PIP) install -q --disable-pip-version-check -e ".[bench]"

clean:
	rm -rf $(VENV) demo-output .pytest_cache
