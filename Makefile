# DupHunter: `make run` starts the stack, `make test` runs the checks and the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run stop test lint system-deps test-deps venv helpers bench-core bench-dedup bench-memory bench-scale bench-predict bench-buffer bench-gc bench-restore bench-pull bench-auth bench-fleet bench-rebuild-cpu clean

# The first build of the encoder helpers compiles for minutes: its output goes to a file,
# whose end is shown if it fails. Stopping: Ctrl-C, or `make stop` from another terminal.
BUILD_LOG := var/build.log
run: system-deps venv
	@mkdir -p var
	@echo "building the encoder helpers if needed (minutes the first time; output in $(BUILD_LOG))"
	@$(BUILD_HELPERS) >$(BUILD_LOG) 2>&1 || { tail -n 30 $(BUILD_LOG); \
		echo "building the encoder helpers failed: the whole output is in $(BUILD_LOG)"; exit 1; }
	@grep -E '^(WARNING|skipping)' $(BUILD_LOG) || true
	@$(BIN)/python -m deploy.local

stop: venv
	@$(BIN)/python -m deploy.local --stop

# Two test processes (pytest-xdist), each with its own stacks on free ports, a module in
# one process: about 21-24 minutes here against 37 serial. TEST_WORKERS=0 runs them in
# this process, one after the other.
TEST_WORKERS ?= 2
test: test-deps venv helpers lint
	$(BIN)/pytest -q --durations=20 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# lint-imports: the layers of pipelines/ and its forbidden imports (pyproject.toml)
lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

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

BUILD_HELPERS := bash pipelines/encoders/gohelpers/build.sh build/helpers
helpers: venv
	@$(BUILD_HELPERS)

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

# a simulation of the restore fleet from docs/bench/{predict,restore,dedup}.json (seconds)
bench-fleet: venv
	$(BIN)/python -m bench.fleet

# the tar rebuild's CPU per 100 MB, beside the work no rebuild can skip (a minute)
bench-rebuild-cpu: test-deps venv
	$(BIN)/python -m bench.rebuild_cpu --reps 9 --floor

# cold pulls of multi-layer images with skopeo and podman, against Distribution (~10 min)
bench-pull: test-deps venv helpers
	$(BIN)/python -m bench.pull

clean:
	rm -rf build var .mypy_cache .ruff_cache .pytest_cache
