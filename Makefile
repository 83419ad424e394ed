# mcdist developer commands. `make run` and `make test` are all a newcomer needs.
# VENV may point elsewhere: `make test VENV=/tmp/venv`.

VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.mcdist-setup-stamp
RUN_CONFIG ?= examples/main_job.json
RUN_OUT ?= runs/main_job
PYTEST_ARGS ?=
# `make test` runs on TEST_WORKERS pytest-xdist workers (every Ray test on one of them, in turn); 0: one process
TEST_WORKERS ?= 2

.PHONY: setup run test test-slow test-faults bench clean-runs

setup: $(STAMP)

# Re-runs only when pyproject.toml changes (or the venv is new). On a machine without nvidia-smi the CPU build
# torch==2.13.0 is installed (pinned: an unpinned torch would pull a multi-GB CUDA build); with a GPU, an
# existing torch is left alone and a missing one is installed unpinned.
$(STAMP): pyproject.toml
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PYTHON) -c 'import torch' 2>/dev/null || $(PYTHON) -m pip install torch; \
	else \
		$(PYTHON) -m pip install --quiet torch==2.13.0; \
	fi
	$(PYTHON) -m pip install --quiet -e '.[dev,data,ray,triton]'
	@touch $(STAMP)

# The main job (docs/launch.md, docs/results.md): a local Ray (or the one `ray start` left running here) trains
# softmax attention, grm and the base RNN (aggregation none) on MQAR, each with sp = 2 on two CPU workers, saves,
# reloads and scores all three.
RUN_MODELS ?= attention,grm,none
run: setup
	rm -rf $(RUN_OUT)
	$(PYTHON) -m mcdist.cli compare --ray --config $(RUN_CONFIG) --set train.out_dir=$(RUN_OUT) \
		--models $(RUN_MODELS)

test: setup
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadgroup --durations=15 \
		$(PYTEST_ARGS)

test-slow: setup
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -m slow $(PYTEST_ARGS)

# The fault-injection suite, fast part and soak (docs/reliability.md): kills, damaged checkpoints, a full disk,
# two trainers. `make test` runs its fast part. FAULT_TRIALS=N sets the soak's trials, FAULT_SEED=S its draws.
FAULT_TRIALS ?=
FAULT_SEED ?= 0
test-faults: setup
	TRITON_INTERPRET=1 MCDIST_FAULT_SEED=$(FAULT_SEED) $(if $(FAULT_TRIALS),MCDIST_FAULT_TRIALS=$(FAULT_TRIALS)) \
		$(PYTHON) -m pytest tests/faults $(PYTEST_ARGS)

bench: setup
	$(PYTHON) -m mcdist.bench

clean-runs:
	rm -rf runs
