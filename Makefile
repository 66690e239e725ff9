# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PORT ?= 8501

.PHONY: run test lint bench install install-dev browser clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Reinstall only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev browser

# The end-to-end test drives Debian's Chromium (a Playwright browser download does not work offline).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "warning: could not install chromium; the browser test will be skipped"; \
	fi

# Data in ./workbench-data unless WORKBENCH_DATA_DIR says otherwise (see workbench/settings.py).
# `workbench ui`: headless, no usage stats; refuses a non-loopback host without a password.
run: install
	$(VENV)/bin/workbench ui --host 127.0.0.1 --port $(PORT)

# Lint and type checks first: they take seconds and catch what the suite would spend minutes on.
lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

bench: install-dev
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
