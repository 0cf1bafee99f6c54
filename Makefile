# DupHunter: `make run` starts the stack, `make test` runs the checks and the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint system-deps test-deps venv helpers bench-core bench-dedup bench-memory bench-scale bench-predict bench-buffer bench-gc bench-restore bench-auth clean

run: system-deps venv helpers
	$(BIN)/python -m deploy.local

test: test-deps venv helpers lint
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

system-deps:
	@bash deploy/system-deps.sh

test-deps:
	@bash deploy/system-deps.sh test

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

helpers: venv
	@bash pipelines/gohelpers/build.sh build/helpers

bench-core: test-deps venv helpers
	$(BIN)/python -m bench.core

CORPUS ?= small
bench-dedup: test-deps venv helpers
	$(BIN)/python -m bench.corpus build --size $(CORPUS)
	$(BIN)/python -m bench.corpus baseline --size $(CORPUS)
	$(BIN)/python -m bench.dedup

bench-memory: system-deps venv
	$(BIN)/python -m bench.memory

bench-gc: system-deps venv
	$(BIN)/python -m bench.gc

bench-buffer: venv
	$(BIN)/python -m bench.buffer_policies

bench-scale: system-deps venv helpers
	$(BIN)/python -m bench.scale

# about 19 minutes on 2 cores: two ingests and six 2-minute real-time replays
bench-predict: test-deps venv helpers
	$(BIN)/python -m bench.predict

# an honest user's latency with and without 64 clients flooding wrong logins (a few minutes)
bench-auth: test-deps venv
	$(BIN)/python -m bench.auth_flood

bench-restore: test-deps venv helpers
	$(BIN)/python -m bench.restore

clean:
	rm -rf build var .mypy_cache .ruff_cache .pytest_cache
