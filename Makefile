# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test test-all lint demo clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)  ## default suite (everything not marked slow)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)  ## also the slow cases
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check handi_jax configs data_prep tests launch

demo: $(STAMP)  ## the main job on the embedded default: tiny model, demo data, CPU
	$(PY) -m handi_jax.main --config=configs/stage2.py --workdir=runs/demo --mode=demo

clean:
	rm -rf $(VENV) runs .pytest_cache
