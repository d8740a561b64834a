# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
# `make experiments` runs the research studies (hours); each is also a target of its own.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
OUT    ?= runs/demo
DEMO_ARGS ?=
RUNS   ?= runs
PAIR   := --teacher qwen2.5-coder-1.5b-instruct --student qwen2.5-coder-0.5b-instruct
STUDIES := seed000 ablation data-efficiency transfer composability slicing student-pushed teacher-curve

.PHONY: install test lint typecheck unit slow demo experiments study-inputs $(addprefix experiment-,$(STUDIES)) bench bench-kv bench-slice bench-taskvec clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	# torch first, pinned: the CPU wheel on this machine's disk (any other torch pulls GBs).
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(VENV)/bin/pytest

test: lint typecheck unit

slow: install
	$(VENV)/bin/pytest -m slow -q

demo: install
	$(VENV)/bin/gradfree demo --out $(OUT) --overwrite $(DEMO_ARGS)

# The research studies on the real pair, one after another (times in docs/RESULTS.md). The
# experiment matrices resume where they stopped; the ablation and slicing rerun from scratch.
experiments: $(addprefix experiment-,$(STUDIES))

# the pair, the slicing study's SmolLM2 and every public text (each fetched once)
study-inputs: install
	$(VENV)/bin/gradfree models fetch qwen2.5-coder-1.5b-instruct
	$(VENV)/bin/gradfree models fetch qwen2.5-coder-0.5b-instruct
	$(VENV)/bin/gradfree models fetch smollm2-135m-instruct
	$(VENV)/bin/gradfree data fetch all

experiment-seed000: study-inputs
	$(VENV)/bin/gradfree experiment --config experiments/seed000.yaml --out $(RUNS)/seed000 --resume

experiment-data-efficiency: study-inputs
	$(VENV)/bin/gradfree experiment --config experiments/data_efficiency.yaml --out $(RUNS)/data_efficiency --resume

experiment-transfer: study-inputs
	$(VENV)/bin/gradfree experiment --config experiments/transfer.yaml --out $(RUNS)/transfer --resume

experiment-composability: study-inputs
	$(VENV)/bin/gradfree experiment --config experiments/composability.yaml --out $(RUNS)/composability --resume

# issue 17 part 4: the distilled student with 175 blurbs, continuations and last-writer refits
experiment-student-pushed: study-inputs
	$(VENV)/bin/gradfree experiment --config experiments/student_pushed.yaml --out $(RUNS)/student_pushed --resume

# issue 17 part 3: the 1.5B pruned to 90-33 % of its parameters against the native 0.5B (hours)
experiment-teacher-curve: study-inputs
	mkdir -p $(RUNS)/teacher-curve
	$(PY) scripts/bench_teacher_curve.py --calib-tokens 4096 --json $(RUNS)/teacher-curve/teacher-curve.json --plot $(RUNS)/teacher-curve/teacher-curve.png

experiment-ablation: study-inputs
	$(VENV)/bin/gradfree ablate $(PAIR) --config experiments/ablation.yaml --out $(RUNS)/ablation --overwrite

experiment-slicing: study-inputs
	mkdir -p $(RUNS)/slicing
	$(PY) scripts/bench_slice.py --models smollm2-135m-instruct --calib-tokens 8000 --eval-tokens 2000 --recompute 0.25 --json $(RUNS)/slicing/smollm2-135m.json
	$(PY) scripts/bench_slice.py --models qwen2.5-coder-0.5b-instruct --calib-tokens 8000 --eval-tokens 2000 --recompute 0.25 --json $(RUNS)/slicing/qwen2.5-coder-0.5b.json

bench: install
	$(PY) scripts/bench_capture.py
	$(PY) scripts/bench_capture.py --only sequential

# the low-rank KV cache against DynamicCache and QuantizedCache (quanto, HQQ) on the three models
bench-kv: install
	$(PY) -m pip install -q --disable-pip-version-check -e '.[kv]'
	$(VENV)/bin/gradfree models fetch smollm2-135m-instruct
	$(VENV)/bin/gradfree models fetch qwen2.5-coder-0.5b-instruct
	$(VENV)/bin/gradfree models fetch qwen2.5-coder-1.5b-instruct
	mkdir -p $(RUNS)/bench_kv
	$(PY) scripts/bench_kv.py --json $(RUNS)/bench_kv/bench_kv.json


# SliceGPT (reimplemented, per-block bases + shortcut matrices, in process) against `gradfree slice`
# (one global basis, a plain checkpoint) on the same calibration and held-out tokens (issue 17).
SLICE_SIDE := $(RUNS)/bench_slice/slicegpt-side-by-side.json
bench-slice: install
	$(VENV)/bin/gradfree models fetch smollm2-135m-instruct
	$(VENV)/bin/gradfree models fetch qwen2.5-coder-0.5b-instruct
	$(VENV)/bin/gradfree data fetch all
	mkdir -p $(RUNS)/bench_slice
	for m in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct; do \
	  $(PY) scripts/bench_slice.py --models $$m --methods global,global-ls,slicegpt --fractions 0.2,0.25,0.3 --global-extra-fractions 0.1,0.15 --calibrations news --out-side-by-side $(SLICE_SIDE) || exit 1; \
	  $(PY) scripts/bench_slice.py --models $$m --methods prune-ls,prune-ls-heads,slicegpt-eq --param-fractions 0.2,0.25,0.3 --calibrations news --out-side-by-side $(SLICE_SIDE) || exit 1; \
	done
	$(PY) scripts/plot_slice.py --json $(SLICE_SIDE) --calibration news --out $(RUNS)/bench_slice/slicegpt-side-by-side.png

# Task vectors (issue 15): the project's 8 LoRA adapters on SmolLM2-135M (trained once, cached),
# then masks, merges and unmerging measured on them (about 30 min on 2 cores).
bench-taskvec: install
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[taskvec]'
	$(VENV)/bin/gradfree models fetch smollm2-135m-instruct
	$(VENV)/bin/gradfree data fetch all
	$(VENV)/bin/gradfree taskvec make-adapters --model smollm2-135m-instruct
	mkdir -p $(RUNS)/bench_taskvec
	$(PY) scripts/bench_taskvec.py --out $(RUNS)/bench_taskvec/bench_taskvec.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
