# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUNTIME := $(VENV)/.installed-runtime
BYTECODE := $(VENV)/.compiled
PYTEST_ARGS ?=
# pytest-xdist workers: two keep this 2-core machine busy through the suite's compiles and waits; a file's tests
# stay in one worker, so its module fixtures are built once.
TEST_WORKERS ?= 2

.PHONY: venv test test-all lint demo app browser clean

# The runtime set (what `make demo` needs) and the project install with uv when it can (about 5x faster than pip
# here), else pip; the test set adds torch/diffusers/pytest with pip, which reads this machine's pip configuration
# (CPU torch).
$(RUNTIME): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	($(PY) -m pip install --quiet uv==0.13.9 && $(VENV)/bin/uv pip install --quiet --python $(PY) -r requirements.txt && \
	  $(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps -e .) || \
	  ($(PY) -m pip install --quiet -r requirements.txt && $(PY) -m pip install --quiet --no-deps -e .)
	touch $(RUNTIME)

$(STAMP): $(RUNTIME) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# The suite starts about 40 Python processes (workers, command-line runs): each would compile the ~3500 sources it
# imports (8-9 CPU-s) where PYTHONDONTWRITEBYTECODE is set, as here, because uv installs without bytecode. So the
# tests compile the venv's bytecode once (about 40 s on 2 cores); the demo, one process, does not wait for it.
# A few third-party files are templates for other Python versions and do not compile: not an error.
$(BYTECODE): $(STAMP)
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	touch $(BYTECODE)

venv: $(BYTECODE)

test: $(BYTECODE) browser  ## default suite (everything not marked slow)
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-all: $(BYTECODE) browser  ## also the slow cases
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check handi_jax configs data_prep tests launch

demo: $(RUNTIME)  ## the main job on the embedded default: tiny model, demo data, CPU
	$(PY) -m handi_jax.main --config=configs/stage2.py --workdir=runs/demo --mode=demo

# After `make demo`, the page generates with the demo's trained UNets (the page says which weights it uses).
DEMO_WEIGHTS = $(if $(wildcard runs/demo/checkpoints),--config.generate.stage2_pretrained=runs/demo) \
  $(if $(wildcard runs/demo/stage1/checkpoints),--config.generate.stage1_pretrained=runs/demo/stage1)

app: $(RUNTIME)  ## the web page on http://127.0.0.1:7860 (embedded default: tiny models); ARGS=--port=N ...
	$(PY) -m handi_jax.app --config=configs/stage2.py --workdir=runs/app $(DEMO_WEIGHTS) $(ARGS)

# Debian's chromium + chromium-driver for tests/test_app.py's browser test. Where apt-get cannot install them
# (not root, no network) this says so and the test skips with the reason; it never fails the test run.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { echo "make browser: installing chromium and chromium-driver with apt-get"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium chromium-driver fonts-dejavu-core) >/dev/null 2>&1 || \
	    echo "make browser: apt-get could not install chromium; the browser test will be skipped"; }

clean:
	rm -rf $(VENV) runs .pytest_cache
