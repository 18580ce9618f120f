# FedOPAL: `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | sha1sum | cut -c1-12)
export PYTHONPATH := $(CURDIR)/custom
export FEDOPAL_HOME := $(CURDIR)

.PHONY: .venv venv demo test test-fast prepare export clean

.venv venv: $(STAMP)

# Idempotent: reinstalls only when requirements.txt changes. torch goes first so that the CPU wheel
# on disk satisfies every later `torch` requirement (a bare `torch` would pull a multi-GB CUDA build).
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.txt
	$(PIP) check
	rm -f $(VENV)/.installed-*
	touch $@

data/demo_federation/federation.json: $(STAMP) custom/fedopal/prepare.py data/medmnist/pneumoniamnist.npz
	$(PY) -m fedopal.prepare --npz data/medmnist/pneumoniamnist.npz --out data/demo_federation --sites 4 --seed 0

prepare: data/demo_federation/federation.json

demo: prepare
	$(PY) -m fedopal.job --config app_configs/demo.yaml --simulate --workspace workspace --results results/demo

export: $(STAMP)
	$(PY) -m fedopal.job --config app_configs/demo.yaml --export jobs

test: prepare
	$(PY) -m pytest -q tests

test-fast: prepare
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf workspace results data/demo_federation
