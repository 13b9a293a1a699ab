# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install Light-MoE, generate text with the bundled demo model
#   make test   - create .venv, install Light-MoE with test dependencies, run the test suite
# TORCH_SPEC picks the PyTorch build to install (default: the CPU wheel of 2.13.0; pass e.g.
# TORCH_SPEC=torch to let pip choose a CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PROMPT ?= def fibonacci(n):

.PHONY: demo test install install-dev lint clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/activate pyproject.toml
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -e ".[dev,server]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/light-moe generate "$(PROMPT)" --max-tokens 96 --stream

test: install-dev
	$(PY) -m pytest -q -ra

lint: install-dev
	$(VENV)/bin/ruff check light_moe tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
