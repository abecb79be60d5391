# voxelome — the two commands a new user runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A pinned CPU build of torch first: a loose spec would pull several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning slows torch 10-100x.
export OMP_WAIT_POLICY ?= PASSIVE
DEMO_OUT ?= voxelome-demo

.PHONY: demo test venv install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

venv: $(BIN)/python

install: venv
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .

install-test: venv
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"

demo: install
	$(BIN)/voxelome demo --out $(DEMO_OUT)

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
