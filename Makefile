# The two commands the README opens with: `make demo` and `make test`.
# Everything installs into .venv with pip (torch is pinned to a CPU build that pip finds here;
# uv and poetry would fetch a multi-GB CUDA build instead).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean-store

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/smpo run --profile tiny

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/pytest -q

clean-store:
	rm -rf smpo-store
