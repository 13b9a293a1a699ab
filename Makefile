# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install Light-MoE, generate text with the bundled demo model
#   make test   - create .venv, install Light-MoE with test dependencies, run the test suite
# TORCH_SPEC and TORCH_INDEX pick the PyTorch build: by default torch 2.13.0 from pip's configured indexes (PyPI:
# the CUDA build on Linux x86_64, the CPU build elsewhere; a machine whose pip is set up with a local CPU wheel
# gets that); TORCH_INDEX=https://download.pytorch.org/whl/cpu forces the CPU build, .../whl/cu128 a CUDA one.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
PROMPT ?= def fibonacci(n):
# the small demo model loops under greedy decoding ("the string, and the string, ..."): sample instead
DEMO_SAMPLING ?= --temperature 0.6 --top-p 0.9 --repetition-penalty 1.2 --seed 1

.PHONY: demo test install install-dev lint clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/activate pyproject.toml
	$(PIP) install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -e ".[dev,server]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/light-moe generate "$(PROMPT)" --max-tokens 96 --stream $(DEMO_SAMPLING)

test: install-dev
	$(PY) -m pytest -q -ra

lint: install-dev
	$(VENV)/bin/ruff check light_moe tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
