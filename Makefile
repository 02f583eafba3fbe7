# The dev loop: `make demo`, `make test`, `make lint`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[train,dev]'
	touch $(STAMP)

install: $(STAMP)

## The README's first command: the whole closed loop on the example, unattended (a few
## minutes): build v1 on day images, serve it, drift to fog and night, alert, retrain,
## canary, recover. Live timeline here; report in loopline-demo/report.html.
demo: $(STAMP)
	$(BIN)/loopline demo

## promtool checks the exported Prometheus alerting rules in the tests: taken from Debian's
## prometheus package where apt can fetch it (only the one binary is unpacked into .venv).
$(BIN)/promtool: | $(STAMP)
	@command -v apt-get >/dev/null && tmp=$$(mktemp -d) && \
	  (cd $$tmp && apt-get download -qq prometheus >/dev/null 2>&1 && \
	   dpkg-deb -x prometheus_*.deb x && cp x/usr/bin/promtool $(abspath $(BIN))/promtool); \
	  rm -rf "$$tmp"; test -x $@ || echo "promtool not installed: the rules are checked by parsing only"

## The whole test suite (PostgreSQL tests included; they never skip in CI).
test: $(STAMP) $(BIN)/promtool
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/train_bench.py
	$(BIN)/python benchmarks/ingest_bench.py
	$(BIN)/python benchmarks/serve_bench.py
	$(BIN)/python benchmarks/predict_bench.py
	$(BIN)/python benchmarks/monitor_bench.py
	$(BIN)/python benchmarks/loop_bench.py

clean:
	rm -rf .loopline lake loopline-demo .pytest_cache
