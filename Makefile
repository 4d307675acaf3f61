# The two set-up commands from the README: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test test-gpu test-slurm lint lint-cluster bench-projector clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and alone, so nothing else can choose a CUDA build for us
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,deepspeed,plot]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/lotus-train train --config configs/tiny.yaml

test: lint lint-cluster
	$(BIN)/python -m pytest tests

# The CUDA tests alone (NCCL groups, pinned memory); run them on a GPU machine.
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m cuda tests

# A real two-node SLURM on this machine (root; installs Debian's slurm-wlm the first time).
test-slurm: $(STAMP)
	LOTUS_TEST_SLURM=1 $(BIN)/python -m pytest -m slurm tests/test_slurm.py

lint: $(STAMP)
	$(BIN)/ruff check .

# shellcheck on the cluster scripts, hadolint on the Dockerfile (no Docker engine needed).
lint-cluster: $(STAMP)
	$(BIN)/shellcheck slurm/*.sbatch slurm/*.sh docker/*.sh
	$(BIN)/hadolint docker/Dockerfile

bench-projector: $(STAMP)
	$(BIN)/lotus-train bench projector

clean:
	rm -rf $(VENV) runs data/sample
