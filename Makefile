# Two entry points on a fresh machine: `make run` (install, train the default model if none exists,
# serve on 127.0.0.1:10025) and `make test` (install with test extras, lint, run the test suite).

PYTHON ?= python3
VENV ?= .venv
# On a CPU-only machine install a CPU build of torch first, or pip pulls a multi-GB CUDA build
# (README, Install). Override e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= config.yaml
MODEL ?= models/default
SMS_DATA ?= $(wildcard ../shared/data/sms_spam_collection/SMSSpamCollection)
BIN = $(VENV)/bin

.PHONY: install run train test lint bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

$(MODEL)/model.json: | install
	$(BIN)/spamfilterd-train $(if $(SMS_DATA),--data $(SMS_DATA)) --out $(MODEL)

train: $(MODEL)/model.json

run: install train
	$(BIN)/spamfilterd serve --config $(CONFIG) --model $(MODEL)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/bench_score.py
