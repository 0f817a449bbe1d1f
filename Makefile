# `make demo` and `make test` each set up .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DATA ?= data/demo

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,pretrained,tensorboard,mlflow,export,tune]'
	touch $(STAMP)

$(DEMO_DATA)/train.csv: $(STAMP)
	$(VENV)/bin/aicoss demo-data $(DEMO_DATA)

demo: $(STAMP) $(DEMO_DATA)/train.csv
	$(VENV)/bin/aicoss train recipes/demo.toml --data $(DEMO_DATA)

test: $(STAMP)
	$(PY) -m pytest -q -n auto --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto -m "not slow" --durations=15

bench: $(STAMP)
	$(PY) bench/inference_overhead.py
	$(PY) bench/train_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
