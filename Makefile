# The two commands the README opens with: `make demo` and `make test`.
# Everything installs into .venv with pip (torch is pinned to a CPU build that pip finds here;
# uv and poetry would fetch a multi-GB CUDA build instead).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo tiny-demo toy-demo toy-world study test test-slow lint clean-store reference-check bench

# Torch threads of the demos and the study. One: on 2 cores shared with other work, two OpenMP
# threads spin against each other (measured: the toy run's invert 13 s at one thread, 113 s at
# two beside one busy process; train 20 s against 311 s). DEMO_THREADS=2 on two quiet cores.
DEMO_THREADS ?= 1

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# Only for the real CLIP BPE vocabulary file it ships (HPSv2's tokenizer): never imported,
	# so none of its dependencies (torchvision, timm) are wanted.
	$(BIN)/pip install --quiet --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

# The toy world: a base model pretrained here on drawn scenes, simulated annotators, a reward
# model fine-tuned on their labels; the run ends with the true-reward gain and its interval.
demo: install
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/smpo run --profile toy

toy-demo: demo

# The random tiny models (what the tests run): the pipeline's mechanics, no alignment.
tiny-demo: install
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/smpo run --profile tiny

# After a new base model (weights/toy-sd, smpo_core/worlds/toy/README.md): the pairs the
# pipeline scores, sampled from it and labelled by the annotators, then the reward model,
# trained on four fifths of them (and drawn pairs) and measured on the fifth it never saw.
TOY := smpo_core/worlds/toy/weights
toy-world: install
	$(BIN)/python -m smpo_core.worlds.toy.pairs $(TOY)/toy-pickapic --seed 0 --threads 1
	$(BIN)/python -m smpo_core.worlds.toy.reward $(TOY)/toy-reward --pairs $(TOY)/toy-pickapic \
		--steps 400 --batch 32 --threads 1

# The five methods x three seeds on the toy world: study.json, table.md, curves.png in
# smpo-store/study/ and one MLflow parent run with a child per method (flows/study.py).
study: install
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/smpo study

lint: install
	$(BIN)/ruff check .

# Two pytest-xdist workers (tests/conftest.py sends whole modules), one thread each:
# torch's default of one OpenMP thread per core, in two workers beside the servers and
# subprocesses the tests start, oversubscribes the cores, and spinning OpenMP threads then cost
# 4-5x the CPU time of a single thread (measured: a tiny UNet forward, 0.47 vs 0.10 CPU-s).
TEST_WORKERS ?= 2
test: install lint
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/pytest -q -m 'not slow' -n $(TEST_WORKERS)

# Tests over make test's budget, or not yet seen to pass on 2 cores (pyproject's `slow` marker).
test-slow: install
	$(BIN)/pytest -q -m slow

# Every performance figure as side-by-side ratios (bench/run.py): bench/results/<date>-cpu.json
# and .md; ~4 CPU minutes at one thread. One thread: the cores here are shared, and OpenMP
# threads on oversubscribed cores spin against each other. The GPU figures: bench/gpu.sh.
BENCH_THREADS ?= 1
bench: install
	OMP_NUM_THREADS=$(BENCH_THREADS) $(BIN)/python bench/run.py --threads $(BENCH_THREADS)

clean-store:
	rm -rf smpo-store

# Our HPSv2 / ImageReward / aesthetic ports against the reference packages (hpsv2x,
# image-reward) in a throwaway venv: same scores to 1e-4 on small random checkpoints.
reference-check: install
	bash bench/reference_check.sh

# A local Prefect server (UI :4200), work pool, worker and MLflow server (UI :5000) on the store,
# with the deployments of prefect.yaml registered; `make stop` ends exactly what it started.
# Environment: SMPO_STORE, SMPO_PREFECT_PORT, SMPO_MLFLOW_PORT, SMPO_WORK_POOL (flows/serve.py).
.PHONY: serve stop

serve: install
	$(BIN)/python -m flows.serve start

stop:
	$(BIN)/python -m flows.serve stop
