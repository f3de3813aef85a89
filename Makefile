# make demo   : create .venv if missing, fetch sample data, train and run the whole chain at demo scale
# make test   : create .venv if missing, run the test suite
# make bench  : rerun the benchmarks one after the other and regenerate benchmarks/REPORT.md
#               (BENCH=ssl_step,seg_inference picks suites; EXPERIMENTS=1 adds the evidence runs)
# make bench-gpu : the GPU benchmark (one JSON line per measurement, < 10 min on one datacenter GPU;
#               needs a CUDA torch in .venv); lines also go to outputs/bench/gpu_bench.jsonl
# make release: every bundle's zip and its sha256 in dist/ (custom_nets.export_bundle)
# make venv-monailabel: MONAI Label's environment (.venv-monailabel); make test builds it and runs
#               tests/bundles/test_monailabel.py there with MEDUET_REQUIRE_MONAILABEL=1 (missing = failure)
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
# MONAI Label gets a venv of its own: monailabel 0.8.5 pulls ~150 packages and pins some of ours lower
# (numpy<2, jsonschema 3, pytorch-ignite 0.4.11). It imports torchvision on start, and torchvision must
# be the build of the torch beside it: PyPI's Linux torchvision is built against PyPI's (CUDA) torch and
# fails to import next to the CPU build ("operator torchvision::nms does not exist"). So torch and
# torchvision come as one pair: without a GPU the CPU pair from the CPU index, and where that index
# cannot be reached PyPI's pair (the CUDA build, which runs on the CPU too; `===` keeps pip from taking a
# local +cpu wheel for it). sam2 (a monailabel dependency, used only by its SAM2 apps) is an sdist whose
# build asks for torch: SAM2_BUILD_CUDA=0 and --no-build-isolation build it against the torch installed
# here instead of downloading another one into a build environment.
ML_VENV ?= .venv-monailabel
ML_PY := $(ML_VENV)/bin/python
ML_STAMP := $(ML_VENV)/.installed
MONAILABEL_VERSION ?= 0.8.5
TORCHVISION_VERSION ?= 0.28.0
ML_TORCH_PYPI := "torch===$(TORCH_VERSION)" "torchvision==$(TORCHVISION_VERSION)"
ML_TORCH_CPU := --no-deps "torch==$(TORCH_VERSION)+cpu" "torchvision==$(TORCHVISION_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX)
ML_TORCH_INSTALL ?= $(if $(shell command -v nvidia-smi 2>/dev/null),$(ML_TORCH_PYPI),$(ML_TORCH_CPU) || $(ML_PY) -m pip install -q $(ML_TORCH_PYPI))

.PHONY: venv venv-monailabel demo test bench bench-gpu release clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_INSTALL)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

$(ML_STAMP): pyproject.toml
	test -x $(ML_PY) || $(PYTHON) -m venv $(ML_VENV)
	$(ML_PY) -m pip install -q --upgrade pip setuptools wheel
	$(ML_PY) -c "import torchvision" 2>/dev/null || $(ML_PY) -m pip install -q $(ML_TORCH_INSTALL)
	SAM2_BUILD_CUDA=0 $(ML_PY) -m pip install -q --no-build-isolation "monailabel==$(MONAILABEL_VERSION)" "pytest>=8" -e . \
		"torch==$(TORCH_VERSION)" "torchvision==$(TORCHVISION_VERSION)"
	$(ML_PY) -c "import monailabel.tasks.infer.bundle, monailabel.tasks.train.bundle"
	touch $(ML_STAMP)

venv-monailabel: $(ML_STAMP)

demo: $(STAMP)
	$(PY) -m meduet_demo.run --out outputs/demo

test: $(STAMP) $(ML_STAMP)
	$(PY) -m pytest -q tests --ignore=tests/bundles/test_monailabel.py
	MEDUET_REQUIRE_MONAILABEL=1 $(ML_PY) -m pytest -q tests/bundles/test_monailabel.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(if $(BENCH),--only $(BENCH)) $(if $(EXPERIMENTS),--experiments)

bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu_bench.py --device cuda --out outputs/bench/gpu_bench.jsonl $(GPU_BENCH_ARGS)

release: $(STAMP)
	rm -rf dist
	$(PY) -m custom_nets.export_bundle --out dist

clean-demo:
	rm -rf outputs/demo
