# make demo   : create .venv if missing, fetch sample data, train and run the whole chain at demo scale
# make test   : create .venv if missing, run the test suite
# make bench  : rerun the benchmarks one after the other and regenerate benchmarks/REPORT.md
#               (BENCH=ssl_step,seg_inference picks suites; EXPERIMENTS=1 adds the evidence runs)
# make bench-gpu : the GPU benchmark (one JSON line per measurement, < 10 min on one datacenter GPU;
#               needs a CUDA torch in .venv, see TORCH_SPEC); lines also go to outputs/bench/gpu_bench.jsonl
# TORCH_SPEC picks the torch build installed first (CPU build by default; for CUDA install your
# CUDA torch into .venv yourself before `make`, then TORCH_SPEC is satisfied and nothing changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench bench-gpu clean-demo

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt pytest
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m meduet_demo.run --out outputs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(if $(BENCH),--only $(BENCH)) $(if $(EXPERIMENTS),--experiments)

bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu_bench.py --device cuda --out outputs/bench/gpu_bench.jsonl $(GPU_BENCH_ARGS)

clean-demo:
	rm -rf outputs/demo
