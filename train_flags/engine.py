"""The engine flags: read, and acted on, before Keras is imported.

Keras reads its backend (`KERAS_BACKEND`) once, at import, and JAX reads `XLA_FLAGS` once; so
`train.py` parses these three flags from `sys.argv` first, checks the launch against the
engine (`lars_tf.engines.launch`, which imports no Keras) and prepares the environment, and
only then imports Keras. This module imports absl and that launch module only.
"""

from __future__ import annotations

from absl import flags

from lars_tf.engines import launch

FLAGS = flags.FLAGS


def define(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_enum(
        "engine",
        "horovod",
        launch.NAMES,
        "Distributed engine: horovod (one process per device, under horovodrun), "
        "tf_distribute (MirroredStrategy over one process's devices) or jax (Keras on JAX, "
        "keras.distribution.DataParallel over the devices of one process, or of several "
        "started with KERAS_DISTRIBUTION_JOB_ADDRESSES/_NUM_PROCESSES/_PROCESS_ID).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "cpu_devices",
        0,
        "tf_distribute and jax: split the CPU into this many devices, to run several "
        "replicas without GPUs (tests, demos); 0: the real devices.",
        lower_bound=0,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_workers",
        0,
        "Refuse to start unless the launch has this many worker processes (horovodrun -np, "
        "TF_CONFIG's workers); 0: any.",
        lower_bound=0,
        flag_values=fv,
    )


def prepare_launch(argv: list[str]) -> launch.LaunchError | None:
    """Sets the backend and devices for `--engine` in `argv`; the launch's error, if any.

    Flags that do not parse are left to `app.run`, which reports them with the usage line.
    """
    fv = flags.FlagValues()
    define(fv)
    try:
        fv(argv, known_only=True)
    except flags.Error:
        return None
    try:
        launch.check_launch(fv.engine, expected_workers=fv.num_workers)
    except launch.LaunchError as error:
        return error
    launch.prepare_environment(fv.engine, fv.cpu_devices)
    return None
