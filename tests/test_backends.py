"""`tests/any_backend/` under JAX (two host devices) and PyTorch, one subprocess each.

A process has one Keras backend, so the backend-independent suite that runs in-process under
TensorFlow runs again here in subprocesses with `KERAS_BACKEND` set. Each writes the result of
the same `fit` (same initial weights, same data), which must match TensorFlow's.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lars_reference import fit_weights

ANY_BACKEND = Path(__file__).parent / "any_backend"
# How many tests may skip: the JAX-only DataParallel test under PyTorch, nothing else.
EXPECTED_SKIPS = {"jax": 0, "torch": 1}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tensorflow_fit():
    return fit_weights(epochs=2)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_any_backend_suite_passes_and_fit_matches_tensorflow(backend, tmp_path, tensorflow_fit):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(
            f"{backend} is not installed (tools/install.sh installs it where its CPU build "
            "can be had)"
        )
    env = dict(
        os.environ,
        KERAS_BACKEND=backend,
        LARS_TF_RESULTS=str(tmp_path),
        # Two host devices for keras.distribution.DataParallel.
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(ANY_BACKEND), "-q", "-rs", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    counts = dict(
        (kind, int(n)) for n, kind in re.findall(r"(\d+) (passed|skipped|failed)", output)
    )
    assert counts.get("skipped", 0) == EXPECTED_SKIPS[backend], output[-3000:]
    assert counts.get("passed", 0) >= 20, output[-3000:]

    got = dict(np.load(tmp_path / f"{backend}.npz"))
    assert sorted(got) == sorted(tensorflow_fit)
    for path, value in tensorflow_fit.items():
        # Two epochs of LARS from the same weights: float32 rounding of another backend's
        # kernels (convolution, batch norm) and sums.
        np.testing.assert_allclose(got[path], value, rtol=1e-4, atol=1e-5, err_msg=path)
