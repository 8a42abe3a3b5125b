"""Project-wide pytest configuration: environment, shared-data location, marker gating.

`make test` runs every marker; tests whose hardware this machine lacks (a GPU, a Docker engine)
skip here with the reason, so the suite runs whatever the machine supports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# Quiet TF and keep the two CPU cores for the test itself, before anything imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the repository; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


_JAX_CACHE: str | None = None


def pytest_configure(config):
    # JAX compiles each program once per process: about 90 in a tiny train.py run, a third
    # of a second each on these CPUs, so most of a JAX test's time. One persistent cache for
    # the session's processes (train.py runs, the any_backend suite) compiles each program
    # once; what runs is unchanged. A cache the caller set is kept, and so is the one a
    # parent pytest made.
    global _JAX_CACHE
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _JAX_CACHE = tempfile.mkdtemp(prefix="lars_tf_jax_cache_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
    if _JAX_CACHE is not None:
        shutil.rmtree(_JAX_CACHE, ignore_errors=True)


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


# The files whose tests take minutes, longest first (their times in the tenth session's CI).
# `make test` hands whole files to its two pytest-xdist workers in collection order
# (--dist=loadfile --no-loadscope-reorder), so these start first and the short files fill
# the gaps: longest-processing-time-first. xdist's own order (most tests first) started the
# JAX faults test last, and one worker idled for its five minutes.
LONGEST_FIRST = (
    "test_engines.py",
    "test_engine_faults.py",
    "test_docker.py",
    "test_bench.py",
    "test_reliability.py",
    "test_train.py",
    "test_gpu_check.py",
    "test_backends.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file
    no_gpu = pytest.mark.skip(reason="no GPU on this machine (nvidia-smi -L failed or missing)")
    has_gpu = None
    for item in items:
        if "gpu" in item.keywords:
            if has_gpu is None:
                has_gpu = _has_gpu()
            if not has_gpu:
                item.add_marker(no_gpu)
