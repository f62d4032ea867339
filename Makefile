# MedChain: two commands on a fresh Linux machine with Python >= 3.11.
#   make demo   create .venv, install, run the end-to-end demo on embedded defaults
#   make test   create .venv if needed, install with test extras, run the whole suite

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 satisfies the pyproject range; on machines that keep its CPU wheel on disk
# pip takes it from there in seconds instead of downloading a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench clean

demo: $(STAMP)
	$(BIN)/medchain demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/crypto.py
	$(BIN)/python bench/inference.py

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required, found " + sys.version.split()[0] + "; run: make PYTHON=python3.11 ...")'
	@test -x $(BIN)/python || { echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@$(BIN)/python -c 'import torch' 2>/dev/null || { echo "installing $(TORCH_SPEC)"; $(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"; }
	@echo "installing medchain and its dependencies into $(VENV)"
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

clean:
	rm -rf $(VENV) .medchain-demo .pytest_cache .hypothesis *.egg-info
