"""The tf.distribute engine: `MirroredStrategy` over the devices of one process, or
`MultiWorkerMirroredStrategy` over several processes (machines) named by `TF_CONFIG`.

    python train.py --engine=tf_distribute ...                   # every GPU of this machine
    python train.py --engine=tf_distribute --cpu_devices=2 ...   # two logical CPUs (tests)
    # several machines, each started with its own task index:
    TF_CONFIG='{"cluster": {"worker": ["host0:2222", "host1:2222"]},
                "task": {"type": "worker", "index": <0 or 1>}}' \
        python train.py --engine=tf_distribute ...

Keras 3's `fit` under the strategy splits each batch over the replicas, sums their gradients
and applies one update to every replica's variables, so the training step needs no collective
of its own. Under `MultiWorkerMirroredStrategy`:

- each worker reads its own shard at the per-worker batch, as under Horovod, and hands it to
  `fit` through `distribute_datasets_from_function` (Keras' own `experimental_distribute_dataset`
  would shard it again and split a batch it takes for the global one);
- Keras' `fit` fails there with Keras' own SGD too (keras-team/keras#20585), which
  `lars_tf.keras_internals.fit_under_multi_worker_mirrored` works around;
- the trainer's own collectives (the stop decision, metric sums, rank 0's restored state, the
  replica check) are all-reduces of the strategy, run between steps in a `tf.function`, in
  float64;
- the chief (rank 0) alone reads and writes checkpoints, and sends what it restored to the
  others.

Three Keras 3 limits hold for every optimizer under a strategy, and the engine refuses the
options they break rather than train wrongly: `gradient_accumulation_steps` fails under
`MirroredStrategy`; under `mixed_float16` each replica decides alone whether its gradients are
finite (an overflow on another replica reaches the weights); an XLA-compiled step (`--xla`)
fails under `MirroredStrategy` (Keras leaves XLA off under a strategy unless asked).

Dropout: a mirrored variable starts equal on every replica, the seed generators' states too,
so `broadcast` gives replica i (numbered over all workers) rank 0's state with seed + i
(`process_seed`, which offsets Horovod's workers, has no effect here).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lars_tf import keras_internals
from lars_tf.engines.base import Engine
from lars_tf.engines.launch import LaunchError, tf_config_workers


class TFDistributeEngine(Engine):
    name = "tf_distribute"

    def __init__(self, cpu_devices: int = 0) -> None:
        self.cpu_devices = cpu_devices
        self._strategy: tf.distribute.Strategy | None = None
        self.workers = max(1, tf_config_workers(os.environ))
        self._rank = 0
        if self.workers > 1:
            if cpu_devices:
                raise LaunchError(
                    f"--cpu_devices={cpu_devices} with a TF_CONFIG of {self.workers} workers: "
                    "MultiWorkerMirroredStrategy runs one replica per GPU, and one per worker on "
                    "a CPU; run without --cpu_devices"
                )
            self._rank = _tf_config_rank(json.loads(os.environ["TF_CONFIG"]))

    @property
    def processes(self) -> int:
        return self.workers

    @property
    def rank(self) -> int:
        return self._rank

    def configure(self, threads_per_worker: int = 0) -> None:
        if threads_per_worker:
            tf.config.threading.set_intra_op_parallelism_threads(threads_per_worker)
        if self.cpu_devices:
            # Before TensorFlow initializes its devices: N logical CPUs stand in for N GPUs.
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * self.cpu_devices
            )

    @property
    def strategy(self) -> tf.distribute.Strategy:
        if self._strategy is None:
            if self.workers > 1:
                # Reads TF_CONFIG; ring all-reduces between the workers' CPUs, NCCL between GPUs.
                self._strategy = tf.distribute.MultiWorkerMirroredStrategy()
            elif self.cpu_devices:
                devices = [d.name for d in tf.config.list_logical_devices("CPU")]
                # NCCL, the default reduction, needs GPUs.
                self._strategy = tf.distribute.MirroredStrategy(
                    devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
                )
            else:
                self._strategy = tf.distribute.MirroredStrategy()
        return self._strategy

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def scope(self):
        return self.strategy.scope()

    def fit_input(self, model, dataset):
        if self.workers == 1:
            return super().fit_input(model, dataset)  # `fit` splits it over the devices
        keras_internals.fit_under_multi_worker_mirrored(model, dataset.element_spec)
        local = self.replicas // self.workers
        if local > 1:
            # The function's dataset gives one replica's batch; the local replicas take
            # consecutive ones, so one worker's micro-batch is split in order.
            dataset = dataset.rebatch(_batch_size(dataset) // local)
        return self.strategy.distribute_datasets_from_function(lambda context: dataset)

    def check(
        self, *, accumulation_steps: int, xla: bool, dtype: str = "float32", **options
    ) -> None:
        super().check(accumulation_steps=accumulation_steps, xla=xla, **options)
        if xla and self.replicas > 1:
            # Measured under MirroredStrategy (TF 2.21, Keras 3.15, two logical CPUs): Keras
            # compiles its step with XLA inside the strategy's replica function, where the
            # first step fails with "Trying to access resource .../replica_1/... located in
            # device ...:CPU:1 from device ...:CPU:0". Not measured under
            # MultiWorkerMirroredStrategy; Keras itself leaves XLA off under any strategy.
            raise ValueError(
                f"--xla on {self.replicas} tf.distribute replicas: Keras' XLA-compiled step "
                "is not supported under a strategy (under MirroredStrategy it fails at the "
                "first step) and Keras leaves it off there itself; run without --xla, or use "
                "--engine=jax (XLA always) for a compiled multi-device step"
            )
        if accumulation_steps > 1:
            raise ValueError(
                f"--grad_accum_steps={accumulation_steps}: Keras 3's gradient accumulation fails "
                "under MirroredStrategy; use --engine=horovod or --engine=jax to accumulate"
            )
        if dtype == "mixed_float16" and self.replicas > 1:
            raise ValueError(
                f"--dtype=mixed_float16 on {self.replicas} replicas: under a strategy Keras' "
                "loss scaling decides per replica whether the gradients are finite, so one "
                "replica's overflow reaches the weights; use mixed_bfloat16 (no loss scaling), "
                "or --engine=horovod, which agrees on that decision across workers"
            )

    def checkpointer(self, directory: str, model: Any, optimizer: Any, max_to_keep: int):
        checkpointer = super().checkpointer(directory, model, optimizer, max_to_keep)
        on_read = on_read_variables(checkpointer.checkpoint) if self.workers > 1 else []
        if on_read:
            # Reading such a variable in cross-replica context is an all-reduce: the chief
            # would wait in it for workers that do not save. Defensive: Keras' compiled
            # metrics (the kind) are not tracked by the checkpoint, so train.py's models
            # never reach this.
            raise RuntimeError(
                f"the checkpoint holds variables synchronized on read ({', '.join(on_read)}): "
                f"under MultiWorkerMirroredStrategy only the chief saves, and reading one is an "
                f"all-reduce the other {self.workers - 1} worker(s) would not join (the save "
                "would hang); keep such variables (Keras metrics' kind) out of the model"
            )
        return checkpointer

    # Collectives across workers (identities with one): all-reduces of the strategy, run
    # between steps. Only SUM and MEAN exist there, so every other one is a SUM of each
    # worker's values laid in its own row of zeros, which gathers them.

    def _gather(self, values: Any) -> np.ndarray:
        """Every worker's float64 `values`, stacked: shape (workers, *values.shape)."""
        values = np.asarray(values, np.float64)
        rows = np.zeros((self.workers, *values.shape))
        rows[self.rank] = values
        return self._sum(rows)

    def _sum(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(self._summed(tf.constant(values, tf.float64)).numpy(), np.float64)

    def _sum_each(self, values: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The workers' sums of several arrays, in as few all-reduces as buckets of at most
        `_BUCKET` float64 elements hold (one per array larger than that): few collectives,
        and no copy of a whole model's state in one buffer. Float64 is exact for the sum of
        a few float32 values and for integers below 2**53 (`broadcast` checks its own)."""
        sums, bucket, size = [], [], 0

        def flush():
            total, start = self._sum(np.concatenate([np.ravel(v) for v in bucket])), 0
            for v in bucket:
                sums.append(total[start : start + v.size].reshape(np.shape(v)))
                start += v.size
            bucket.clear()

        for value in values:
            if bucket and size + value.size > _BUCKET:
                flush()
                size = 0
            bucket.append(np.asarray(value, np.float64))
            size += value.size
        if bucket:
            flush()
        return sums

    @functools.cached_property
    def _summed(self) -> Callable[[tf.Tensor], tf.Tensor]:
        """The workers' sum of a float64 tensor, as a `tf.function` (`reduce_retracing`: its
        traces generalise over shapes rather than one per shape): an eager all-reduce costs
        several times more, and the guard runs one after every batch. TensorFlow gives each
        collective its key when the function is called, not when it is traced, so what must
        match across workers is the order and the shapes of the calls: every caller passes
        the same on every worker."""
        strategy, local = self.strategy, self.replicas // self.workers

        @tf.function(reduce_retracing=True)
        def summed(tensor):
            def contribution():
                # Each worker once: its first replica adds the value, the others zeros.
                replica = tf.distribute.get_replica_context().replica_id_in_sync_group
                first = tf.equal(replica % local, 0)
                return tf.where(first, tensor, tf.zeros_like(tensor))

            return strategy.reduce("SUM", strategy.run(contribution), axis=None)

        return summed

    def allreduce_max(self, value: float, name: str = "lars_tf_max") -> float:
        if self.workers == 1:
            return float(value)
        return float(self._gather([value]).max())

    def allreduce_sum(self, values: Any, name: str = "lars_tf_sum") -> np.ndarray:
        if self.workers == 1:
            return np.asarray(values, np.float64)
        return self._sum(np.asarray(values, np.float64))

    def average_logs(self, logs: Mapping[str, Any], name: str = "lars_tf_logs") -> dict:
        if self.workers == 1:
            return dict(logs)
        # Keras' own logs are already the workers' mean (the step's metrics are reduced
        # across replicas); what a callback added on each worker (images_per_sec, from its
        # own clock) is not. Averaging both is exact for the first and needed for the rest.
        keys = sorted(k for k, v in logs.items() if np.ndim(v) == 0)
        means = self._sum(np.array([float(logs[k]) for k in keys])) / self.workers
        return {**logs, **dict(zip(keys, means.tolist(), strict=True))}

    def _broadcast_object(self, value: Any) -> Any:
        """Rank 0's picklable `value`, on every worker (bytes as float64: exact)."""
        data = np.frombuffer(pickle.dumps(value), np.uint8) if self.rank == 0 else None
        size = int(self._gather([0 if data is None else data.size])[0, 0])
        buffer = data.astype(np.float64) if data is not None else np.zeros(size)
        return pickle.loads(self._sum(buffer).astype(np.uint8).tobytes())

    def broadcast(self, model, optimizer) -> None:
        """Rank 0's weights, optimizer state and seed-generator draws on every worker (a
        restored checkpoint is read by the chief alone: the model directory need not be
        shared), and a dropout seed of each replica's own.

        A mirrored variable starts equal on every replica (`MultiWorkerMirroredStrategy`
        sends worker 0's initial values to the others), so without the offset every replica
        draws the same dropout masks, whatever `process_seed` gave each worker's Keras seed:
        measured under `MirroredStrategy` on two devices, and checked across two workers by
        `tests/test_engines.py`. Replica i (numbered over all workers) takes rank 0's state
        with i added to its seed, so replica 0 keeps the checkpoint's and a resumed run
        draws what an uninterrupted one would on as many replicas.

        The copies stay apart because Keras creates the state with aggregation "none": a
        step's draw on one replica updates that replica's copy only. An assignment made
        across all replicas at once (a checkpoint read, `set_weights` of the state) makes
        them equal again, which is why `restore` always ends here.
        """
        states = keras_internals.random_states(model)
        if self.workers > 1:
            variables = _unique([*model.weights, *optimizer.variables, *states])
            values = [keras.ops.convert_to_numpy(v) for v in variables]
            # The seed states are integers: float64 carries them exactly below 2**53. Every
            # worker checks its own and they agree, so that all raise and none waits below.
            largest = max((int(np.abs(v).max()) for v in values if _is_integer(v)), default=0)
            if self.allreduce_max(float(largest >= 2**53)):
                raise ValueError(
                    "an integer state at or above 2**53 cannot be sent exactly through the "
                    f"engine's float64 all-reduce (the largest here: {largest})"
                )
            mine = values if self.rank == 0 else [np.zeros_like(v) for v in values]
            for variable, value, root in zip(variables, values, self._sum_each(mine), strict=True):
                variable.assign(np.asarray(root, dtype=value.dtype))
        local = self.replicas // self.workers
        for state in states:
            root = keras.ops.convert_to_numpy(state)
            for index, copy in enumerate(_copies(state)):
                offset = self.rank * local + index
                copy.assign(np.asarray(keras_internals.with_seed_offset(root, offset), root.dtype))

    def average_model_state(self, model) -> None:
        # Keras creates the batch-norm moving statistics with aggregation "none": under the
        # strategy each replica updates its own copy from its share of the batch, and the
        # copies drift apart. Average them, as Horovod's workers do, before evaluating and
        # saving (a checkpoint would otherwise hold the first replica's).
        for variable in model.non_trainable_weights:
            copies = _copies(variable)
            if len(copies) < 2 or not _is_float(variable):
                continue
            mean = tf.add_n([tf.convert_to_tensor(c) for c in copies]) / len(copies)
            for copy in copies:
                copy.assign(mean)
        if self.workers == 1:
            return
        # Across workers too, as Horovod's workers do.
        variables = [v for v in model.non_trainable_weights if _is_float(v)]
        values = [keras.ops.convert_to_numpy(v) for v in variables]
        for variable, value, total in zip(variables, values, self._sum_each(values), strict=True):
            variable.assign((total / self.workers).astype(value.dtype))

    def replica_mismatches(self, variables: Sequence[Any]) -> list[str]:
        differing, prints = [], []
        for variable in variables:
            copies = _copies(variable)
            local = [zlib.crc32(np.ascontiguousarray(c.numpy()).tobytes()) for c in copies]
            if len(set(local)) > 1:
                differing.append(_path(variable))
            prints.append(local[0])
        if self.workers > 1 and variables:
            # A CRC-32 is below 2**32: exact in float64.
            across = self._gather(prints)
            differing += [
                _path(v)
                for v, column in zip(variables, across.T, strict=True)
                if np.ptp(column) and _path(v) not in differing
            ]
        return differing


# Elements of one all-reduce of `_sum_each`: 64 MiB of float64.
_BUCKET = 8 * 2**20


def on_read_variables(checkpoint: tf.train.Checkpoint) -> list[str]:
    """The paths of the variables synchronized on read that `checkpoint` would save."""
    return [
        getattr(item, "path", None) or item.name
        for item in tf.train.TrackableView(checkpoint).descendants()
        if getattr(item, "synchronization", None) in ("on_read", tf.VariableSynchronization.ON_READ)
    ]


def _tf_config_rank(config: dict) -> int:
    """This worker's rank in a TF_CONFIG (checked by `launch`): the chief, if there is one,
    is 0 and the workers follow."""
    task = config["task"]
    if task["type"] == "chief":
        return 0
    return int(task["index"]) + len(config["cluster"].get("chief", []))


def _batch_size(dataset: tf.data.Dataset) -> int:
    size = tf.nest.flatten(dataset.element_spec)[0].shape[0]
    if size is None:
        raise ValueError("the training dataset's batch size must be static (drop_remainder)")
    return int(size)


def _path(variable) -> str:
    return getattr(variable, "path", variable.name)


def _unique(variables: Sequence[Any]) -> list:
    seen, unique = set(), []
    for variable in variables:
        if id(variable) not in seen:
            seen.add(id(variable))
            unique.append(variable)
    return unique


def _copies(variable) -> list:
    """The per-replica copies of a mirrored variable (one entry otherwise)."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return list(getattr(value, "values", [value]))


def _is_integer(value: np.ndarray) -> bool:
    return np.issubdtype(value.dtype, np.integer) and value.size > 0


def _is_float(variable) -> bool:
    return keras.backend.standardize_dtype(variable.dtype).startswith(("float", "bfloat"))
