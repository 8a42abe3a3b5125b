"""LARS under tf.distribute: two replicas at B/2 each give the weights of one device at B.

Each run is a real process (`tests/scripts/strategy_fit.py`): `MirroredStrategy` over two
logical CPU devices in one process, and `MultiWorkerMirroredStrategy` over two processes on
localhost (`TF_CONFIG`). The model has no batch norm, so the replicas' summed gradients are
exactly the one-device gradient and only float32 rounding (the order of the sums) separates
the two; with batch norm each replica normalises with the statistics of its own half batch,
which is a different model (see `test_batch_norm_differs_by_the_per_replica_statistics`).

Keras 3 `fit` fails under `MultiWorkerMirroredStrategy` on TensorFlow 2.21 with Keras' own
SGD too (keras-team/keras#20585: `_maybe_symbolic_build` reduces a `PerReplica` batch, and
the step's scalar logs are reduced along axis 0), so there LARS is checked in a custom loop
(`strategy.run` of a step that calls `optimizer.apply`) and in `fit` after lars_tf's
workaround (`keras_internals.fit_under_multi_worker_mirrored`), and
`test_keras_fit_under_multi_worker_mirrored_still_fails_upstream` checks the failure without
it, so that it fails the day Keras fixes it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "scripts" / "strategy_fit.py"
# Weights (~0.3-1) after 4 LARS steps, the replicas' sums running in another order: float32
# rounding. Under mixed_float16 each replica computes its weight gradients in float16, summing
# its 8 examples in float16 before the float32 all-reduce, while one device sums 16: float16
# rounding (its epsilon is 1e-3) of a gradient, which LARS's step carries into the weights.
# float16 rounding is relative to the gradient's size, so it is compared as the relative
# distance of each variable, ||got - want|| / ||want||.
TOLERANCE = {"rtol": 0.0, "atol": 2e-6}
MIXED_RELATIVE_DISTANCE = 1e-3

pytestmark = pytest.mark.slow

# "default" is `jit_compile=True`, which compiles the update with XLA on one device and is
# ignored under a strategy (the test checks both); "no_xla" is `jit_compile=False`.
CONFIGS = {
    "default": [],
    "no_xla": ["--jit_compile=0"],
    "mixed_float16": ["--dtype=mixed_float16"],
}


def _tolerance(config: str) -> dict | None:
    return None if config == "mixed_float16" else TOLERANCE


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")


def start_one_process(mode: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), mode, str(out), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_one_process(mode: str, out: Path, *args: str) -> dict[str, np.ndarray]:
    proc = start_one_process(mode, out, *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out))


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_two_workers(out: Path, *args: str) -> tuple[list[int], list[str]]:
    """Two `MultiWorkerMirroredStrategy` workers on localhost; returns codes and stderr."""
    cluster = {"worker": [f"localhost:{p}" for p in _free_ports(2)]}
    procs = []
    for index in range(2):
        config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = dict(_env(), TF_CONFIG=json.dumps(config))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPT), "multi_worker", str(out), *args],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errors = []
    for proc in procs:
        try:
            errors.append(proc.communicate(timeout=300)[1])
        except subprocess.TimeoutExpired:
            proc.kill()
            errors.append(proc.communicate()[1])
    return [p.returncode for p in procs], errors


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The one-device result per (config, loop), computed once."""
    cache: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def get(config: str, loop: str = "fit") -> dict[str, np.ndarray]:
        if (config, loop) not in cache:
            out = tmp_path_factory.mktemp("one") / "one.npz"
            cache[config, loop] = run_one_process("one", out, *CONFIGS[config], f"--loop={loop}")
        return cache[config, loop]

    return get


def assert_same_training(got: dict, want: dict, tolerance: dict | None = TOLERANCE) -> None:
    weights = [k for k in want if k.startswith("w_")]
    statistics = [k for k in want if k.startswith("s_")]
    assert len(weights) == 4 and len(statistics) == 4, sorted(want)
    assert sorted(got) == sorted(want)
    assert int(got["iterations"]) == int(want["iterations"]) == 4
    assert float(got["statistics_spread"]) == 0.0, "the replicas' statistics differ"
    for key in weights:
        if tolerance is None:  # mixed_float16
            distance = np.linalg.norm(got[key] - want[key]) / np.linalg.norm(want[key])
            assert distance < MIXED_RELATIVE_DISTANCE, (key, distance)
        else:
            np.testing.assert_allclose(got[key], want[key], **tolerance, err_msg=key)
    # layer_statistics() (local LR, ||w||, ||g||) of the last update, read after fit.
    for key in statistics:
        rtol = 1e-5 if tolerance else MIXED_RELATIVE_DISTANCE
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=1e-7, err_msg=key)
        assert np.all(got[key] > 0), key
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5 if tolerance else 1e-3)
    # The logs of every step (the running mean of the loss), as reduced over the replicas.
    np.testing.assert_allclose(
        got["batch_losses"], want["batch_losses"], rtol=1e-5 if tolerance else 1e-3
    )


@pytest.mark.parametrize("config", CONFIGS)
def test_mirrored_fit_equals_one_device(config, one_device, tmp_path):
    got = run_one_process("mirrored", tmp_path / "mirrored.npz", *CONFIGS[config])
    want = one_device(config)
    assert_same_training(got, want, _tolerance(config))
    assert int(got["statistics_copies"]) == 2
    # One device compiles its update unless told not to; a strategy never does.
    assert int(want["compiled_updates"]) == (0 if config == "no_xla" else 1)
    assert int(got["compiled_updates"]) == 0


@pytest.mark.parametrize("config", CONFIGS)
def test_multi_worker_custom_loop_equals_one_device(config, one_device, tmp_path):
    out = tmp_path / "multi_worker.npz"
    codes, errors = run_two_workers(out, *CONFIGS[config], "--loop=custom")
    assert codes == [0, 0], "\n".join(e[-3000:] for e in errors)
    assert_same_training(dict(np.load(out)), one_device(config, "custom"), _tolerance(config))


def test_custom_loop_equals_fit_on_one_device(one_device):
    """The reference of the multi-worker test is itself the `fit` result."""
    assert_same_training(one_device("default", "custom"), one_device("default"))


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_multi_worker_fit_with_the_workaround_equals_one_device(optimizer, one_device, tmp_path):
    """`keras_internals.fit_under_multi_worker_mirrored`: Keras' `fit` then trains under
    MultiWorkerMirroredStrategy, LARS and Keras' own SGD alike, to one device's weights."""
    out = tmp_path / "multi_worker.npz"
    codes, errors = run_two_workers(out, f"--optimizer={optimizer}", "--loop=fit_workaround")
    assert codes == [0, 0], "\n".join(e[-3000:] for e in errors)
    got = dict(np.load(out))
    if optimizer == "lars":
        assert_same_training(got, one_device("default"))
        return
    want = run_one_process("one", tmp_path / "one.npz", "--optimizer=sgd")
    assert int(got["iterations"]) == int(want["iterations"]) == 4
    weights = [k for k in want if k.startswith("w_")]
    assert len(weights) == 4 and sorted(got) == sorted(want)
    for key in weights:
        np.testing.assert_allclose(got[key], want[key], **TOLERANCE, err_msg=key)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    assert len(want["batch_losses"]) == 4
    np.testing.assert_allclose(got["batch_losses"], want["batch_losses"], rtol=1e-5)


def test_keras_fit_under_multi_worker_mirrored_still_fails_upstream(tmp_path):
    """Keras' own SGD, no lars_tf involved: keras-team/keras#20585 itself. The day this test
    fails, Keras fixed it: then drop `keras_internals.fit_under_multi_worker_mirrored`."""
    codes, errors = run_two_workers(tmp_path / "sgd.npz", "--optimizer=sgd")
    assert codes[0] != 0 and codes[1] != 0, "Keras fit under MultiWorkerMirrored works now"
    for error in errors:
        assert "Attempt to convert a value (PerReplica" in error, error[-3000:]


def test_keras_gradient_accumulation_under_mirrored_still_fails_upstream(tmp_path):
    """Keras' own SGD with `gradient_accumulation_steps=2`, no lars_tf involved: it trains on
    one device, and under `MirroredStrategy` Keras' `fit` fails, because the optimizer
    all-reduces inside the `ops.cond` that decides whether this batch applies the update (the
    class of keras-team/keras#17429). The tf_distribute engine refuses --grad_accum_steps for
    it (tests/test_engines.py). The day this test fails, Keras fixed it: then lift the refusal
    and test k x B/k = B under the engine."""
    one = run_one_process("one", tmp_path / "one.npz", "--optimizer=sgd", "--accumulation=2")
    assert int(one["iterations"]) == 2  # 4 batches, one update every 2
    proc = start_one_process("mirrored", tmp_path / "m.npz", "--optimizer=sgd", "--accumulation=2")
    assert proc.returncode != 0, "Keras' gradient accumulation works under Mirrored now"
    assert "`merge_call` called while defining a new graph" in proc.stderr, proc.stderr[-3000:]


def test_batch_norm_differs_by_the_per_replica_statistics(tmp_path):
    """With batch norm, each replica normalises its 8 examples with their own mean and
    variance, as the one device normalises its 16 with theirs: the forward passes differ, so
    the weights do too, by far more than rounding. (Synchronised batch norm would restore the
    equality; the paper's Caffe runs, like Horovod's default, use per-worker statistics.)"""
    one = run_one_process("one", tmp_path / "one.npz", "--batch_norm")
    mirrored = run_one_process("mirrored", tmp_path / "mirrored.npz", "--batch_norm")
    kernel = "w_sequential/conv/kernel"
    assert np.abs(one[kernel] - mirrored[kernel]).max() > 100 * TOLERANCE["atol"]
