# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need
# into .venv (or into the interpreter named by PYTHON=...) and are fast on a second run.
# On machines without an NVIDIA driver torch is pinned to the CPU build via constraints-cpu.txt.

SHELL := /bin/bash
VENV ?= .venv
ifdef PYTHON
PY := $(PYTHON)
STAMP := .make/installed-$(subst /,_,$(PYTHON))
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
endif
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints-cpu.txt)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-gpu lint bench clean

install: $(STAMP)

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(STAMP): requirements.txt constraints-cpu.txt pyproject.toml $(if $(PYTHON),,$(VENV)/bin/python)
	@mkdir -p $(dir $(STAMP))
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m videoblade.demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

lint: $(STAMP)
	$(PY) -m ruff check videoblade tests benchmarks utils wanx cogvideox

bench: $(STAMP)
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/transformer.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/e2e.py

clean:
	rm -rf .make runs/demo
