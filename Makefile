# Checkout Guard -- developer entry points. `make help` lists them.
# Everything runs from the repo root with the project's virtualenv (.venv), installed by `make setup`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
PY := .venv/bin/python
LINT_DIRS := producers jobs sinks schemas infra tests

.PHONY: help setup up down status topics reset lint run test bench

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

run: setup ## start the stack, the scoring job and the OpenSearch sink, drive live demo traffic (Ctrl-C stops)
	@$(PY) -m infra.demo

test: setup ## run the test suite (e2e tests start the stack themselves)
	@$(PY) -m pytest -q tests

bench: setup ## measure raw Kafka vs end-to-end throughput, latency at a fixed rate and peak memory
	@$(PY) -m infra.bench
