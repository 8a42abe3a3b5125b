"""The engine flags: read, and acted on, before Keras is imported.

Keras reads its backend (`KERAS_BACKEND`) once, at import, and JAX reads `XLA_FLAGS` once; so
`train.py` parses these three flags from `sys.argv` first, checks the launch against the
engine (`lars_tf.engines.launch`, which imports no Keras) and prepares the environment, and
only then imports Keras. It also sets the TensorFlow defaults of `PROCESS_ENVIRONMENT`, which
TensorFlow reads at import too. This module imports absl and that launch module only.
"""

from __future__ import annotations

import os

from absl import flags

from lars_tf.engines import launch

FLAGS = flags.FLAGS

# TensorFlow reads these once, at import; a user's own setting is kept.
PROCESS_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # oneDNN's CPU kernels. By default TensorFlow turns them on only on CPUs with AVX512-VNNI,
    # AVX512-BF16, AVX-VNNI or AMX, so not, e.g., on AMD EPYCs before Zen 4 or Intel Xeons
    # before Cascade Lake: on such an EPYC the AlexNet twin's and ResNet-20's train steps ran
    # 1.42x and 1.47x faster with them, and channels_first models cannot run on the CPU
    # without them (`make bench` part 6 measures the ratio on any machine).
    "TF_ENABLE_ONEDNN_OPTS": "1",
}


def define(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_enum(
        "engine",
        "horovod",
        launch.NAMES,
        "Distributed engine: horovod (one process per device, under horovodrun), "
        "tf_distribute (MirroredStrategy over one process's devices; MultiWorkerMirroredStrategy "
        "over the workers of a TF_CONFIG) or jax (Keras on JAX, "
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
    """Sets the backend and devices for `--engine` in `argv`, and `PROCESS_ENVIRONMENT`;
    returns the launch's error, if any.

    Flags that do not parse are left to `app.run`, which reports them with the usage line.
    """
    for name, value in PROCESS_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
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
