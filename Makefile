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

## Generate the example data lake, build a model from it, then show the domain shift:
## a model trained on daytime images only, scored on every condition.
demo: $(STAMP)
	@test -f loopline.yaml || $(BIN)/loopline init
	test -f lake/manifest.csv || $(BIN)/loopline datagen --out lake --images 5000
	$(BIN)/loopline build
	$(BIN)/loopline build --set 'data.filter={condition: [day]}' --set model.name=vehicles-day
	$(BIN)/loopline evaluate vehicles-day@candidate
	$(BIN)/loopline models

## The whole test suite (PostgreSQL tests included; they never skip in CI).
test: $(STAMP)
	$(BIN)/python -m pytest -q

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

clean:
	rm -rf .loopline lake .pytest_cache
