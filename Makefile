# The two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean reproductions

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

# Prepare the demo data, show the plan, train it (resuming if runs/demo has checkpoints), write the report.
demo: $(STAMP)
	$(BIN)/clt prepare demo --out data/demo --quiet
	$(BIN)/clt plan show configs/demo.py
	$(BIN)/clt train configs/demo.py --workdir runs/demo
	$(BIN)/clt report runs/demo
	@echo "metrics: runs/demo/metrics.jsonl   events: runs/demo/events.jsonl   report: runs/demo/report/report.md"

# The paper reproductions: run the sweeps of configs/papers/ (finished runs are skipped) and write REPRODUCTIONS.md
# from their reports (docs/reproductions/). About 30 minutes on a 2-core CPU the first time (9 sweeps, 94 runs).
reproductions: $(STAMP)
	$(BIN)/clt prepare demo --out data/demo --quiet
	$(BIN)/python benchmarks/reproductions.py

test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu $(BIN)/python -m pytest tests

clean:
	rm -rf runs data/demo
