# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PORT ?= 8501

.PHONY: run test test-postgres lint bench install install-dev install-postgres browser clean min-versions

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

$(VENV)/.installed-postgres: pyproject.toml $(VENV)/.installed
	$(PIP) install -q -e '.[postgres]'
	touch $@

install: $(VENV)/.installed

install-postgres: $(VENV)/.installed-postgres

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

# SQLite, whatever the shell says: the PostgreSQL pass is `make test-postgres`. ruff first (a
# second); mypy (a core for about 15 s) runs beside the suite's first tests, and fails it too.
test: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy & mypy_pid=$$!; \
	env -u WORKBENCH_TEST_DATABASE_URL $(PY) -m pytest -q -p no:cacheprovider --durations=15; rc=$$?; \
	wait $$mypy_pid || rc=1; exit $$rc

# The storage, job and page tests again, on a real PostgreSQL server; not part of `make test`
# (its own time). WORKBENCH_TEST_DATABASE_URL is a server URL without a database, for a role
# that may CREATE DATABASE: each test gets a fresh wb_test_* database, dropped afterwards.
# Locally: .ci/start-postgres starts Debian's server and prints such a URL, e.g.
#   make test-postgres WORKBENCH_TEST_DATABASE_URL=postgresql+psycopg://wb_test:wb_test@127.0.0.1:5432
PG_TESTS := tests/test_storage.py tests/test_jobs.py tests/test_tasks.py tests/test_races.py \
	tests/test_gc.py tests/test_cli_data.py tests/test_pages.py tests/test_workers_multihost.py

test-postgres: export WORKBENCH_TEST_DATABASE_URL := $(WORKBENCH_TEST_DATABASE_URL)
test-postgres: install-dev install-postgres
	@test -n "$$WORKBENCH_TEST_DATABASE_URL" || \
	  { echo "set WORKBENCH_TEST_DATABASE_URL (see the comment above test-postgres in the Makefile)" >&2; exit 2; }
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 $(PG_TESTS)

# Every declared floor installed exactly in a fresh venv, then a smoke test (ingest, train lite0
# at 96 px for 1 epoch, export, predict); appends to bench/results_min_versions.md. Not part of
# `make test` (its own install time). MIN_TORCH / MIN_TORCH_LINK: see .ci/min-versions and README.
min-versions:
	.ci/min-versions $(MIN_VENV)

bench: install-dev
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
