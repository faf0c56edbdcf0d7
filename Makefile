# One command installs, one runs the example, one tests. `.ci/run` runs `make install && make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, as TORCH names it, from TORCH_INDEX when given. From PyPI on Linux x86_64,
# torch==2.13.0 is the CUDA build (several GB); for the CPU-only build:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
EXAMPLE_OUT ?= examples/out
# lm-eval: eval --tasks and its tests (about 50 packages, 3-4 minutes); EXTRAS=dev installs without it.
EXTRAS ?= dev,lm-eval

.PHONY: install test lint example example-data study bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy src

# LAWA, EMA and SWA over the tiny trained run that ships in examples/, then their held-out loss beside
# the original checkpoints' (the table; LAWA is below the run) and the curves (about 30 s on two busy
# cores, mostly start-up). One thread: a 108K-parameter model gains nothing from more, and on a busy
# machine two oversubscribed threads made the eval 1.3-3.6x slower (measured).
example: export OMP_NUM_THREADS ?= 1
example:
	$(BIN)/ckptavg ls examples/tiny-run
	$(BIN)/ckptavg lawa examples/tiny-run --steps 5000:10000 --k 5 --interval 1000 --out $(EXAMPLE_OUT)/lawa
	$(BIN)/ckptavg ema examples/tiny-run --steps 1000:10000 --decay 0.7 --interval 3000 --out $(EXAMPLE_OUT)/ema
	$(BIN)/ckptavg swa examples/tiny-run --steps 6000:10000 --start 6000 --every 1000 --interval 2000 --out $(EXAMPLE_OUT)/swa
	$(BIN)/ckptavg eval --run examples/tiny-run --steps 1000:10000:1000 $(EXAMPLE_OUT)/lawa/step* $(EXAMPLE_OUT)/ema/step* \
		$(EXAMPLE_OUT)/swa/step* --data examples/heldout.txt --max-tokens 8192 --results $(EXAMPLE_OUT)/results.json
	$(BIN)/ckptavg plot $(EXAMPLE_OUT)/results.json -o $(EXAMPLE_OUT)/curves.png --title "examples/tiny-run (lr 3e-2)"

# Regenerate the example run: the `make study` model trained on the CPU for 10000 steps at lr 3e-2, a
# checkpoint every 1000 as Pythia's fp16 pytorch_model.bin, and examples/heldout.txt, the last 10% of the
# text, never trained on (9-11 minutes on two busy cores). Seeded, on one thread: the same torch build gives
# the same files; other builds or CPUs give close, not identical, weights. Then the nanoGPT example
# (random weights, for the format) from the test factories.
example-data:
	rm -rf examples/tiny-run examples/tiny-nanogpt
	$(BIN)/python examples/study/train.py --text examples/study/genesis-kjv.txt --lr 3e-2 --steps 10000 \
		--save-every 1000 --batch 8 --seed 0 --threads 1 --format bin --out examples/tiny-run
	$(BIN)/python tests/factories.py examples/tiny-nanogpt

# The paper in miniature: a tiny GPT-NeoX trained on the CPU at two learning rates, then averaged,
# evaluated and plotted (about four minutes). See examples/study/ and README.
study:
	bash examples/study/run.sh study

# Each scenario generates its synthetic checkpoints under BENCH_DATA first (tens of GB); see benchmarks/README.md.
bench:
	$(BIN)/python benchmarks/run.py 1b-window --repeat 2
	$(BIN)/python benchmarks/run.py 12b-slice-window --repeat 2
	$(BIN)/python benchmarks/run.py 160m-trajectory --repeat 2

clean:
	rm -rf $(EXAMPLE_OUT) study .pytest_cache .ruff_cache .mypy_cache
