# Two commands for a new user:  `make demo`  (set up and run a federation)  and  `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test check lint typecheck bench clean

setup: $(BIN)/fedhive

$(BIN)/fedhive: pyproject.toml scripts/setup.sh
	scripts/setup.sh
	@touch $@

demo: setup
	$(BIN)/fedhive demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	$(BIN)/mypy
	$(BIN)/mypy --explicit-package-bases bench

check: lint typecheck

bench: setup
	$(BIN)/python bench/aggregation.py --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache fedhive-data
