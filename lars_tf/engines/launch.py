"""Which engine a run uses, and whether the way it was launched fits it: no Keras import.

This module runs before Keras is imported, because Keras reads its backend (`KERAS_BACKEND`)
once, at import, and the JAX engine needs the JAX backend; JAX reads `XLA_FLAGS` once too. So
`prepare_environment` sets those variables, and `check_launch` refuses a launch that does not
match the engine, before any data is read or model built.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import MutableMapping

# Engine name -> the Keras backend it runs on.
BACKENDS = {"horovod": "tensorflow", "tf_distribute": "tensorflow", "jax": "jax"}
NAMES = tuple(BACKENDS)

# Set by `horovodrun` (Gloo) and by `mpirun` (Open MPI; MPICH, Intel MPI and Slurm's PMI): the
# process is one of several Horovod workers.
HOROVOD_LAUNCH = ("HOROVOD_RANK", "HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
LAUNCHER_SIZE = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class LaunchError(ValueError):
    """The engine cannot run as launched; the message names the fix."""


def tf_config_workers(environ: MutableMapping[str, str]) -> int:
    """The number of workers `TF_CONFIG` names (0 without `TF_CONFIG`).

    Raises:
        LaunchError: `TF_CONFIG` is not JSON with a `cluster` and a `task` inside it.
    """
    text = environ.get("TF_CONFIG")
    if not text:
        return 0
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
        kind, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise LaunchError(
            f"TF_CONFIG is not a tf.distribute cluster description ({error!r}); expected JSON "
            'like {"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": '
            '"worker", "index": 0}}'
        ) from None
    members = len(cluster.get(kind, []))
    if kind not in ("chief", "worker") or not 0 <= index < members:
        raise LaunchError(
            f'TF_CONFIG task {{"type": {kind!r}, "index": {index}}} is not one of the '
            f"{workers} workers its cluster names; give each process its own index, "
            f"0 ... {members - 1} of type worker"
        )
    return workers


def launcher_size(environ: MutableMapping[str, str]) -> int:
    """The process count that horovodrun or an MPI launcher gives (1 without one)."""
    for name in LAUNCHER_SIZE:
        if environ.get(name):
            return int(environ[name])
    return 1


# Read by `keras.distribution.initialize()`: a JAX job of several processes.
JAX_LAUNCH = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)


def jax_processes(environ: MutableMapping[str, str]) -> int:
    """The process count of a JAX launch (`KERAS_DISTRIBUTION_NUM_PROCESSES`; 1 without)."""
    value = environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "") or "1"
    try:
        count = int(value)
    except ValueError:
        raise LaunchError(
            f"KERAS_DISTRIBUTION_NUM_PROCESSES={value!r} is not a process count"
        ) from None
    if count < 1:
        raise LaunchError(f"KERAS_DISTRIBUTION_NUM_PROCESSES={count} must be >= 1")
    return count


def _check_jax_launch(environ: MutableMapping[str, str]) -> int:
    """The process count of a JAX launch, after checking its three variables agree."""
    processes = jax_processes(environ)
    addresses = environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "")
    if processes == 1 and "," in addresses:
        raise LaunchError(
            f"KERAS_DISTRIBUTION_JOB_ADDRESSES={addresses} names several processes: set "
            "KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID too"
        )
    if processes == 1:
        return 1
    missing = [name for name in JAX_LAUNCH if not environ.get(name)]
    if missing:
        raise LaunchError(
            f"a JAX launch of {processes} processes needs {', '.join(JAX_LAUNCH)} in every "
            f"process's environment; missing: {', '.join(missing)}"
        )
    process_id = environ["KERAS_DISTRIBUTION_PROCESS_ID"]
    if not process_id.isdigit() or int(process_id) >= processes:
        raise LaunchError(
            f"KERAS_DISTRIBUTION_PROCESS_ID={process_id} must be one of 0..{processes - 1} "
            f"(KERAS_DISTRIBUTION_NUM_PROCESSES={processes})"
        )
    return processes


def _lenient_jax_processes(environ: MutableMapping[str, str]) -> int:
    # For the engines that do not use KERAS_DISTRIBUTION_*: a malformed count is not theirs.
    try:
        return jax_processes(environ)
    except LaunchError:
        return 1


def _lenient_tf_config_workers(environ: MutableMapping[str, str]) -> int:
    # For the engines that do not use TF_CONFIG: a malformed one is not their business.
    try:
        return tf_config_workers(environ)
    except LaunchError:
        return 0


def check_launch(
    engine: str,
    environ: MutableMapping[str, str] | None = None,
    *,
    expected_workers: int = 0,
) -> None:
    """Refuse a launch that does not fit `engine`, naming the fix.

    Args:
        engine: One of `NAMES`.
        environ: The process environment (default `os.environ`).
        expected_workers: The worker count the run was told to expect (train.py's
            `--num_workers`); 0: any.

    Raises:
        LaunchError: An unknown engine; the engine's backend is missing; `KERAS_BACKEND`
            names another backend; a launch of several processes by another engine's
            launcher; for tf_distribute a malformed `TF_CONFIG`, or one whose task is not
            one of its workers; for jax a `KERAS_DISTRIBUTION_*` launch that misses a
            variable or names a process outside the job; a worker count other than
            `expected_workers`.
    """
    environ = os.environ if environ is None else environ
    if engine not in BACKENDS:
        raise LaunchError(f"--engine={engine!r} is not an engine; choose one of {', '.join(NAMES)}")
    backend = BACKENDS[engine]
    chosen = environ.get("KERAS_BACKEND")
    if chosen and chosen != backend:
        raise LaunchError(
            f"KERAS_BACKEND={chosen} but --engine={engine} runs on the {backend} backend: "
            "unset KERAS_BACKEND (train.py sets it from --engine)"
        )
    if importlib.util.find_spec(backend) is None:
        raise LaunchError(
            f"--engine={engine} needs the {backend} package, which is not installed in this "
            "Python: `make install` installs it"
        )
    launcher = launcher_size(environ)
    jax_launch = _lenient_jax_processes(environ) if engine != "jax" else _check_jax_launch(environ)
    if engine == "horovod":
        # A TF_CONFIG or JAX launch of several processes without horovodrun/mpirun: each
        # process would train alone. A one-worker TF_CONFIG (managed platforms set one) is fine.
        if _lenient_tf_config_workers(environ) > 1 and launcher == 1:
            raise LaunchError(
                "TF_CONFIG names several workers, which is a tf.distribute launch: run with "
                "--engine=tf_distribute, or unset TF_CONFIG and launch with horovodrun"
            )
        if jax_launch > 1 and launcher == 1:
            raise LaunchError(
                "KERAS_DISTRIBUTION_NUM_PROCESSES > 1 is a JAX multi-process launch: launch "
                "with horovodrun instead"
            )
        workers = launcher
    else:
        if launcher > 1:
            raise LaunchError(
                f"this process is one of {launcher} started by horovodrun/mpirun, but "
                f"--engine={engine} does not use Horovod: run with --engine=horovod, or launch "
                "one plain python process"
            )
        if engine == "tf_distribute":
            if jax_launch > 1:
                raise LaunchError(
                    "KERAS_DISTRIBUTION_NUM_PROCESSES > 1 is a JAX multi-process launch: run "
                    "with --engine=jax, or unset the KERAS_DISTRIBUTION_* variables"
                )
            workers = max(1, tf_config_workers(environ))
        else:
            if _lenient_tf_config_workers(environ) > 1:
                raise LaunchError(
                    "TF_CONFIG names several workers, which is a tf.distribute launch: run with "
                    "--engine=tf_distribute, or unset TF_CONFIG"
                )
            workers = jax_launch
    if expected_workers and workers != expected_workers:
        raise LaunchError(
            f"--num_workers={expected_workers} but this --engine={engine} launch has {workers} "
            "worker process(es): launch as many processes as --num_workers says (horovodrun "
            "-np, mpirun -np, TF_CONFIG's workers, KERAS_DISTRIBUTION_NUM_PROCESSES), or "
            "change it"
        )


def prepare_environment(
    engine: str, cpu_devices: int = 0, environ: MutableMapping[str, str] | None = None
) -> None:
    """Set what Keras, TensorFlow and JAX read once at import, for `engine`.

    Args:
        engine: One of `NAMES` (checked by `check_launch`).
        cpu_devices: Split the CPU into this many devices (0: leave it one). For the JAX
            engine this is XLA's host device count, set here; for tf_distribute the engine
            makes logical CPU devices once TensorFlow is imported.
        environ: The environment to change (default `os.environ`).
    """
    environ = os.environ if environ is None else environ
    environ["KERAS_BACKEND"] = BACKENDS[engine]
    if engine == "horovod" and "HOROVOD_LOCAL_SIZE" in environ:
        # Before TensorFlow starts its thread pools: ranks sharing a machine split its cores,
        # or two ranks on two cores each spawn two threads.
        cores = max(1, (os.cpu_count() or 1) // int(environ["HOROVOD_LOCAL_SIZE"]))
        environ.setdefault("OMP_NUM_THREADS", str(cores))
    if engine == "jax" and cpu_devices:
        flag = f"--xla_force_host_platform_device_count={cpu_devices}"
        environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {flag}".strip()
        # The split exists on the CPU only: run JAX there.
        environ["JAX_PLATFORMS"] = "cpu"
