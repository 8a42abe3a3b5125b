"""Engines: what makes one training run out of several workers (see `base.Engine`).

- `horovod` (the default): one process per device under `horovodrun`;
- `tf_distribute`: `MirroredStrategy` over the devices of one process, or
  `MultiWorkerMirroredStrategy` over the workers (processes, machines) of a `TF_CONFIG`;
- `jax`: Keras on JAX, `keras.distribution.DataParallel` over the devices of one process or
  of several (`keras.distribution.initialize`).

`launch` (no Keras import) chooses the backend and checks the launch before Keras starts;
`create` makes the engine once Keras is imported.
"""

from __future__ import annotations

from lars_tf.engines.launch import BACKENDS, NAMES, LaunchError, check_launch, prepare_environment

__all__ = ["BACKENDS", "NAMES", "LaunchError", "check_launch", "create", "prepare_environment"]


def create(name: str, cpu_devices: int = 0):
    """The engine `name` (one of `NAMES`), for a process launched as `check_launch` allows.

    Args:
        name: The engine.
        cpu_devices: Split the CPU into this many devices (tf_distribute and jax; 0: as is).
    """
    if name == "horovod":
        if cpu_devices:
            raise LaunchError(
                "--cpu_devices is for --engine=tf_distribute and jax; Horovod runs one "
                "process per device (horovodrun -np N)"
            )
        from lars_tf.engines.horovod import HorovodEngine

        return HorovodEngine()
    if name == "tf_distribute":
        from lars_tf.engines.tf_distribute import TFDistributeEngine

        return TFDistributeEngine(cpu_devices)
    if name == "jax":
        from lars_tf.engines.jax_engine import JaxEngine

        return JaxEngine(cpu_devices)
    raise LaunchError(f"--engine={name!r} is not an engine; choose one of {', '.join(NAMES)}")
