# The two set-up commands from the README: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test lint bench-projector clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and alone, so nothing else can choose a CUDA build for us
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/lotus-train train --config configs/tiny.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench-projector: $(STAMP)
	$(BIN)/lotus-train bench projector

clean:
	rm -rf $(VENV) runs data/sample
