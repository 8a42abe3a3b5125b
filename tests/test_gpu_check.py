"""The GPU build and the GPU check, on a machine without a GPU.

- tools/gpu_check.sh --cpu_smoke runs every part of the GPU check on the CPU with tiny shapes
  (2 Gloo workers for the equivalence): the report's code paths, whichever Horovod is installed.
- The Horovod wheel that `make install GPU=1` builds (cached under ~/.cache/lars_tf/wheels/ or
  $LARS_TF_CACHE) links NCCL of TensorFlow's wheels through an $ORIGIN-relative RUNPATH and
  TensorFlow's CUDA runtime; checked where that wheel is cached, skipped (saying so) elsewhere:
  CI does not build the GPU variant, which downloads about 3 GB of CUDA wheels.
- $LARS_TF_GPU_VENV, when set, names an environment made by `make install GPU=1 VENV=...`:
  Horovod there imports without a GPU or driver, with NCCL built in, and every CUDA and NCCL
  symbol it calls is defined by that environment's TensorFlow and NCCL libraries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(
    os.environ.get("LARS_TF_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lars_tf"
)


@pytest.mark.slow
@pytest.mark.horovod
def test_gpu_check_cpu_smoke_writes_json_and_markdown(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    cmd = [
        "bash",
        str(REPO / "tools" / "gpu_check.sh"),
        "--cpu_smoke",
        "--output_dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=REPO)
    report_path = tmp_path / "gpu_check.json"
    assert report_path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert proc.returncode == 0, json.dumps(report, indent=1)[-6000:]
    assert report["ok"] and report["mode"] == "cpu_smoke"

    devices = report["devices"]
    assert devices["ok"] and devices["gpus"] == []  # CUDA_VISIBLE_DEVICES="" in smoke mode
    assert devices["tensorflow"].startswith("2.21") and devices["horovod_gloo_built"]

    eq = report["equivalence"]
    assert eq["ok"] and eq["workers"] == 2 and eq["updates"] == [3, 3]
    assert eq["equal_to_one_worker"] and eq["ranks_bit_identical"]
    assert eq["max_abs_difference"] < 1e-4

    models = {case["model"]: case for case in report["train_step"]}
    assert set(models) == {"resnet50", "alexnet_bn"}
    for case in models.values():
        assert case["ok"] and case["jit_compile"] and case["dtype_policy"] == "mixed_float16"
        assert case["images_per_s_per_gpu"] > 0 and case["steps"] == 2

    optimizer = report["optimizer"]
    assert optimizer["ok"] and optimizer["model"] == "resnet20_cifar"
    assert optimizer["ratios"]["LARS / SGD, XLA"]["median"] > 0

    markdown = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## Devices", "2 workers = 1 worker", "images/s per GPU", "LARS / SGD"):
        assert heading in markdown
    assert "**PASS**" in markdown


def _gpu_wheels() -> list[Path]:
    return sorted((CACHE / "wheels").glob("horovod-*_NCCL-cuda12*/horovod-*.whl"))


def test_cached_gpu_horovod_wheel_links_nccl_wheel_and_tensorflows_cuda_runtime(tmp_path):
    wheels = _gpu_wheels()
    if not wheels:
        pytest.skip(
            f"no GPU build of Horovod cached in {CACHE / 'wheels'}: `make install GPU=1 "
            "VENV=/path/to/venv` makes one (CI does not: about 3 GB of CUDA wheels)"
        )
    with zipfile.ZipFile(wheels[-1]) as wheel:
        name = next(n for n in wheel.namelist() if n.startswith("horovod/tensorflow/mpi_lib"))
        library = Path(wheel.extract(name, tmp_path))
    dynamic = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True)
    assert dynamic.returncode == 0, dynamic.stderr
    assert "[libnccl.so.2]" in dynamic.stdout
    # The cuda* runtime calls bind to the runtime API that TensorFlow's framework library exports
    # (its stub over the libcudart.so.12 of its wheel): one CUDA runtime in the process.
    assert "[libtensorflow_framework.so.2]" in dynamic.stdout
    assert "libcuda.so" not in dynamic.stdout.replace("libcudart", "")  # no driver needed
    assert "$ORIGIN/../../nvidia/cuda_runtime/lib:$ORIGIN/../../nvidia/nccl/lib" in dynamic.stdout
    symbols = subprocess.run(["nm", "-D", str(library)], capture_output=True, text=True).stdout
    assert "ncclAllReduce" in symbols and "ncclCommInitRank" in symbols
    assert " U cudaEventRecord" in symbols  # the CUDA operations are compiled in


def test_gpu_venv_horovod_has_nccl_and_imports_without_a_gpu():
    venv = os.environ.get("LARS_TF_GPU_VENV")
    if not venv:
        pytest.skip("LARS_TF_GPU_VENV is not set (an environment of `make install GPU=1`)")
    code = (
        "import tensorflow as tf, horovod.tensorflow as hvd\n"
        "assert tf.sysconfig.get_build_info()['is_cuda_build']\n"
        "assert hvd.nccl_built() and hvd.cuda_built() and hvd.gloo_built()\n"
        "hvd.init(); print('nccl', hvd.nccl_built(), 'size', hvd.size())\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    python = Path(venv) / "bin" / "python"
    proc = subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "size 1" in proc.stdout

    # Every CUDA runtime symbol Horovod calls is defined by this environment's TensorFlow (so a
    # call on a GPU cannot fail with an undefined symbol), and NCCL's by its NCCL wheel.
    site = next((Path(venv) / "lib").glob("python3*/site-packages"))
    (library,) = (site / "horovod" / "tensorflow").glob("mpi_lib*.so")

    def dynamic_symbols(path: Path, defined: bool) -> set[str]:
        flag = "--defined-only" if defined else "--undefined-only"
        out = subprocess.run(["nm", "-D", flag, str(path)], capture_output=True, text=True).stdout
        return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}

    needed = dynamic_symbols(library, defined=False)
    cuda = {s for s in needed if s.startswith("cuda")}
    nccl = {s for s in needed if s.startswith("nccl")}
    assert cuda and nccl
    framework = dynamic_symbols(site / "tensorflow" / "libtensorflow_framework.so.2", defined=True)
    assert cuda <= framework, sorted(cuda - framework)
    nccl_library = site / "nvidia" / "nccl" / "lib" / "libnccl.so.2"
    assert nccl <= dynamic_symbols(nccl_library, defined=True)
