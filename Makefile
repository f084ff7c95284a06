# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
EPOCHS ?= 1000
ARGS ?=

.PHONY: run test lint typecheck venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/survey-proc run --epochs $(EPOCHS) $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check survey_proc tests benchmarks training
	$(VENV)/bin/mypy
	$(PY) -m pytest -n 2 $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check survey_proc tests benchmarks training

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV)
