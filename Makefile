# mmdet-detrx: one-command install, demo and tests on a fresh machine.
#   make install   create .venv with torch, mmcv (built from source), mmdet and this package
#   make demo      install, then train + evaluate a small DINO (R18, our MSDeformAttn) on the embedded dataset (CPU)
#   make test      install, build the extension, run the test suite
# Override TORCH_SPEC for another platform, e.g. `make install TORCH_SPEC="torch==2.4.1"`.
# Two mmdet stacks (README, "Install notes"), same torch: STACK=openmmlab (OpenMMLab's last
# releases: mmcv 2.1.0 built from source, mmengine 0.10.7, mmdet 3.3.0) and STACK=onedl (VBTI's
# maintained fork: onedl-mmcv 2.3.6 built from its sdist, onedl-mmengine 0.10.12,
# onedl-mmdetection 3.5.1). The default stack lives in .venv, the other in .venv-<stack>:
#   make install STACK=onedl      make test STACK=onedl      make test-integration STACK=onedl

PYTHON      ?= python3
DEFAULT_STACK := openmmlab
STACK       ?= $(DEFAULT_STACK)
ifeq ($(STACK),$(DEFAULT_STACK))
VENV        ?= .venv
else
VENV        ?= .venv-$(STACK)
endif
TORCH_SPEC  ?= torch==2.13.0
ifeq ($(STACK),openmmlab)
MMCV_SPEC   ?= mmcv==2.1.0
MMENGINE_SPEC ?= mmengine==0.10.7
MMDET_SPEC  ?= mmdet==3.3.0
# mmcv 2.1's setup.py imports pkg_resources (gone from setuptools>=81).
MMCV_BUILD_SPECS ?= "setuptools>=77,<81"
else ifeq ($(STACK),onedl)
MMCV_SPEC   ?= onedl-mmcv==2.3.6
MMENGINE_SPEC ?= onedl-mmengine==0.10.12
MMDET_SPEC  ?= onedl-mmdetection==3.5.1
# onedl-mmcv's pyproject asks for setuptools>=80 (and no pkg_resources).
MMCV_BUILD_SPECS ?= "setuptools>=80" "packaging>=24.2"
else
$(error STACK=$(STACK) is not a stack this Makefile installs: use STACK=openmmlab or STACK=onedl)
endif
EXTRA_SPECS ?= "onnx==1.23.2" "onnxruntime==1.32.0" "tensorboard==2.21.0" "psutil==7.2.2" "seaborn==0.13.2" "transformers==5.23.0" "safetensors==0.8.0"
PYTEST_ARGS ?=
NPROC       ?= $(shell nproc 2>/dev/null || echo 2)

PY  := $(VENV)/bin/python
PIP := $(PY) -m pip
# Constraining torch keeps every later resolution (mmdet, mmengine, ours) from pulling a
# different, CUDA-sized torch from the registry.
CONSTRAINTS := $(VENV)/constraints.txt
STAMP_DEPS  := $(VENV)/.deps-installed
STAMP_PKG   := $(VENV)/.detrx-installed
# Which stack a venv holds; a venv is never switched in place (both stacks install as
# mmcv/mmengine/mmdet, and pip would leave a mix of the two's files behind).
STACK_FILE  := $(VENV)/.detrx-stack
VENV_STACK  := $(shell cat $(STACK_FILE) 2>/dev/null)
ifneq ($(VENV_STACK),)
ifneq ($(VENV_STACK),$(STACK))
$(error $(VENV) holds the $(VENV_STACK) stack, not STACK=$(STACK): remove it (rm -rf $(VENV)) or pass VENV=<another folder>)
endif
endif

.PHONY: install deps build demo test test-all test-integration benchmark clean cuda-check \
	cuda-link

install: $(STAMP_PKG)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"

$(STAMP_DEPS): $(PY) Makefile
	echo "$(STACK)" > $(STACK_FILE)
	printf '%s\n' "$(TORCH_SPEC)" "$(MMENGINE_SPEC)" > $(CONSTRAINTS)
	$(PIP) install -q "$(TORCH_SPEC)"
	# Neither stack has an mmcv wheel for this CPU torch: building it without isolation makes it
	# compile against the torch above instead of fetching another one.
	$(PIP) install -q $(MMCV_BUILD_SPECS) wheel ninja "numpy" packaging
	MMCV_WITH_OPS=1 MAX_JOBS=$(NPROC) $(PIP) install -c $(CONSTRAINTS) --no-build-isolation "$(MMCV_SPEC)"
	$(PIP) install -q -c $(CONSTRAINTS) "$(MMENGINE_SPEC)" "$(MMDET_SPEC)" scipy pycocotools \
		matplotlib pytest pytest-timeout hypothesis
	# mmdet's analysis tools and TensorBoard backend (psutil, seaborn, tensorboard), ONNX
	# export/parity tests (onnx, onnxruntime) and the HF checkpoint converters' parity tests and
	# benchmark pair (transformers, safetensors), pinned to versions tested together.
	$(PIP) install -q -c $(CONSTRAINTS) $(EXTRA_SPECS) requests pillow
	# timm (test-only: the ViT/TNT equality tests build timm models) imports torchvision. PyPI's
	# torchvision for this torch is a CUDA build that fails to import beside the CPU wheel
	# ('operator torchvision::nms does not exist'); 0.16.2 is the newest whose import survives
	# missing C++ ops, and nothing here uses torchvision's ops. pip check will name the mismatch.
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps "torchvision==0.16.2" "timm==1.0.31"
	touch $(STAMP_DEPS)

$(STAMP_PKG): $(STAMP_DEPS) setup.py pyproject.toml build_tools/detrx_backend.py build_tools/cuda_arch.py $(wildcard ops/*.h ops/*.cpp ops/*/*.cpp ops/*/*.h ops/cpu/isa/*.cpp ops/cuda/*.cu ops/cuda/*.cuh mmdet_detrx/ops/*.def)
	MAX_JOBS=$(NPROC) $(PIP) install -c $(CONSTRAINTS) --no-build-isolation --no-deps -e .
	$(PY) -c "import mmdet_detrx.ops as o; assert o.native_available(), 'native extension failed to load'"
	touch $(STAMP_PKG)

build: install

demo: install
	$(PY) tools/demo.py

test: install
	@if command -v nvcc >/dev/null 2>&1; then $(MAKE) --no-print-directory cuda-check; fi
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest tests -q --runslow $(PYTEST_ARGS)

# The tests that run mmdet/mmengine code (tests/conftest.py MMDET_INTEGRATION): what CI runs on
# the non-default stack, e.g. `make test-integration STACK=onedl`.
test-integration: install
	$(PY) -m pytest tests -q -m mmdet_integration $(PYTEST_ARGS)

# Compile-checks the torch-free CUDA device kernels with nvcc (no GPU, no CUDA torch needed).
cuda-check:
	$(PY) build_tools/check_cuda_kernels.py

# Links and loads the whole extension (CUDA kernels included) against a CUDA build of torch in a
# separate venv (.venv-cuda, ~5.5 GB, installed once), no GPU needed; not part of `make test`.
# Environment: CUDA_LINK_ARCH (default 8.0; "default" = setup.py's list), CUDA_TORCH_SPEC,
# CUDA_HOME. See docs/cuda.md.
cuda-link:
	$(PYTHON) build_tools/cuda_link_check.py

benchmark: install
	$(PY) tools/analysis/benchmark_msda.py

clean:
	rm -rf build *.egg-info mmdet_detrx/*.so
