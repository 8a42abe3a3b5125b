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
# GPU operations (and the CUDA release for NCCL), so a second install does not rebuild.
#
# With HOROVOD_GPU_OPERATIONS=NCCL (`make install GPU=1`), on a machine with or without a GPU:
#   - CUDA: $HOROVOD_CUDA_HOME, else the toolkit of the `nvcc` on PATH if it has TensorFlow's
#     CUDA major release (12 for TF 2.21), else the one that tools/cuda_toolkit.sh assembles
#     from Debian's and PyPI's packages (PyPI's nvcc wheels hold no nvcc);
#   - NCCL: the nvidia-nccl-cu12 wheel that `tensorflow[and-cuda]` installed, linked shared;
#   - the CUDA runtime linked shared: the linker binds Horovod's cuda* calls to the runtime API
#     that libtensorflow_framework.so.2 exports (TF's stub, which loads the libcudart.so.12 of
#     its wheel), so Horovod and TF share one runtime (libcudart is dropped as not needed).
#     NCCL (and libcudart, if a toolkit makes it needed) are found at run time through an
#     $ORIGIN-relative RUNPATH into site-packages/nvidia/, so the wheel works in any environment
#     with the same wheels; neither the build nor the import needs a driver;
#   - kernels for compute capabilities $HOROVOD_BUILD_CUDA_CC_LIST (default 7.0 to 9.0, with
#     PTX for 9.0, which newer GPUs compile at load time) instead of every one nvcc knows.
set -euo pipefail

PYTHON=${PYTHON:-python}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
CACHE=${LARS_TF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lars_tf}
GPU_OPS=${HOROVOD_GPU_OPERATIONS:-}

tf_version=$("$PYTHON" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null) || {
  echo "build_horovod: TensorFlow is not importable by $PYTHON; install it first" >&2; exit 1; }
py_tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
gpu_key=cpu
if [[ -n "$GPU_OPS" ]]; then
  [[ "$GPU_OPS" == NCCL ]] || {
    echo "build_horovod: HOROVOD_GPU_OPERATIONS=$GPU_OPS: only NCCL is supported here" >&2; exit 1; }
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  # The CUDA major release TensorFlow was built with: Horovod must use the same libcudart.so.N.
  tf_cuda=$("$PYTHON" -c 'import tensorflow as tf; print(tf.sysconfig.get_build_info().get("cuda_version", ""))' 2>/dev/null)
  [[ -n "$tf_cuda" ]] || {
    echo "build_horovod: TensorFlow $tf_version is not a CUDA build; install tensorflow[and-cuda]" >&2; exit 1; }
  nvcc_release() { "$1/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p'; }
  if [[ -z "${HOROVOD_CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
    # nvcc on PATH may be a wrapper script: ask the compiler itself where its toolkit is.
    path_home=$(cd /tmp && nvcc -dryrun -x cu -E /dev/null 2>&1 | sed -n 's/^#\$ TOP=\(.*\)$/\1/p' | head -n1)
    [[ -z "$path_home" ]] || path_home=$(readlink -f "$path_home")
    path_home=${path_home:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
    release=$(nvcc_release "$path_home")
    if [[ "${release%%.*}" == "${tf_cuda%%.*}" ]]; then
      HOROVOD_CUDA_HOME=$path_home
    else
      echo "build_horovod: ignoring nvcc ${release:-?} on PATH ($path_home): TensorFlow uses CUDA $tf_cuda" >&2
    fi
  fi
  if [[ -z "${HOROVOD_CUDA_HOME:-}" ]]; then
    HOROVOD_CUDA_HOME=$(PYTHON="$PYTHON" bash "$here/cuda_toolkit.sh")
  fi
  export HOROVOD_CUDA_HOME
  cuda_version=$(nvcc_release "$HOROVOD_CUDA_HOME")
  [[ -n "$cuda_version" ]] || {
    echo "build_horovod: $HOROVOD_CUDA_HOME/bin/nvcc does not run" >&2; exit 1; }
  [[ "${cuda_version%%.*}" == "${tf_cuda%%.*}" ]] || {
    echo "build_horovod: CUDA $cuda_version in $HOROVOD_CUDA_HOME, but TensorFlow uses CUDA $tf_cuda" >&2; exit 1; }
  nvidia_dir=$("$PYTHON" -c 'import nvidia.nccl, os; print(os.path.dirname(list(nvidia.nccl.__path__)[0]))' \
    2>/dev/null) || {
    echo "build_horovod: no nvidia-nccl-cu12 in $PYTHON's environment (tensorflow[and-cuda] brings it)" >&2
    exit 1
  }
  gpu_key="NCCL-cuda${cuda_version}"
fi
key="horovod-${HOROVOD_VERSION}_tf-${tf_version}_${py_tag}_${gpu_key}"
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
if [[ -n "$GPU_OPS" ]]; then
  # NCCL and the CUDA runtime from the wheels in site-packages/nvidia/ (see the top).
  grep -q 'set(CMAKE_CUDA_RUNTIME_LIBRARY "Static")' "$src/CMakeLists.txt" || {
    echo "build_horovod: CMAKE_CUDA_RUNTIME_LIBRARY not found in CMakeLists.txt; the patch no longer applies" >&2
    exit 1
  }
  sed -i 's/set(CMAKE_CUDA_RUNTIME_LIBRARY "Static")/set(CMAKE_CUDA_RUNTIME_LIBRARY "Shared")/' "$src/CMakeLists.txt"
  cat >>"$cmakelists" <<'CMAKE'
# lars_tf: find TensorFlow's CUDA runtime and NCCL wheels from horovod/tensorflow/ at run time.
set_target_properties(${TF_TARGET_LIB} PROPERTIES BUILD_WITH_INSTALL_RPATH TRUE
    INSTALL_RPATH "$ORIGIN/../../nvidia/cuda_runtime/lib;$ORIGIN/../../nvidia/nccl/lib")
CMAKE
  # 4. mpi_ops.cc declares stream_executor::gpu::AsGpuStreamValue() to get the CUDA stream of a
  #    TensorFlow stream; TF 2.21 no longer exports it (`undefined symbol:
  #    _ZN15stream_executor3gpu16AsGpuStreamValueEPNS_6StreamE` at import). Define it inline
  #    from the public Stream::platform_specific_handle() instead.
  mpi_ops="$src/horovod/tensorflow/mpi_ops.cc"
  grep -q '^GpuStreamHandle AsGpuStreamValue(Stream\* stream);$' "$mpi_ops" \
    && grep -q '^#endif // TENSORFLOW_VERSION >= 2011000000$' "$mpi_ops" || {
    echo "build_horovod: AsGpuStreamValue's declaration not found in $mpi_ops; the patch no longer applies" >&2
    exit 1
  }
  sed -i 's|^GpuStreamHandle AsGpuStreamValue(Stream\* stream);$|// (defined after stream.h below)|' "$mpi_ops"
  sed -i '/^#endif \/\/ TENSORFLOW_VERSION >= 2011000000$/a\
namespace stream_executor { namespace gpu {\
inline GpuStreamHandle AsGpuStreamValue(::stream_executor::Stream* stream) {\
  return static_cast<GpuStreamHandle>(stream->platform_specific_handle().stream);\
} } }' "$mpi_ops"
  mkdir -p "$work/nccl/lib"
  ln -s "$nvidia_dir/nccl/lib/libnccl.so.2" "$work/nccl/lib/libnccl.so"
  export HOROVOD_NCCL_INCLUDE="$nvidia_dir/nccl/include" HOROVOD_NCCL_LIB="$work/nccl/lib"
  export HOROVOD_NCCL_LINK=SHARED
  export HOROVOD_BUILD_CUDA_CC_LIST=${HOROVOD_BUILD_CUDA_CC_LIST:-70,75,80,86,89,90}
  echo "build_horovod: NCCL with CUDA $cuda_version ($HOROVOD_CUDA_HOME), NCCL from $nvidia_dir/nccl," \
    "compute capabilities $HOROVOD_BUILD_CUDA_CC_LIST" >&2
fi

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
  mkdir -p "$CACHE/logs"
  cp "$work/build.log" "$CACHE/logs/$key.log"
  tail -n 60 "$work/build.log" >&2
  echo "build_horovod: FAILED to build Horovod $HOROVOD_VERSION (log above; all of it in $CACHE/logs/$key.log)" >&2
  exit 1
fi
mkdir -p "$wheel_dir"
cp "$work"/out/horovod-*.whl "$wheel_dir/"
built=("$wheel_dir"/horovod-*.whl)
echo "build_horovod: cached ${built[0]}" >&2
echo "${built[0]}"
