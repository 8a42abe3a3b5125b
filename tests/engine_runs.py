"""Running train.py under the engines from the tests: tiny flags, processes, checkpoints.

Shared by tests/test_engines.py (launches, equivalence) and tests/test_engine_faults.py
(kill -9, SIGTERM, NaN under each engine).
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300
TINY = [
    "--model=alexnet_bn_small",
    "--width_multiplier=0.125",
    "--groups=1",
    "--image_size=32",
    "--log_every_steps=0",
    "--global_batch_size=8",
    "--eval_every_epochs=0",
    "--progress_every_steps=0",
]
SYNTHETIC = ["--synthetic", "--synthetic_examples=32", "--num_classes=10"]
# No batch norm and no dropout: per-replica statistics and masks would differ by design.
PLAIN = ["--normalization=none", "--dropout=0"]
# Float32 sums of 2 half batches against one whole batch, over 3 LARS updates.
TOLERANCE = dict(rtol=1e-5, atol=2e-6)
# The same run on TensorFlow and on JAX (XLA), from the same initial weights.
ACROSS_BACKENDS = dict(rtol=1e-4, atol=1e-5)


# Two Horovod ranks on this machine; Gloo, as a CPU build without MPI runs them.
HOROVODRUN_2 = (
    str(Path(sys.executable).with_name("horovodrun")),
    "-np",
    "2",
    "-H",
    "localhost:2",
    "--gloo",
)
HOROVOD_ENV = {"HOROVOD_GLOO_TIMEOUT_SECONDS": "120"}  # rendezvous on a loaded 2-core machine


def environment(**extra: str) -> dict[str, str]:
    # train.py sets KERAS_BACKEND from --engine; the suite's own setting must not leak in.
    kept = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    return {**kept, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1", **extra}


def run(
    *argv: str, check: bool = True, launcher: tuple[str, ...] = (), **env: str
) -> subprocess.CompletedProcess:
    """train.py with `argv`, to its end; under `launcher` (e.g. horovodrun's command) if given."""
    proc = subprocess.run(
        [*launcher, sys.executable, str(REPO / "train.py"), *argv],
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def array_entries(model_dir: Path, step: int | None = None) -> list[tuple[str, np.ndarray]]:
    """The latest `ArrayCheckpointer` archive of a JAX run, or the one of update `step`:
    (path, value), model variables first, in the model's order, then the optimizer's."""
    folder = model_dir / "checkpoints"
    name = json.loads((folder / "checkpoint.json").read_text())["checkpoints"][-1]
    if step is not None:
        name = f"ckpt-{step}.npz"
    with np.load(io.BytesIO((folder / name).read_bytes())) as stored:
        keys = sorted(k for k in stored.files if ":" in k)
        return [("images_seen", stored["images_seen"])] + [
            (key.split(":", 1)[1], stored[key]) for key in keys
        ]


def array_checkpoint(model_dir: Path, step: int | None = None) -> dict[str, np.ndarray]:
    return dict(array_entries(model_dir, step))


def trainable_weights(values: dict[str, np.ndarray]) -> list[np.ndarray]:
    """A TensorFlow checkpoint's trainable weights, in the model's order."""
    found = []
    while (key := f"optimizer/_trainable_variables/{len(found)}/.ATTRIBUTES/VARIABLE_VALUE") in (
        values
    ):
        found.append(values[key])
    return found


def assert_close(actual: dict, expected: dict, extra: str = "", **tolerance) -> None:
    """Every float value of `expected` in `actual`; `actual` may add names containing `extra`
    (gradient accumulators)."""
    added = actual.keys() - expected.keys()
    assert expected.keys() <= actual.keys() and all(extra and extra in n for n in added), added
    compared = 0
    for name, value in expected.items():
        if value.dtype.kind != "f":
            continue
        np.testing.assert_allclose(actual[name], value, err_msg=name, **tolerance)
        compared += 1
    assert compared > 4  # the weights were really compared


def assert_same_progress(actual: dict, expected: dict) -> None:
    """The update counter and the images consumed, exactly (`assert_close` compares floats)."""
    names = [n for n in expected if "iteration" in n or "images_seen" in n]
    assert len(names) >= 2, sorted(expected)
    for name in names:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def jax_job(processes: int) -> list[dict[str, str]]:
    """The environment of each of `processes` JAX processes of one job on localhost."""
    address = f"localhost:{free_port()}"
    return [
        {
            "KERAS_DISTRIBUTION_JOB_ADDRESSES": address,
            "KERAS_DISTRIBUTION_NUM_PROCESSES": str(processes),
            "KERAS_DISTRIBUTION_PROCESS_ID": str(rank),
        }
        for rank in range(processes)
    ]


def tf_config_job(workers: int) -> list[dict[str, str]]:
    """The environment of each of `workers` MultiWorkerMirroredStrategy workers on localhost."""
    cluster = {"worker": [f"localhost:{free_port()}" for _ in range(workers)]}
    return [
        {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": rank}})}
        for rank in range(workers)
    ]


def run_processes(
    *argv: str, engine: str = "jax", processes: int = 2, check: bool = True
) -> list[subprocess.CompletedProcess]:
    """`train.py --engine=ENGINE` as `processes` processes of one job on localhost: a JAX job
    (`jax_job`) or a tf.distribute cluster (`tf_config_job`)."""
    jobs = jax_job(processes) if engine == "jax" else tf_config_job(processes)
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), f"--engine={engine}", *argv],
            env=environment(**job),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for job in jobs
    ]
    done = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            stdout, stderr = proc.communicate()
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    for rank, proc in enumerate(done):
        assert proc.returncode == 0 or not check, (
            f"rank {rank}:\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
        )
    return done


def run_jax_processes(
    *argv: str, processes: int = 2, check: bool = True
) -> list[subprocess.CompletedProcess]:
    """`train.py --engine=jax` as `processes` processes of one job on localhost."""
    return run_processes(*argv, engine="jax", processes=processes, check=check)
