# lars_tf: `make train` and `make test` are the two commands; everything installs itself.
#
# Variables (override on the command line, e.g. `make install GPU=1`):
#   VENV        where the virtual environment lives (default .venv, ignored by git)
#   PYTHON      the Python 3.11 interpreter that creates it (default python3.11)
#   GPU=1       install the CUDA build of TensorFlow and build Horovod with NCCL
#   TF_PACKAGE  the TensorFlow requirement itself (default tensorflow-cpu==2.21.*)
#   PYTEST_ARGS extra pytest arguments, e.g. PYTEST_ARGS="-m 'not slow'"
#   TEST_WORKERS pytest-xdist processes of `make test` (default 2, one per core here; 0: none)
#   NP          Horovod processes, or devices of the other engines, for `make train` (default 2)
#   ENGINE      the engine of `make train`: horovod (default), tf_distribute or jax

VENV ?= .venv
PYTHON ?= python3.11
NP ?= 2
TEST_WORKERS ?= 2
ENGINE ?= horovod
ifeq ($(GPU),1)
TF_PACKAGE ?= tensorflow[and-cuda]==2.21.*
export HOROVOD_GPU_OPERATIONS ?= NCCL
else
TF_PACKAGE ?= tensorflow-cpu==2.21.*
endif
BIN := $(VENV)/bin

.PHONY: help install test lint format train bench docker gpu-check clean

help:
	@echo "make install  create $(VENV), install TensorFlow, lars_tf and Horovod (idempotent)"
	@echo "make test     ruff + the whole pytest suite this machine supports"
	@echo "make train    the demo: LARS at a large batch on Fashion-MNIST, 2 Horovod processes"
	@echo "              (ENGINE=tf_distribute or ENGINE=jax: one process over 2 devices)"
	@echo "make bench    benchmarks, written to docs/benchmarks.md"
	@echo "make docker   build the CPU Docker image lars-tf:cpu (GPU=1: lars-tf:gpu)"
	@echo "make gpu-check  on a GPU machine, GPU=1: devices, NCCL, images/s, LARS/SGD (runs/gpu_check/)"

install:
	@VENV='$(VENV)' PYTHON='$(PYTHON)' TF_PACKAGE='$(TF_PACKAGE)' bash tools/install.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install
	$(BIN)/ruff check .
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist=loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The demo: Fashion-MNIST from Debian's dataset-fashion-mnist package (offline), then a fresh
# run of flags/demo_fashion_mnist.cfg on $(NP) Horovod processes, or (ENGINE=tf_distribute,
# ENGINE=jax) one process over $(NP) devices: the CPU split in $(NP) without GPU=1, the GPUs
# with it. It ends with the test accuracy.
ifeq ($(GPU),1)
DEVICES :=
else
DEVICES := --cpu_devices=$(NP)
endif
train: install
	$(BIN)/python tools/get_fashion_mnist.py --data_dir data/tfds --cache_dir data/cache
	rm -rf runs/demo_fashion_mnist
ifeq ($(ENGINE),horovod)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/horovodrun -np $(NP) -H localhost:$(NP) --gloo \
		$(BIN)/python train.py --flagfile=flags/demo_fashion_mnist.cfg
else
	$(BIN)/python train.py --flagfile=flags/demo_fashion_mnist.cfg --engine=$(ENGINE) $(DEVICES)
endif

# Benchmarks, with the peer LARS implementations (optax, timm) installed beside lars_tf first.
bench: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps timm
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python tools/bench.py --output docs/benchmarks.md

# Starts a Docker engine if none runs (tools/docker_engine.sh), then builds with BuildKit.
# GPU=1: the GPU image lars-tf:gpu, from the same Dockerfile and Debian base.
ifeq ($(GPU),1)
DOCKER_ARGS ?= -t lars-tf:gpu --build-arg 'TF_PACKAGE=$(TF_PACKAGE)' --build-arg HOROVOD_GPU_OPERATIONS=NCCL
else
DOCKER_ARGS ?= -t lars-tf:cpu
endif
docker:
	bash docker/build.sh $(DOCKER_ARGS)

# One command on a machine with GPUs (after `make install GPU=1`): tools/gpu_check.sh.
gpu-check: install
	PYTHON=$(BIN)/python bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
