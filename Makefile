# Two commands set up a fresh clone: `make demo` (the main job) and `make test`.
# Both create .venv if missing and install the pinned dependencies (requirements/).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# DDS discovery stays on this machine for every rclpy process started from here
# (tests, demo, benches). The nodes themselves never set this: real setups span computers.
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST
export ROS_DOMAIN_ID ?= $(shell $(PYTHON) -c 'import os; print(1 + os.getpid() % 100)')
export PYTHONUNBUFFERED := 1

.PHONY: setup test lint pytest test-slow demo bench clean models

# ONNX Runtime versions of the shipped bundles (engine auto measures both and keeps the faster: on CPUs
# ONNX Runtime, 1.6x for the default; docs/BENCHMARK.md). Generated, not in git; a failed conversion only
# warns (guidance then runs on torch).
ONNX_MODELS := $(patsubst %.pt,%.onnx,$(wildcard models/*.pt))

setup: $(STAMP) $(ONNX_MODELS)

models/%.onnx: models/%.pt $(STAMP)
	@echo "converting $< to ONNX (once; about 30 s)"
	@$(VENV)/bin/cardiac-copilot export $< --format onnx --out $@ > $@.log 2>&1 && tail -n 1 $@.log \
		|| (tail -n 3 $@.log; echo "warning: $@ not written; guidance runs $< on torch")
	@rm -f $@.log

$(STAMP): requirements/core.txt requirements/ros.txt requirements/onnx.txt requirements/dev.txt setup.py setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check cardiac_copilot_ros test launch setup.py

pytest: setup
	$(PY) -m pytest

test: lint pytest

test-slow: setup
	$(PY) -m pytest --runslow

demo: setup
	$(VENV)/bin/cardiac-copilot demo

# The shipped models (models/default.md): the coarse stage (preset approach) and the fine stage (preset
# fine), trained side by side with `make -j2 models` (about an hour on 2 cores), exported with fp16
# weights; then two DAgger iterations on the fine stage whose rollouts include the servo's final-approach
# survey (cardiac-copilot dagger, the rollouts in one process per core on ONNX Runtime; 51 minutes); the iteration
# chosen on validation subjects becomes models/fine.pt. About 2 h 15 min in all on session 12's 2-core machine
# (the trainings side by side about 82 min there), 1 h 50 min on a 1.25x faster one. After an
# interruption the same command resumes every step.
TRAIN := $(VENV)/bin/cardiac-copilot train --model baseline --threads 1 --out-dir runs
runs/default_%/.done: | setup
	$(TRAIN) --preset $(if $(filter coarse,$*),approach,fine) --run-name default_$* \
		$(if $(wildcard runs/default_$*/checkpoints/*.pt),--resume runs/default_$*)
	touch $@

DAGGER_ITERATIONS ?= 2
models: runs/default_coarse/.done runs/default_fine/.done
	$(VENV)/bin/cardiac-copilot export runs/default_coarse --out models/default.pt --fp16
	$(VENV)/bin/cardiac-copilot export runs/default_fine --out runs/default_fine/bundle.pt --fp16
	$(VENV)/bin/cardiac-copilot dagger --stage fine --coarse models/default.pt --fine runs/default_fine/bundle.pt \
		--init runs/default_fine --out runs/dagger_fine_survey --iterations $(DAGGER_ITERATIONS) --subjects 300 \
		--steps 2000 --rollout-set stop_frames=10 survey_poses=4
	cp "$$(cat runs/dagger_fine_survey/best.txt)" models/fine.pt
	$(MAKE) setup

clean:
	rm -rf build install log .pytest_cache
