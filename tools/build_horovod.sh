#!/usr/bin/env bash
# Build Horovod 0.28.1 from its source package against the TensorFlow installed in $PYTHON's
# environment, with Gloo (and NCCL when HOROVOD_GPU_OPERATIONS=NCCL), and print the wheel's path.
#
# Why by hand: `pip install horovod==0.28.1` fails three ways on TF 2.21 (see README, "Horovod"):
#   1. CMake 4 refuses the bundled Gloo          -> CMAKE_POLICY_VERSION_MINIMUM=3.5
#   2. build isolation hides TensorFlow from CMake -> --no-build-isolation, HOROVOD_WITH_TENSORFLOW=1
#   3. xla_mpi_ops.cc includes XLA headers that moved in TF 2.16+ -> drop that file (it only
#      serves HOROVOD_ENABLE_XLA_OPS=1 on GPU, which we never use).
# The wheel is cached under $LARS_TF_CACHE keyed by Horovod version, TF version, Python tag and
# GPU operations, so a second install does not rebuild.
set -euo pipefail

PYTHON=${PYTHON:-python}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
CACHE=${LARS_TF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lars_tf}
GPU_OPS=${HOROVOD_GPU_OPERATIONS:-}

tf_version=$("$PYTHON" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null) || {
  echo "build_horovod: TensorFlow is not importable by $PYTHON; install it first" >&2; exit 1; }
py_tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
key="horovod-${HOROVOD_VERSION}_tf-${tf_version}_${py_tag}_${GPU_OPS:-cpu}"
wheel_dir="$CACHE/wheels/$key"

shopt -s nullglob
cached=("$wheel_dir"/horovod-*.whl)
if (( ${#cached[@]} )); then
  echo "build_horovod: using cached wheel $wheel_dir" >&2
  echo "${cached[0]}"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "build_horovod: building Horovod $HOROVOD_VERSION for TF $tf_version ($key), a few minutes" >&2
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: -d "$work" "horovod==$HOROVOD_VERSION"
tar -xzf "$work"/horovod-*.tar.gz -C "$work"
src=$(echo "$work"/horovod-"$HOROVOD_VERSION")
cmakelists="$src/horovod/tensorflow/CMakeLists.txt"
grep -q 'xla_mpi_ops.cc' "$cmakelists" || {
  echo "build_horovod: xla_mpi_ops.cc not found in $cmakelists; the patch no longer applies" >&2; exit 1; }
sed -i '/xla_mpi_ops\.cc/d' "$cmakelists"

# Build requirements must already be in the environment, because isolation is off.
"$PYTHON" -m pip install --quiet --disable-pip-version-check "cmake>=3.13" setuptools wheel packaging psutil pyyaml cloudpickle

export CMAKE_POLICY_VERSION_MINIMUM=3.5
export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
export HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
export MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}
if [[ -n "$GPU_OPS" ]]; then export HOROVOD_GPU_OPERATIONS=$GPU_OPS; fi

# Horovod's setup.py looks for `cmake` on PATH (and falls back to a bare `pip`): put the
# environment's bin first so the cmake installed above is found on machines without a system one.
PATH="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')"):$PATH"
export PATH
mkdir -p "$work/out"
if ! "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$work/out" "$src" >"$work/build.log" 2>&1; then
  tail -n 60 "$work/build.log" >&2
  echo "build_horovod: FAILED to build Horovod $HOROVOD_VERSION (log above)" >&2
  exit 1
fi
mkdir -p "$wheel_dir"
cp "$work"/out/horovod-*.whl "$wheel_dir/"
built=("$wheel_dir"/horovod-*.whl)
echo "build_horovod: cached ${built[0]}" >&2
echo "${built[0]}"
