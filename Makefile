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
# A directory laid out like the SpamAssassin public corpus (folders *ham* and spam*); without one
# the default model is SMS-only (README, Training).
EMAIL_CORPUS ?= $(wildcard ../shared/data/spamassassin_2002)
BIN = $(VENV)/bin

.PHONY: install run train test lint bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[train,test]'
	touch $@

install: $(BIN)/.installed

# The default model: every SMS (stratified, not the balanced reference split) plus the email corpus.
$(MODEL)/model.json: | install
	$(if $(EMAIL_CORPUS),,@echo "make train: no EMAIL_CORPUS given and ../shared/data/spamassassin_2002 is absent:" \
	    "training an SMS-only model, which is not ready for email (README, Training)")
	$(BIN)/spamfilterd-train $(if $(SMS_DATA),--data $(SMS_DATA)) --no-balance \
	    $(if $(EMAIL_CORPUS),--email-corpus $(EMAIL_CORPUS)) --threads 2 --out $(MODEL)

train: $(MODEL)/model.json

run: install train
	$(BIN)/spamfilterd serve --config $(CONFIG) --model $(MODEL)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/bench_score.py
