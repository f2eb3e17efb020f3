# Checkout Guard -- developer entry points. `make help` lists them.
# Everything runs from the repo root with the project's virtualenv (.venv), installed by `make setup`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
PY := .venv/bin/python
LINT_DIRS := producers jobs sinks schemas infra tests
# pytest-xdist processes for the unit tests (auto: one per CPU); the e2e and pipeline tests run in one process
TEST_WORKERS ?= auto

.PHONY: help setup up down status topics reset lint static check run production test bench evaluate train backtest models train-default replay backtest-stream redrive labels chaos face-models

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  %-8s %s\n", $$1, $$2}'

setup: ## install apt packages, .venv, Kafka, the Flink connector and OpenSearch (idempotent)
	@bash infra/install.sh

up: setup ## start Kafka, OpenSearch and Mosquitto in the background and create the topics
	@$(PY) -m infra.stack up

down: ## stop the local stack
	@$(PY) -m infra.stack down

status: ## show the health of each service and the topics (exit 1 if something is down)
	@$(PY) -m infra.stack status

topics: ## create missing topics and list them
	@$(PY) -m infra.stack topics

reset: ## stop the stack and delete its data, logs and checkpoints
	@$(PY) -m infra.stack reset

lint: setup ## ruff check over the Python sources
	@$(PY) -m ruff check $(LINT_DIRS)

static: setup ## format check, lint (bugbear, complexity, length caps), type check, AWS template lint
	@$(PY) -m ruff format --check $(LINT_DIRS)
	@$(PY) -m ruff check $(LINT_DIRS)
	@$(PY) -m mypy
	@.venv/bin/cfn-lint infra/aws/*.yaml

check: static face-models ## the static gate, then the unit tests with warnings as errors
	@$(PY) -m pytest -q -n $(TEST_WORKERS) tests/unit

run: setup face-models train-default ## start the stack, the scoring job and the OpenSearch sink, drive live demo traffic (Ctrl-C stops)
	@$(PY) -m infra.demo

production: setup face-models ## the real services only, supervised, against the configured Kafka/OpenSearch/...; ARGS="--only dashboard"
	@$(PY) -m infra.production $(ARGS)

test: setup face-models ## the unit tests (in TEST_WORKERS processes), then the e2e and pipeline tests (one process: they share the stack it starts)
	@unit=0; rest=0; \
	  $(PY) -m pytest -q -n $(TEST_WORKERS) tests/unit || unit=$$?; \
	  $(PY) -m pytest -q tests/e2e tests/pipeline || rest=$$?; \
	  [ $$unit -eq 0 ] && [ $$rest -eq 0 ]

face-models: setup ## fetch FacePlugin's network (one of the default embedder fused3's) with npm (pinned, hash-checked; fast when there)
	@$(PY) -m jobs.faces fetch-models || case "$${CG_FACES__EMBEDDER:-fused3}" in \
	  fused3|faceplugin) echo "FacePlugin not fetched: CG_FACES__EMBEDDER=$${CG_FACES__EMBEDDER:-fused3} (the default) needs it; sface runs without"; exit 1 ;; \
	  *) echo "FacePlugin not fetched: fused3 unavailable, its tests will skip (CG_FACES__EMBEDDER=$$CG_FACES__EMBEDDER)" ;; esac

chaos: setup face-models ## the fault-injection suite alone (hostile records on every input, broker kill, OpenSearch stop, SMTP outage; also part of make test)
	@$(PY) -m pytest -q -s tests/e2e/test_chaos_e2e.py

bench: setup face-models ## measure raw Kafka vs end-to-end throughput, latency at a fixed rate and peak memory
	@$(PY) -m tests.bench.run

FRAUD_CSV ?= ../shared/data/fraud/afd_transactions_sample.csv
FRAUD_MODELS ?= .stack/models-afd
MODEL ?= $(FRAUD_MODELS)

evaluate: setup ## rolling-origin cross-validation of the fraud model on FRAUD_CSV, beside order_price alone
	@$(PY) -m jobs.model.train evaluate $(FRAUD_CSV)

train: setup ## evaluate, then train on every labelled row of FRAUD_CSV (Fraud Detector format) into FRAUD_MODELS
	@$(PY) -m jobs.model.train train $(FRAUD_CSV) --out $(FRAUD_MODELS)

backtest: setup ## replay FRAUD_CSV through features, model (MODEL, default the last `make train`) and rules
	@$(PY) -m jobs.model.train backtest $(FRAUD_CSV) --model $(MODEL) --output fraud-backtest.csv

models: setup ## champion/challenger: make models ARGS="status" | ARGS="challenger VERSION" | ARGS="promote" | ARGS="pack OUT.zip" (README)
	@$(PY) -m jobs.model.registry $(ARGS)

train-default: setup ## train the default model from seeded synthetic POS history if no model exists yet
	@$(PY) -m jobs.model.train train-default

replay: setup ## re-publish a topic range by offsets or time, e.g. make replay ARGS="transactions --dry-run" (README)
	@$(PY) -m producers.replay run $(ARGS)

backtest-stream: setup ## run a job copy with another rule set / model over a replayed range and compare (README)
	@$(PY) -m jobs.flink.backtest_stream run $(ARGS)

redrive: setup ## re-drive dead letters to their source topic, e.g. make redrive ARGS="--stage alert-sender --kind delivery_failed --dry-run"
	@$(PY) -m producers.redrive $(ARGS)

labels: setup ## publish fraud / legit verdicts to the labels topic, e.g. make labels ARGS="publish TX fraud --reason ..." or ARGS="import chargebacks.csv --dry-run"
	@$(PY) -m producers.labels $(ARGS)
