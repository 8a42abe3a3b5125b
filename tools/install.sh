#!/usr/bin/env bash
# One-command install, used by `make install`, CI and the Docker image alike:
#   1. a virtual environment at $VENV (default .venv) with Python 3.11, if missing;
#   2. TensorFlow ($TF_PACKAGE: tensorflow-cpu by default, `tensorflow[and-cuda]` for GPUs);
#   3. this package in editable mode with its extras ($EXTRAS, default "dev");
#   4. Horovod built from source by tools/build_horovod.sh (cached wheel), then checked; with
#      HOROVOD_GPU_OPERATIONS=NCCL (`make install GPU=1`) with NCCL, on a GPU-less machine too.
# Idempotent: a stamp keyed by the inputs of the install makes a second run take about a second.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
TF_PACKAGE=${TF_PACKAGE:-tensorflow-cpu==2.21.*}
EXTRAS=${EXTRAS:-dev}
EDITABLE=${EDITABLE:-1}

stamp_key=$(cat setup.cfg pyproject.toml tools/install.sh tools/build_horovod.sh tools/cuda_toolkit.sh \
  | { cat; echo "$TF_PACKAGE $EXTRAS $EDITABLE ${HOROVOD_GPU_OPERATIONS:-}"; } | sha256sum | cut -c1-16)
stamp="$VENV/.lars_tf-installed-$stamp_key"
if [[ -f "$stamp" && -x "$VENV/bin/python" ]]; then
  echo "install: $VENV is up to date ($stamp)"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  command -v "$PYTHON" >/dev/null || { echo "install: $PYTHON not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
  "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
    echo "install: $PYTHON is not Python 3.11" >&2; exit 1; }
  echo "install: creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
pip=("$py" -m pip install --quiet --disable-pip-version-check)
# pip install, minus the noise of index locations configured on some machines but absent here.
pip_install() {
  "${pip[@]}" "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
  return "${PIPESTATUS[0]}"
}

echo "install: $TF_PACKAGE"
pip_install "$TF_PACKAGE"
echo "install: lars_tf[$EXTRAS]"
if [[ "$EDITABLE" == 1 ]]; then pip_install -e ".[$EXTRAS]"; else pip_install ".[$EXTRAS]"; fi

# PyTorch for the torch-backend tests, as the CPU build only: PyPI's default torch is the CUDA
# build (gigabytes). "+cpu" names the CPU wheel that machines of this kind keep on disk; where
# none is found the torch tests skip and say so.
if [[ "$EXTRAS" == *dev* ]]; then
  if pip_install "torch==2.13.0+cpu" >/dev/null 2>&1; then
    echo "install: torch 2.13.0+cpu"
  else
    echo "install: no torch 2.13.0+cpu build to be had here: the PyTorch-backend tests will skip"
  fi
fi

wheel=$(PYTHON="$py" tools/build_horovod.sh)
echo "install: $(basename "$wheel")"
# Twice: the first brings Horovod's dependencies (cloudpickle, psutil, pyyaml); the second,
# --force-reinstall --no-deps, replaces a Horovod of the same version already installed, which
# pip would otherwise keep (a CPU build replaced by a GPU build, or a rebuilt wheel, would
# silently stay the old one) without reinstalling every dependency.
pip_install "$wheel"
pip_install --force-reinstall --no-deps "$wheel"

# Fail loudly if Horovod came out without TensorFlow, Gloo or the NCCL asked for (pip would not
# complain). A GPU build imports and initializes without a GPU or driver too.
# A wheel that fails here leaves the cache, so the next install builds it again.
if ! TF_CPP_MIN_LOG_LEVEL=2 LARS_TF_NCCL="${HOROVOD_GPU_OPERATIONS:-}" "$py" - <<'PY'
import os

import horovod.tensorflow as hvd
assert hvd.gloo_built(), "Horovod was built without Gloo"
built = "gloo built"
if os.environ["LARS_TF_NCCL"] == "NCCL":
    assert hvd.nccl_built(), "Horovod was built without NCCL (HOROVOD_GPU_OPERATIONS=NCCL)"
    assert hvd.cuda_built(), "Horovod was built without CUDA"
    built += f", nccl built (NCCL {hvd.nccl_built()}), cuda built"
hvd.init()
assert hvd.size() == 1, hvd.size()
print(f"install: horovod.tensorflow OK ({built}, size 1)")
PY
then
  rm -rf "$(dirname "$wheel")"
  echo "install: the Horovod wheel $wheel failed the check above; removed it from the cache" >&2
  exit 1
fi
rm -f "$VENV"/.lars_tf-installed-*
touch "$stamp"
echo "install: done"
