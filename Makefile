# make demo   : create .venv if missing, fetch sample data, train and run the whole chain at demo scale
# make test   : create .venv if missing, run the test suite
# make bench  : rerun the benchmarks one after the other and regenerate benchmarks/REPORT.md
#               (BENCH=ssl_step,seg_inference picks suites; EXPERIMENTS=1 adds the evidence runs)
# make bench-gpu : the GPU benchmark (one JSON line per measurement, < 10 min on one datacenter GPU;
#               needs a CUDA torch in .venv); lines also go to outputs/bench/gpu_bench.jsonl
# make release: every bundle's zip and its sha256 in dist/ (custom_nets.export_bundle)
# torch is installed first, before the project (pyproject.toml is the one dependency list): the CPU
# build where there is no GPU (no nvidia-smi), PyPI's default (CUDA) build otherwise. A torch that is
# already in .venv is kept (install your own CUDA build there first to choose it). The CPU wheel comes
# alone (--no-deps) from the CPU index; its dependencies then come from PyPI with the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INSTALL ?= $(if $(shell command -v nvidia-smi 2>/dev/null),"torch==$(TORCH_VERSION)",--no-deps "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX))
EXTRAS ?= dev
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench bench-gpu release clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_INSTALL)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
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

release: $(STAMP)
	rm -rf dist
	$(PY) -m custom_nets.export_bundle --out dist

clean-demo:
	rm -rf outputs/demo
