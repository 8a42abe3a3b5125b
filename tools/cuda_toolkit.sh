#!/usr/bin/env bash
# Assemble a CUDA 12 toolkit that can compile Horovod's NCCL build, from the package registries
# alone (no NVIDIA installer, no CUDA base image), and print its root (a CUDA_HOME).
#
#   tools/cuda_toolkit.sh            idempotent: a second call prints the cached root at once
#
# Why assembled: PyPI's `nvidia-cuda-nvcc-cu12` wheels (12.0 to 12.9) hold `ptxas` and the crt
# headers but not the `nvcc` driver, `cicc` or `cudafe++`, so they cannot compile a .cu file.
# Debian's `nvidia-cuda-toolkit` (12.4.1, trixie non-free) has those programs; its headers and
# libraries come in `nvidia-cuda-dev`, a 930 MB download. So the root is made of:
#   bin/, nvvm/bin/cicc     the compiler programs of Debian's nvidia-cuda-toolkit .deb, unpacked
#                           with dpkg-deb -x (not installed: its Depends are never pulled in);
#   include/, lib64/        the headers and libcudart.so of PyPI's nvidia-cuda-runtime-cu12 and
#                           the crt headers and libdevice of nvidia-cuda-nvcc-cu12 and libcu++'s
#                           headers of nvidia-cuda-cccl-cu12 (cuda_fp16.h needs <nv/target>; 12.4.127
#                           itself is a yanked, broken upload: .post1), at the
#                           same 12.4 release as that nvcc, so compiler and headers agree; the
#                           libcudart_static.a that the 12.4 wheel lacks from the 12.9 runtime
#                           wheel that TensorFlow 2.21 pins.
#                           Horovod links the shared runtime (CMAKE_CUDA_RUNTIME_LIBRARY=Shared),
#                           at run time TensorFlow's own libcudart.so.12.
# The kernels it compiles run with any CUDA 12 runtime and driver >= 12.4's (CUDA's minor
# version compatibility); TensorFlow 2.21 brings CUDA 12.9's libraries as wheels.
# Apt reads a private sources list and state under the cache: the machine's apt is not touched.
# $CUDA_TOOLKIT_CACHE (default $LARS_TF_CACHE/cuda-toolkit) holds the root; $DEBIAN_MIRROR the
# Debian mirror; $PYTHON the pip that downloads the wheels.
set -euo pipefail

CUDA_DEB_VERSION=${CUDA_DEB_VERSION:-12.4.131~12.4.1-2}
CUDA_RUNTIME_WHEEL=${CUDA_RUNTIME_WHEEL:-nvidia-cuda-runtime-cu12==12.4.127}
CUDA_NVCC_WHEEL=${CUDA_NVCC_WHEEL:-nvidia-cuda-nvcc-cu12==12.4.131}
CUDA_STATIC_WHEEL=${CUDA_STATIC_WHEEL:-nvidia-cuda-runtime-cu12==12.9.79}
CUDA_CCCL_WHEEL=${CUDA_CCCL_WHEEL:-nvidia-cuda-cccl-cu12==12.4.127.post1}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SUITE=${DEBIAN_SUITE:-trixie}
PYTHON=${PYTHON:-python3}
CACHE=${CUDA_TOOLKIT_CACHE:-${LARS_TF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lars_tf}/cuda-toolkit}
root="$CACHE/cuda-${CUDA_DEB_VERSION%%~*}"

say() { echo "cuda_toolkit: $*" >&2; }
fail() {
  say "$*"
  exit 1
}

if [[ -x "$root/bin/nvcc" && -f "$root/.complete" ]]; then
  echo "$root"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say "assembling CUDA ${CUDA_DEB_VERSION%%~*} (nvcc from Debian $DEBIAN_SUITE, headers from PyPI) in $root"

# 1. nvcc, cicc, cudafe++, fatbinary, nvlink, ptxas: Debian's .deb, downloaded with a private
#    apt configuration (this machine's sources list may lack non-free or $DEBIAN_SUITE).
apt_dir="$work/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -s "$keyring" ]] || fail "no $keyring (apt-get install debian-archive-keyring)"
echo "deb [signed-by=$keyring] $DEBIAN_MIRROR $DEBIAN_SUITE non-free" >"$apt_dir/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir" -o "Dir::Cache::archives=$apt_dir/archives"
  -o APT::Sandbox::User=root -o Debug::NoLocking=1)
apt-get "${apt_opts[@]}" update -qq >"$work/apt.log" 2>&1 || {
  tail -n 20 "$work/apt.log" >&2
  fail "apt-get update of $DEBIAN_MIRROR $DEBIAN_SUITE non-free failed (log above)"
}
(cd "$apt_dir/archives" && apt-get "${apt_opts[@]}" download -qq \
  "nvidia-cuda-toolkit=$CUDA_DEB_VERSION") >>"$work/apt.log" 2>&1 || {
  tail -n 20 "$work/apt.log" >&2
  fail "apt-get download nvidia-cuda-toolkit=$CUDA_DEB_VERSION failed (log above)"
}
dpkg-deb -x "$apt_dir"/archives/nvidia-cuda-toolkit_*.deb "$work/deb"
deb_bin="$work/deb/usr/lib/nvidia-cuda-toolkit/bin"
[[ -x "$deb_bin/nvcc" && -x "$deb_bin/cicc" ]] || fail "no nvcc or cicc in the nvidia-cuda-toolkit .deb"

# 2. Headers, libcudart.so and libdevice at the same release, from PyPI.
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps -d "$work/wheels" \
  "$CUDA_RUNTIME_WHEEL" "$CUDA_NVCC_WHEEL" "$CUDA_CCCL_WHEEL" 2>&1 | { grep -v "^WARNING: Location" || true; }
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps -d "$work/static" \
  "$CUDA_STATIC_WHEEL" 2>&1 | { grep -v "^WARNING: Location" || true; }
for whl in "$work"/wheels/*.whl; do
  "$PYTHON" -m zipfile -e "$whl" "$work/wheels/x"
done
"$PYTHON" -m zipfile -e "$work"/static/*.whl "$work/static/x"
wheel_root="$work/wheels/x/nvidia"

# 3. The root, laid out as NVIDIA's installer does (what CMake's FindCUDAToolkit expects).
rm -rf "$root.partial"
mkdir -p "$root.partial"/{bin/crt,nvvm/bin,include,lib64}
for tool in nvcc cudafe++ fatbinary nvlink ptxas bin2c cuobjdump nvdisasm nvprune cu++filt; do
  src="$deb_bin/$tool"
  [[ -x "$src" ]] || src="$work/deb/usr/bin/$tool"
  [[ -x "$src" && ! "$(head -c2 "$src")" == "#!" ]] || continue # skip Debian's shell wrappers
  cp "$src" "$root.partial/bin/"
done
cp "$deb_bin"/crt/*.stub "$root.partial/bin/crt/"
cp "$deb_bin/cicc" "$root.partial/nvvm/bin/"
cp -r "$wheel_root"/cuda_nvcc/nvvm/libdevice "$root.partial/nvvm/"
cp -r "$wheel_root"/cuda_runtime/include/. "$wheel_root"/cuda_nvcc/include/. \
  "$wheel_root"/cuda_cccl/include/. "$root.partial/include/"
find "$root.partial/include" -name __init__.py -delete
cp "$wheel_root"/cuda_runtime/lib/libcudart.so.12 "$root.partial/lib64/"
ln -s libcudart.so.12 "$root.partial/lib64/libcudart.so"
# nvcc links a program with the static runtime by default (CMake's compiler checks do): the
# 12.4 wheel has no libcudart_static.a; the later wheel that TensorFlow pins has (a newer runtime
# serves code compiled by an older 12.x nvcc). Horovod itself links the shared runtime.
cp "$work"/static/x/nvidia/cuda_runtime/lib/{libcudart_static.a,libculibos.a} "$root.partial/lib64/"
# nvcc also links -lcudadevrt, the device runtime of kernels that launch kernels (relocatable
# device code), which Horovod never uses; the 12.9 one is too new for nvlink 12.4. An empty
# archive satisfies the link; code that needs it fails to link, loudly.
ar rc "$root.partial/lib64/libcudadevrt.a"
# Debian's profile names /usr paths; this is the installer's own, relative to bin/.
cat >"$root.partial/bin/nvcc.profile" <<'EOF'
TOP              = $(_HERE_)/..
NVVMIR_LIBRARY_DIR = $(TOP)/nvvm/libdevice
LD_LIBRARY_PATH += $(TOP)/lib64:
PATH            += $(TOP)/nvvm/bin:$(_HERE_):
INCLUDES        +=  "-I$(TOP)/include" $(_SPACE_)
LIBRARIES        =+ $(_SPACE_) "-L$(TOP)/lib64"
CUDAFE_FLAGS    +=
PTXAS_FLAGS     +=
EOF
ln -s lib64 "$root.partial/lib"
version=$("$root.partial/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
[[ -n "$version" ]] || fail "the assembled nvcc does not run"

# 4. It must compile and link a kernel with the host compiler (the CMake check does the same).
cat >"$work/probe.cu" <<'EOF'
#include <cuda_fp16.h>
#include <cuda_runtime.h>
__global__ void scale(__half* x, float s) { x[threadIdx.x] = __float2half(__half2float(x[threadIdx.x]) * s); }
int main() { int n = 0; return cudaGetDeviceCount(&n) == cudaSuccess ? 0 : 0; }
EOF
if ! "$root.partial/bin/nvcc" -arch=sm_80 -cudart shared -o "$work/probe" "$work/probe.cu" >"$work/probe.log" 2>&1; then
  cat "$work/probe.log" >&2
  fail "the assembled nvcc $version failed to compile a kernel (log above)"
fi
touch "$root.partial/.complete"
rm -rf "$root"
mv "$root.partial" "$root"
say "CUDA $version toolkit at $root"
echo "$root"
