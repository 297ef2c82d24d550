# Every target does its own setup: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)
JARS   := kafka-dist/lib/.resolved

.PHONY: demo test lint typecheck unit venv kafka-jars system-deps bootstrap bench clean

demo: system-deps venv kafka-jars   ## replay a real labelled stream through Kafka, the model, DuckDB and the alerts
	$(BIN)/finpulse demo

test: system-deps venv kafka-jars lint typecheck unit   ## lint, type-check and run the whole test suite

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

unit: venv kafka-jars
	$(BIN)/python -m pytest -q

bootstrap: venv                  ## retrain the shipped adapters (about 20 min on a 2-core CPU)
	$(BIN)/finpulse bootstrap

bench: venv kafka-jars           ## scorer throughput: finpulse vs a naive per-message pipeline
	$(BIN)/finpulse bench score

system-deps:                     ## Java, Maven, Prometheus and Alertmanager from Debian, when missing
	scripts/system-deps.sh

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==24.3.1
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet setuptools==75.6.0 wheel==0.45.1
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

kafka-jars: $(JARS)

$(JARS): kafka-dist/pom.xml
	command -v mvn >/dev/null || { echo "Maven is needed to fetch the Kafka jars: apt-get install maven" >&2; exit 1; }
	rm -rf kafka-dist/lib
	mvn --batch-mode --quiet -f kafka-dist/pom.xml dependency:copy-dependencies
	touch $@

clean:
	rm -rf $(VENV) kafka-dist/lib .finpulse .mypy_cache .ruff_cache .pytest_cache
