"""Data-parallel training with Horovod under Keras 3, or a single process without it.

Horovod 0.28's Keras integration (`horovod.tensorflow.keras`: `DistributedOptimizer`, the
broadcast and metric-average callbacks) does not work with Keras 3: its optimizer wrapper never
sees Keras 3's `optimizer.apply()`, so gradients are silently not averaged. This module is the
small replacement, built on the `horovod.tensorflow` collectives only:

- `distribute_optimizer` makes an optimizer average its gradients across workers once per
  update: with gradient accumulation, each worker accumulates locally and one all-reduce runs
  on the update step, before gradient clipping and before LARS computes its norms.
- `broadcast_model_and_optimizer` copies rank 0's model and optimizer state to every worker
  after they are built (and after rank 0 restored a checkpoint); `run_on_root` runs such a
  rank-0-only step and gives every worker its result, or its failure.
- `MetricAverageCallback`, `average_logs` and `average_model_state` make the reported numbers
  and the batch-norm statistics those of the whole job rather than of one worker.
- `rank`, `size`, `is_rank0` shard the input and keep writers on rank 0.

Without Horovod installed, or with one process, every function degrades to the single-process
behaviour (no collective is issued), so the same driver runs under `horovodrun -np N` and as a
plain `python train.py`.

Typical use::

    distributed.init()
    model.compile(optimizer=LARS(...), loss=...)
    distributed.distribute_optimizer(model.optimizer, compression="fp16")
    distributed.broadcast_model_and_optimizer(model, model.optimizer)
    model.fit(data.dataset, callbacks=[distributed.MetricAverageCallback(), ...],
              verbose=1 if distributed.is_rank0() else 0)
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lars_tf import keras_internals, progress
from lars_tf.engines import base as engine_base
from lars_tf.engines import launch

_log = logging.getLogger(__name__)

# Set by `horovodrun` (Gloo) and by `mpirun` launches of Horovod; their presence means the user
# asked for a distributed run, so a Horovod that fails to import is an error, not a fallback.
_LAUNCHER_ENV = launch.HOROVOD_LAUNCH
_COMPRESSIONS = ("none", "fp16")
# "fp16" scales each gradient so that the float16 sum over workers stays at most 2**15, half
# of float16's largest finite value (65504), room for the rounding of the partial sums.
FP16_SUM_BOUND_LOG2 = 15
# Scale exponents are kept where 2**k and 2**-k are normal float32 numbers.
_MAX_EXPONENT = 126

_hvd: Any = None  # the `horovod.tensorflow` module once `init()` has succeeded
_initialized = False


def init() -> int:
    """Initialize Horovod if it is installed; safe to call more than once.

    Returns:
        The number of workers (1 without Horovod).

    Raises:
        RuntimeError: The process was started by a Horovod launcher but Horovod cannot be
            imported; training alone would silently ignore the other workers.
    """
    global _hvd, _initialized
    if _initialized:
        return size()
    try:
        import horovod.tensorflow as hvd
    except ImportError as error:
        launched = [name for name in _LAUNCHER_ENV if name in os.environ]
        if launched:
            raise RuntimeError(
                f"this process was started by a distributed launcher ({', '.join(launched)} "
                f"set) but horovod.tensorflow cannot be imported: {error}"
            ) from error
        _log.info("Horovod is not installed: training in a single process.")
        _initialized = True
        return 1
    hvd.init()
    _hvd = hvd
    _initialized = True
    return hvd.size()


def _horovod() -> Any:
    """The initialized Horovod module, or None in a single process."""
    if not _initialized:
        init()
    return _hvd


def size() -> int:
    """The number of workers in the job (1 without Horovod)."""
    hvd = _horovod()
    return hvd.size() if hvd is not None else 1


def rank() -> int:
    """This worker's index in the job, 0 ... size() - 1 (0 without Horovod)."""
    hvd = _horovod()
    return hvd.rank() if hvd is not None else 0


def local_rank() -> int:
    """This worker's index on its machine (0 without Horovod)."""
    hvd = _horovod()
    return hvd.local_rank() if hvd is not None else 0


def local_size() -> int:
    """The number of workers on this machine (1 without Horovod)."""
    hvd = _horovod()
    return hvd.local_size() if hvd is not None else 1


def is_distributed() -> bool:
    """Whether more than one worker takes part, i.e. whether collectives are issued."""
    return size() > 1


def is_rank0() -> bool:
    """The writer predicate: checkpoints, logs and progress come from rank 0 only."""
    return rank() == 0


def pin_gpu() -> None:
    """Give each worker on a machine its own GPU, the one of its `local_rank()`.

    Without it every worker of a machine would place its model on GPU:0. Where each worker
    sees one GPU only (a scheduler set `CUDA_VISIBLE_DEVICES` per rank) that one is used, and
    where a machine has fewer GPUs than workers nothing is pinned (with a warning). Memory
    growth is turned on for the GPU used, so that workers sharing a machine do not each
    reserve all of its memory up front. Must run before TensorFlow initializes its devices;
    does nothing without GPUs.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return
    if len(gpus) == 1:
        gpu = gpus[0]
    elif local_rank() < len(gpus) and local_size() <= len(gpus):
        gpu = gpus[local_rank()]
    else:
        _log.warning(
            "%d workers on this machine and %d GPUs: not pinning one GPU per worker (launch at "
            "most one worker per GPU: horovodrun -H host:%d)",
            local_size(),
            len(gpus),
            len(gpus),
        )
        return
    tf.config.experimental.set_memory_growth(gpu, True)
    tf.config.set_visible_devices(gpu, "GPU")


def configure_threads(intra_op: int | None = None, inter_op: int | None = None) -> int:
    """Share this machine's cores among the workers on it.

    Must run before TensorFlow executes its first operation. Without arguments each of the
    `local_size()` workers gets `cpu_count // local_size()` intra-op threads (at least 1) and
    2 inter-op threads, so two ranks on two cores do not each spawn threads for both cores.

    Args:
        intra_op: Threads per operation; None derives it as above.
        inter_op: Operations run concurrently; None means 2 when distributed, else TF's default.

    Returns:
        The intra-op thread count set, or 0 when nothing was changed (a single process with no
        explicit counts keeps TensorFlow's defaults).
    """
    if intra_op is None and not is_distributed():
        return 0
    if intra_op is None:
        intra_op = max(1, (os.cpu_count() or 1) // local_size())
    if inter_op is None and is_distributed():
        inter_op = 2
    tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if inter_op is not None:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    return intra_op


def _compression_name(compression: str | None) -> str:
    name = "none" if compression is None else compression
    if name not in _COMPRESSIONS:
        raise ValueError(
            f"`compression` must be one of {_COMPRESSIONS} or None. Received: {compression!r}"
        )
    return name


def power_of_two(exponent: Any) -> tf.Tensor:
    """`2.0 ** exponent` as float32, built from its bits: exact, where `pow` may round.

    Args:
        exponent: int32 tensor with values in [-126, 127] (normal float32 powers of two).
    """
    exponent = tf.cast(exponent, tf.int32)
    return tf.bitcast(tf.bitwise.left_shift(exponent + 127, 23), tf.float32)


def fp16_scale_exponents(max_abs: Any, num_workers: int) -> tf.Tensor:
    """Per tensor, the largest k with `num_workers * max_abs * 2**k <= 2**15`.

    Multiplying a gradient by 2**k before the float16 all-reduce puts its largest element
    near the top of float16's range, so that its small elements stay normal float16 numbers
    (float16 flushes magnitudes below 6e-8 to zero and keeps few bits below 6.1e-5) and the
    sum over `num_workers` cannot overflow. Dividing by 2**k afterwards is exact.

    Args:
        max_abs: float vector, per tensor the largest |g| over all workers.
        num_workers: How many values of each element the all-reduce adds up.

    Returns:
        int32 vector of k, clipped to [-126, 126]; 0 where `max_abs` is 0 or not finite
        (nothing to scale, or a step that the NaN guard of the run will end).
    """
    # float64: the product of any finite float32 and a worker count is exact enough and finite.
    bound = float(num_workers) * tf.cast(max_abs, tf.float64)
    usable = tf.math.is_finite(bound) & (bound > 0)
    bits = tf.bitcast(tf.where(usable, bound, 1.0), tf.int64)
    # A positive float64 is 2**e * (1 + mantissa), e its biased exponent field - 1023: the
    # largest k with bound * 2**k <= 2**15 is 14 - e, or 15 - e for an exact power of two.
    exponent = tf.bitwise.right_shift(bits, 52) - 1023
    mantissa = tf.bitwise.bitwise_and(bits, tf.constant(2**52 - 1, tf.int64))
    k = FP16_SUM_BOUND_LOG2 - 1 - exponent + tf.cast(tf.equal(mantissa, 0), tf.int64)
    k = tf.cast(tf.clip_by_value(k, -_MAX_EXPONENT, _MAX_EXPONENT), tf.int32)
    return tf.where(usable, k, tf.zeros_like(k))


def fp16_compress(gradient: Any, exponent: Any) -> tf.Tensor:
    """`gradient * 2**exponent` as float16 (see `fp16_scale_exponents`)."""
    return tf.cast(tf.cast(gradient, tf.float32) * power_of_two(exponent), tf.float16)


def fp16_decompress(summed: Any, exponent: Any, num_workers: int, dtype: Any) -> tf.Tensor:
    """The average in `dtype` of a float16 sum of `fp16_compress(g, exponent)` over workers."""
    scale = power_of_two(-tf.cast(exponent, tf.int32)) / float(num_workers)
    return tf.cast(tf.cast(summed, tf.float32) * scale, dtype)


def allreduce_gradients(grads: Sequence[Any], compression: str | None = None) -> list[Any]:
    """Average a list of gradients (dense or `tf.IndexedSlices`) across all workers.

    One grouped all-reduce for the whole list, so Horovod fuses the tensors into few messages.

    Args:
        grads: Gradients, in the same order on every worker.
        compression: "fp16" to send dense float gradients as float16 (halves the traffic),
            each scaled by a power of two that the workers agree on first (one small Max
            all-reduce of the per-tensor largest |g|, see `fp16_scale_exponents`), so that
            small gradients keep float16's 11 bits instead of flushing to zero; or None /
            "none". Horovod's own fp16 compression casts unscaled: gradients of RMS 1e-7
            lost 17% of their norm that way and a quarter of their elements.

    Returns:
        The averaged gradients, in the same order; `grads` unchanged in a single process.
    """
    grads = list(grads)
    hvd = _horovod()
    if hvd is None or hvd.size() == 1 or not grads:
        return grads
    if _compression_name(compression) == "none":
        return hvd.grouped_allreduce(grads, op=hvd.Average, name="lars_tf_gradients")
    return _allreduce_fp16(hvd, grads)


def _allreduce_fp16(hvd: Any, grads: list[Any]) -> list[Any]:
    # IndexedSlices are all-gathered, not summed, and integers cannot be scaled: both go
    # uncompressed, as Horovod's own compression leaves them.
    dense = [
        i
        for i, g in enumerate(grads)
        if not isinstance(g, tf.IndexedSlices) and tf.as_dtype(g.dtype).is_floating
    ]
    reduced = list(grads)
    other = [i for i in range(len(grads)) if i not in set(dense)]
    if other:
        averaged = hvd.grouped_allreduce(
            [grads[i] for i in other], op=hvd.Average, name="lars_tf_gradients_uncompressed"
        )
        for i, value in zip(other, averaged, strict=True):
            reduced[i] = value
    if not dense:
        return reduced
    workers = hvd.size()
    # reduce_max of an empty tensor is -inf: not finite, so its exponent is 0.
    local_max = tf.stack([tf.reduce_max(tf.abs(tf.cast(grads[i], tf.float32))) for i in dense])
    exponents = fp16_scale_exponents(
        hvd.allreduce(local_max, op=hvd.Max, name="lars_tf_gradients_max"), workers
    )
    summed = hvd.grouped_allreduce(
        [fp16_compress(grads[i], exponents[j]) for j, i in enumerate(dense)],
        op=hvd.Sum,
        name="lars_tf_gradients_fp16",
    )
    for j, i in enumerate(dense):
        reduced[i] = fp16_decompress(summed[j], exponents[j], workers, grads[i].dtype)
    return reduced


def _allreduce_then_clip(compression: str | None):
    def clip_gradients(clip, grads):
        # Keras 3 calls `_clip_gradients` exactly once per optimizer update: on every step
        # without accumulation, and only on the update step (with the locally averaged
        # accumulated gradients) with `gradient_accumulation_steps`. It runs after loss-scale
        # unscaling and before clipping, decoupled weight decay and `update_step`, where LARS
        # computes its norms: the one place where averaging gives the update of the global
        # batch. `apply()` would be too early (once per micro-batch), `_backend_update_step`
        # too late (after clipping).
        return clip(allreduce_gradients(grads, compression))

    return clip_gradients


def _agreed_check_finite(check_finite, grads):
    # A worker that skips the step (non-finite gradients) while another applies it would leave
    # the other waiting in the gradient all-reduce, and the replicas would diverge: the skip
    # decision must be the same everywhere, so a step is skipped if any worker overflowed.
    finite = check_finite(grads)
    everywhere = _hvd.allreduce(
        tf.cast(finite, tf.float32), op=_hvd.Min, name="lars_tf_gradients_finite"
    )
    return everywhere > 0.5


def distribute_optimizer(
    optimizer: keras.optimizers.Optimizer, compression: str | None = None
) -> keras.optimizers.Optimizer:
    """Make `optimizer` average its gradients across workers once per update.

    The optimizer is changed in place and returned; its class, `get_config()` and checkpointed
    variables are untouched (the averaging is an instance-level override of the step that
    Keras runs once per update, see `_allreduce_then_clip`), so a distributed LARS serializes,
    checkpoints and restores exactly like a single-process one. A
    `keras.optimizers.LossScaleOptimizer` (added by `compile()` under "mixed_float16") is
    handled too: its inner optimizer averages the unscaled gradients, and its finiteness
    decision is agreed across workers. Call it after `compile()` and before the first `fit()`
    (the train step is traced once). In a single process it returns `optimizer` unchanged.

    Args:
        optimizer: A Keras 3 optimizer, possibly a `LossScaleOptimizer`.
        compression: "fp16" to all-reduce float gradients as float16, scaled per tensor so
            that small gradients survive (see `allreduce_gradients`), or None / "none".

    Returns:
        `optimizer` itself.
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            f"`optimizer` must be a keras.optimizers.Optimizer. Received: {optimizer!r}"
        )
    _compression_name(compression)  # validate before touching the optimizer
    hvd = _horovod()
    if hvd is None or hvd.size() == 1:
        return optimizer
    if getattr(optimizer, "_lars_tf_distributed", False):
        return optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        distribute_optimizer(optimizer.inner_optimizer, compression)
        keras_internals.override_instance_method(optimizer, "check_finite", _agreed_check_finite)
    else:
        keras_internals.override_instance_method(
            optimizer, "_clip_gradients", _allreduce_then_clip(compression)
        )
    _set(optimizer, "_lars_tf_distributed", True)
    return optimizer


def _set(obj: Any, name: str, value: Any) -> None:
    # Plain attribute, bypassing Keras' variable tracker and TF's dependency tracking: a marker
    # is neither state to checkpoint nor configuration to serialize.
    object.__setattr__(obj, name, value)


def broadcast_variables(variables: Sequence[Any], root_rank: int = 0) -> None:
    """Overwrite `variables` on every worker with their values on `root_rank`.

    Args:
        variables: Keras 3 or TensorFlow variables, in the same order on every worker.
        root_rank: The worker whose values are kept.
    """
    hvd = _horovod()
    if hvd is None or hvd.size() == 1 or not variables:
        return
    # Horovod needs the backing tf.Variable: a Keras 3 variable has no `.assign` it can use.
    backing = [v.value if isinstance(v, keras.Variable) else v for v in variables]
    hvd.broadcast_variables(backing, root_rank=root_rank)


def broadcast_model_and_optimizer(
    model: keras.Model, optimizer: keras.optimizers.Optimizer | None = None, root_rank: int = 0
) -> None:
    """Give every worker rank 0's model weights and optimizer state.

    Run it once the weights exist (after building the model and after rank 0 restored a
    checkpoint): workers initialize their weights independently, and an optimizer whose slots
    differ would drift the replicas apart even with averaged gradients. The optimizer is built
    on `model.trainable_variables` first if needed, so its slots exist to be broadcast.
    Random-seed state (dropout) is not broadcast: each worker keeps its own masks (see
    `broadcast_seed_draws` for a restore).

    Args:
        model: A built Keras model.
        optimizer: Its optimizer (`model.optimizer` when None and the model is compiled).
        root_rank: The worker whose state is kept.
    """
    optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    variables = list(model.weights)
    if optimizer is not None:
        variables += list(optimizer.variables)
    broadcast_variables(variables, root_rank=root_rank)


def broadcast_seed_draws(model: keras.Model, root_rank: int = 0) -> None:
    """Give every worker's random-seed state (dropout's seed generators, the model's
    variables that are not weights) rank `root_rank`'s count of draws, keeping its own seed.

    Workers draw their own masks (`--seed` + rank) as many times each; after a restore only
    rank 0 holds the count, and without it the others would draw their first run's masks
    again. A fresh run is unchanged: every count is 0.
    """
    states = keras_internals.random_states(model)
    if not states or size() == 1:
        return
    for variable in states:
        if tuple(variable.shape) != (2,) or not variable.path.endswith("seed_generator_state"):
            raise ValueError(
                f"{variable.path}: a model variable that is neither a weight nor a seed "
                "generator's state; lars_tf does not know how to resume it on every worker"
            )
    own = [keras.ops.convert_to_numpy(v) for v in states]
    broadcast_variables(states, root_rank=root_rank)
    for variable, mine in zip(states, own, strict=True):
        root = keras.ops.convert_to_numpy(variable)
        variable.assign(np.asarray(keras_internals.with_draws_of(mine, root), dtype=mine.dtype))


def broadcast_object(obj: Any, root_rank: int = 0) -> Any:
    """Rank `root_rank`'s value of a picklable Python object, on every worker."""
    hvd = _horovod()
    if hvd is None or hvd.size() == 1:
        return obj
    return hvd.broadcast_object(obj, root_rank=root_rank, name="lars_tf_object")


def run_on_root(function: Callable[[], Any], what: str) -> Any:
    """`function()` on rank 0, its result or its failure on every Horovod worker (see
    `lars_tf.engines.base.run_on_root`; the first worker to exit makes `horovodrun`
    terminate the rest)."""
    hvd = _horovod()
    if hvd is None or hvd.size() == 1:
        return function()
    return engine_base.run_on_root(
        function,
        what,
        rank=hvd.rank(),
        broadcast_object=lambda value: hvd.broadcast_object(value, 0, name="lars_tf_outcome"),
        barrier=lambda: allreduce_max(0.0, name="lars_tf_outcome_printed"),
    )


def allreduce_max(value: float, name: str = "lars_tf_max") -> float:
    """The largest of each worker's `value`: e.g. "did any worker see a NaN or a SIGTERM"."""
    hvd = _horovod()
    if hvd is None or hvd.size() == 1:
        return float(value)
    return float(hvd.allreduce(tf.constant(float(value), tf.float64), op=hvd.Max, name=name))


def allreduce_sum(values: Any, name: str = "lars_tf_sum") -> np.ndarray:
    """The element-wise sum over workers of a float array (float64 on the wire)."""
    values = np.asarray(values, np.float64)
    hvd = _horovod()
    if hvd is None or hvd.size() == 1:
        return values
    return hvd.allreduce(tf.constant(values), op=hvd.Sum, name=name).numpy()


def average_logs(logs: Mapping[str, Any], name: str = "lars_tf_logs") -> dict[str, Any]:
    """Average the numeric values of a Keras logs dict across workers.

    Every worker must pass the same keys (it does: they run the same model and metrics). Each
    worker's value is one mean over its own shard of equal size, so the average of the workers'
    values is the job's value. Non-numeric entries are returned unchanged.

    Args:
        logs: `{name: number}`, e.g. the logs of `on_epoch_end` or `evaluate(return_dict=True)`.
        name: The all-reduce's name, distinct for concurrent calls.

    Returns:
        A new dict with the averaged values as Python floats.
    """
    result = dict(logs)
    hvd = _horovod()
    if hvd is None or hvd.size() == 1:
        return result
    keys = sorted(k for k, v in logs.items() if _is_number(v))
    if not keys:
        return result
    values = tf.constant([float(logs[k]) for k in keys], tf.float64)
    averaged = hvd.allreduce(values, op=hvd.Average, name=name).numpy()
    result.update({k: float(v) for k, v in zip(keys, averaged, strict=True)})
    return result


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return getattr(value, "ndim", 0) == 0


def average_model_state(model: keras.Model) -> None:
    """Average the model's non-trainable float weights (batch-norm moving statistics).

    Gradients keep the trainable weights identical on every worker, but each worker updates its
    batch-norm moving mean and variance from its own shard. Averaging them (as timm's
    `distribute_bn` does) before evaluating and checkpointing makes every worker hold the same
    model, with statistics estimated from the whole global batch.
    """
    hvd = _horovod()
    if hvd is None or hvd.size() == 1:
        return
    variables = [
        v
        for v in model.non_trainable_weights
        if keras.backend.standardize_dtype(v.dtype).startswith(("float", "bfloat"))
    ]
    if not variables:
        return
    averaged = hvd.grouped_allreduce(
        [tf.convert_to_tensor(v.value) for v in variables],
        op=hvd.Average,
        name="lars_tf_model_state",
    )
    for variable, value in zip(variables, averaged, strict=True):
        variable.assign(value)


def replica_mismatches(variables: Sequence[Any]) -> list[str]:
    """Variables whose value differs between workers, by path (empty when all agree).

    Each worker fingerprints its values (CRC-32 of the bytes) and compares them with rank 0's;
    every worker gets the same answer. A data-parallel job whose replicas differ is silently
    training N different models (the failure mode of Horovod's Keras 2 wrappers under Keras 3),
    so the Horovod engine (`lars_tf.engines.horovod`) checks this at the end of every run.

    Args:
        variables: Keras or TF variables, in the same order on every worker.
    """
    hvd = _horovod()
    if hvd is None or hvd.size() == 1:
        return []
    fingerprints = [zlib.crc32(np.ascontiguousarray(_numpy(v)).tobytes()) for v in variables]
    reference = hvd.broadcast_object(fingerprints, root_rank=0, name="lars_tf_fingerprints")
    differing = [i for i, (a, b) in enumerate(zip(fingerprints, reference, strict=True)) if a != b]
    everywhere = hvd.allgather_object(differing, name="lars_tf_fingerprint_mismatches")
    indices = sorted({i for found in everywhere for i in found})
    return [getattr(variables[i], "path", variables[i].name) for i in indices]


def _numpy(variable: Any) -> np.ndarray:
    value = variable.value if isinstance(variable, keras.Variable) else variable
    return value.numpy()


class MetricAverageCallback(progress.EpochLogAverage):
    """`lars_tf.progress.EpochLogAverage` over Horovod's workers, for a `model.fit` of one's
    own (Horovod's own `MetricAverageCallback` is broken under Keras 3). Put it first in the
    callback list, so that the ones after it see the averages."""

    def __init__(self):
        super().__init__(average_logs)
