"""LARS, Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg 2017), as a Keras 3 optimizer.

The math of one step lives in two pure functions, `local_learning_rate` and `lars_update`, that
take and return tensors; `LARS` is the Keras shell around them: it validates its arguments, makes
the per-variable slots once in `build`, decides per variable (at build time) whether it is decayed
and adapted, and writes the result with `self.assign`. The math is `keras.ops` only, so the
update runs eagerly, in a `tf.function` and under XLA alike, on any Keras backend. The one
backend-specific line is plumbing: on TensorFlow the update is compiled with XLA on its own
(`jit_compile=True`, as Keras 2's optimizers did), since Keras 3 runs TensorFlow train steps
without XLA on CPUs and there every `keras.ops` call would be a pass over the tensor of its own.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import numbers
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import keras
from keras import ops

from lars_tf import keras_internals

STATISTICS = ("local_lr", "weight_norm", "grad_norm")

_log = logging.getLogger(__name__)


# Large tensors are summed in blocks of 32 rows x 16 lanes first; see `_l2_norm`.
_NORM_BLOCK = (32, 16)
_NORM_MIN_SIZE = 8192


def _l2_norm(x: Any) -> Any:
    """`||x||`, in one pass over `x` under XLA too.

    XLA's CPU compiler rewrites a reduction over any dimension longer than 32 into a
    reduce-window over a materialised `x * x` (its tree-reduction pass), so the plain
    `sqrt(sum(square(x)))` reads `x`, writes and reads `x * x`: LARS then took 3.5x the time
    of SGD under XLA on ResNet-50 (`tools/bench.py`). Summing blocks of 32 x 16 first (a
    reduction over a dimension of 32, fused with the square) and the 32x smaller partial sums
    next keeps it one pass. `maximum(partial, 0)`, an identity on sums of squares, stops the
    algebraic simplifier from merging the two sums back into one. Without XLA both forms cost
    the same; small or oddly sized tensors take the plain form.
    """
    rows, lanes = _NORM_BLOCK
    shape = tuple(x.shape)
    size = math.prod(shape) if all(isinstance(d, int) for d in shape) else None
    if size is None or size < _NORM_MIN_SIZE or size % (rows * lanes):
        return ops.sqrt(ops.sum(ops.square(x)))
    blocks = ops.reshape(x, (size // (rows * lanes), rows, lanes))
    partial = ops.sum(ops.square(blocks), axis=1)
    return ops.sqrt(ops.sum(ops.maximum(partial, 0.0)))


def local_learning_rate(
    weight_norm: Any,
    grad_norm: Any,
    *,
    trust_coefficient: float,
    weight_decay: float = 0.0,
    epsilon: float = 0.0,
    decayed_grad_norm: Any = None,
    clip: bool = False,
) -> Any:
    """The local LR of one variable, eq. 6 of the paper, or one of its variants.

    ```
    paper (P):          local_lr = eta * ||w|| / (||g|| + beta * ||w|| + epsilon)
    folded (G):         local_lr = eta * ||w|| / (||g + beta * w|| + epsilon)
    either, when ||w|| == 0 or the norm in the denominator is 0:   local_lr = 1
    clipped (LARC):     local_lr = min(local_lr, 1)
    ```

    The zero-norm rule uses `ops.where` rather than a Python branch so that it traces into one
    graph (and compiles under XLA); the unused division is made safe so it never yields NaN.

    Args:
        weight_norm: `||w||`, a scalar tensor.
        grad_norm: `||g||`, a scalar tensor. Its zero test applies to rule P only.
        trust_coefficient: `eta`.
        weight_decay: `beta` (0 for a variable excluded from decay).
        epsilon: Added to the denominator.
        decayed_grad_norm: `||g + beta * w||`. When given, the rule is G (the decay is folded
            into the norm, as in TF Model Garden and optax) and `grad_norm` is not used.
        clip: Apply the clip `min(local_lr, 1)`.

    Returns:
        The local LR, a scalar tensor of `weight_norm`'s dtype.
    """
    if decayed_grad_norm is None:
        denominator_norm = grad_norm
        denominator = grad_norm + weight_decay * weight_norm + epsilon
    else:
        denominator_norm = decayed_grad_norm
        denominator = decayed_grad_norm + epsilon
    adaptable = ops.logical_and(ops.greater(weight_norm, 0.0), ops.greater(denominator_norm, 0.0))
    safe_denominator = ops.where(adaptable, denominator, ops.ones_like(denominator))
    ratio = ops.where(
        adaptable, trust_coefficient * weight_norm / safe_denominator, ops.ones_like(weight_norm)
    )
    if clip:
        ratio = ops.minimum(ratio, ops.ones_like(ratio))
    return ratio


def lars_update(
    direction: Any,
    velocity: Any,
    *,
    learning_rate: Any,
    local_lr: Any,
    momentum: float,
    nesterov: bool = False,
    lr_outside_momentum: bool = False,
) -> tuple[Any, Any]:
    """One momentum step on the decayed gradient `direction = g + beta * w`.

    ```
    LR inside the momentum (paper, P):     v = m * v + gamma * local_lr * direction
                                           w = w - v
                   with Nesterov:          w = w - (m * v + gamma * local_lr * direction)
    LR outside the momentum (P'):          v = m * v + local_lr * direction
                                           w = w - gamma * v
                   with Nesterov:          w = w - gamma * (m * v + local_lr * direction)
    ```

    Nesterov is Keras SGD's form (`w += m * v_new - lr * g` with `v` sign-flipped), applied to
    the scaled step. With `momentum == 0` there is no buffer and `w = w - gamma * local_lr *
    direction` in both placements.

    Args:
        direction: `g + beta * w`, already in the compute dtype.
        velocity: The current momentum buffer `v` (compute dtype), or None when `momentum == 0`.
        learning_rate: `gamma_t`, a scalar tensor.
        local_lr: The local LR, a scalar tensor.
        momentum: `m`.
        nesterov: Use Nesterov momentum.
        lr_outside_momentum: Keep `gamma_t` out of the buffer (P'): a change of the global LR
            then rescales the whole history instead of new contributions only.

    Returns:
        `(update, new_velocity)`: the new weights are `w - update`; `new_velocity` is None
        when `velocity` is None.
    """
    # The scalar product first: one multiply over the tensor instead of two.
    scale = local_lr if lr_outside_momentum else learning_rate * local_lr
    step = direction * scale
    if velocity is None:
        update = step
        new_velocity = None
    else:
        new_velocity = velocity * momentum + step
        update = new_velocity * momentum + step if nesterov else new_velocity
    if lr_outside_momentum:
        update = update * learning_rate
    return update, new_velocity


# Keras' normalization layers, by name (some exist in newer Keras releases only).
_NORMALIZATION_LAYERS = tuple(
    cls
    for name in (
        "BatchNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "RMSNormalization",
        "UnitNormalization",
    )
    if (cls := getattr(keras.layers, name, None)) is not None
)


def normalization_variable_ids() -> set[int]:
    """`id()` of every variable of a normalization layer alive in this process.

    A Keras variable holds no reference to its layer, and neither its name ("gamma" is also
    ConvNeXt's layer scale) nor its rank (rank 1 is also a layer scale or a learned
    temperature) says that it belongs to one. Layers do hold their variables, so the owners
    are found from the layers' side: the live objects of Keras' normalization classes (and
    their subclasses). One pass over the interpreter's objects when an optimizer is built
    (about 0.25 s with 400,000 objects). Objects moved to the permanent generation by
    `gc.freeze()` are invisible to that pass, so it unfreezes them for the pass and freezes
    everything again afterwards (freezing only matters to forked workers' copy-on-write).
    """
    frozen = gc.get_freeze_count()
    if frozen:
        gc.unfreeze()
    try:
        ids: set[int] = set()
        for obj in gc.get_objects():
            # `type()`, not `isinstance()`: the latter reads `__class__`, which some modules'
            # objects turn into a property with a warning.
            if issubclass(type(obj), _NORMALIZATION_LAYERS):
                ids.update(id(v) for v in obj.weights)
    finally:
        if frozen:
            gc.freeze()
    return ids


# The names Keras' and most libraries' normalization layers give their scale and offset.
_NORMALIZATION_NAMES = ("gamma", "beta", "scale", "offset")


def _warn_of_lookalikes(variables: Sequence[Any], excluded: Sequence[bool]) -> None:
    # A normalization layer of another library (not a subclass of Keras' own) is not
    # recognised: say which variables look like one's and are adapted all the same.
    lookalikes = [
        getattr(v, "path", v.name)
        for v, out in zip(variables, excluded, strict=True)
        if not out and len(v.shape) == 1 and v.name in _NORMALIZATION_NAMES
    ]
    if lookalikes:
        _log.warning(
            "exclude_bn_and_bias: %d rank-1 variable(s) named like a normalization layer's "
            "belong to no Keras normalization layer, so LARS adapts and decays them; exclude "
            "them by pattern if they are a normalization: %s",
            len(lookalikes),
            ", ".join(lookalikes[:10]),
        )


def _is_bias(variable: Any) -> bool:
    # Keras names the bias of every layer that has one (Dense, EinsumDense, the convolutions)
    # "bias"; a normalization layer's offset is "beta" and is caught by its layer instead.
    return variable.name == "bias"


def _validate_patterns(patterns: Sequence[str] | None, argument: str) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str) or not isinstance(patterns, Sequence):
        raise ValueError(
            f"`{argument}` must be None or a list of regular expressions (strings). "
            f"Received: {argument}={patterns!r}"
        )
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(
                f"`{argument}` must contain strings only. Received the element {pattern!r}"
            )
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"`{argument}` holds {pattern!r}, which is not a valid regular expression: {error}"
            ) from error
    return list(patterns)


def _matches(patterns: Sequence[str] | None, variable: Any) -> bool:
    # Searched in the path ("conv1/kernel") and in the name ("kernel"), so that both a
    # substring of the path and an anchored name ("^kernel$") work, for LARS's own patterns
    # and for Keras' `exclude_from_weight_decay(var_names=...)` alike.
    if not patterns:
        return False
    names = {getattr(variable, "path", variable.name), variable.name}
    return any(re.search(pattern, name) for pattern in patterns for name in names)


def _number(value: Any, argument: str, *, minimum: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{argument}` must be a finite number. Received: {argument}={value!r}")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"`{argument}` must be {relation} {minimum}. Received: {argument}={value}")
    return float(value)


@keras.saving.register_keras_serializable(package="lars_tf")
class LARS(keras_internals.OptimizerHooks, keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling (LARS), the rule of You, Gitman and Ginsburg (2017).

    Each variable (one "layer": a kernel and its bias each count as one) gets its own local
    learning rate from the ratio of its weight norm to its gradient norm:

    ```
    local_lr = eta * ||w|| / (||g|| + beta * ||w|| + epsilon)     # eq. 6; 1 if ||w|| or ||g|| is 0
    v        = m * v + gamma_t * local_lr * (g + beta * w)        # Algorithm 1
    w        = w - v
    ```

    Symbols and arguments: `gamma_t` is `learning_rate` (a float or a schedule, evaluated at
    every step), `m` is `momentum`, `beta` is `weight_decay`, `eta` is `trust_coefficient`,
    `epsilon` is `epsilon`. Norms are L2 norms over the whole variable, computed in float32
    (float64 for float64 variables) whatever the variable's dtype.

    The defaults give the paper's rule exactly. Weight decay is coupled: it is added to the
    gradient and enters the local LR's denominator; the Keras base class's decoupled decay is
    never used (its `weight_decay` is None; beta is `coupled_weight_decay`). The global LR sits
    inside the momentum buffer, so a schedule change only affects new contributions.

    Options for the variants found in other libraries (all off by default):

    - `decay_in_norm` (G, TF Model Garden / optax / SimCLR): `local_lr = eta * ||w|| /
      (||g + beta * w|| + epsilon)`, and 1 when `||w||` or `||g + beta * w||` is 0.
    - `lr_outside_momentum` (P', timm / Apex LARC / torchlars): `v = m * v + local_lr *
      (g + beta * w)`, `w = w - gamma_t * v`.
    - `clip_local_lr` (LARC clipping): `local_lr = min(local_lr, 1)`, so the effective LR of a
      variable never exceeds the global one. (Apex's `LARC(clip=True)` instead takes
      `min(eta * ratio, gamma_t)` as the effective LR, a different threshold.)
    - `nesterov`: `w = w - (m * v + gamma_t * local_lr * (g + beta * w))` with `v` already
      updated (Keras SGD's form); with `lr_outside_momentum`, `w = w - gamma_t * (m * v +
      local_lr * (g + beta * w))`.

    Exclusions are decided once per variable when the optimizer is built. A pattern is a
    regular expression searched (`re.search`, so a plain substring such as `"bias"` works) in
    the variable's `path` (e.g. `"conv1/kernel"`) and in its `name` (`"kernel"`, so `"^kernel$"`
    works too); patterns given to Keras' method `exclude_from_weight_decay(var_names=...)` mean
    the same (Keras' own optimizers search the name only), and its `var_list=` (variable
    objects) is honoured too, if called before the optimizer is built. A variable excluded
    from weight decay gets `beta = 0`, in the update and in the local LR; one excluded from
    layer adaptation gets `local_lr = 1` (plain momentum SGD on it).
    `exclude_bn_and_bias=True` excludes from both, as MLPerf's ResNet-50 LARS does, exactly
    the biases (the variables Keras' layers name `bias`) and the variables of normalization
    layers (`BatchNormalization`, `LayerNormalization`, `GroupNormalization`,
    `RMSNormalization` and their subclasses), whatever their names; other rank-1 variables,
    such as ConvNeXt's layer scale, are adapted and decayed. Each variable's layer is found
    when the optimizer is built, among the layers alive then (see
    `normalization_variable_ids`).

    For logging, `layer_statistics()` returns, per variable, the local LR, `||w||` and `||g||`
    computed in the last update (with the gradient as LARS saw it: after loss-scale unscaling,
    gradient accumulation, Horovod's all-reduce and clipping; under a tf.distribute strategy
    Keras clips each replica's share before it sums them), written during the update into one
    `(variables, 3)` optimizer variable (one write per update, not three per variable).

    Speed: on the TensorFlow backend the whole update (every variable) is one XLA computation
    when `jit_compile=True` (the default), whether or not the train step itself is compiled,
    except under a tf.distribute strategy, where it runs op by op (the update of each replica
    is issued from the cross-replica context, which XLA cannot compile as one computation):
    the norms and the momentum step then take less time than Keras' SGD update without XLA
    (`docs/benchmarks.md`). The numbers differ from the uncompiled update only by rounding.

    Example:

    ```python
    optimizer = LARS(learning_rate=schedule, momentum=0.9, weight_decay=5e-4,
                     trust_coefficient=0.001, exclude_bn_and_bias=True)
    model.compile(optimizer=optimizer, loss=loss)
    ```

    Args:
        learning_rate: `gamma_t`: a float >= 0, a
            `keras.optimizers.schedules.LearningRateSchedule`, or a zero-argument callable.
        momentum: `m`, in [0, 1]. 0 keeps no momentum buffer.
        weight_decay: `beta` >= 0, coupled as above. None means 0.
        trust_coefficient: `eta` > 0 (0.001 in every experiment of the paper).
        epsilon: >= 0, added to the local LR's denominator.
        nesterov: Use Nesterov momentum.
        exclude_from_weight_decay: Patterns of variables that get `beta = 0`.
        exclude_from_layer_adaptation: Patterns of variables that get `local_lr = 1`.
        exclude_bn_and_bias: Exclude biases and normalization layers' variables from decay
            and adaptation.
        decay_in_norm: Use rule G's local LR (decay folded into the gradient norm).
        lr_outside_momentum: Use rule P' (global LR applied outside the momentum buffer).
        clip_local_lr: Clip the local LR at 1 (LARC clipping).
        jit_compile: On the TensorFlow backend, compile the update with XLA (see Speed). It is
            not compiled under a `tf.distribute` strategy (Horovod is not one) or on other
            backends (JAX compiles the whole step anyway).
        name: The optimizer's name, which prefixes its variables.
        **kwargs: The Keras base optimizer's keywords (`clipnorm`, `global_clipnorm`,
            `clipvalue`, `use_ema`, `ema_momentum`, `ema_overwrite_frequency`,
            `loss_scale_factor`, `gradient_accumulation_steps`).

    Reference:
        Y. You, I. Gitman, B. Ginsburg, "Large Batch Training of Convolutional Networks",
        arXiv:1708.03888, 2017.
    """

    def __init__(
        self,
        learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 0.1,
        momentum: float = 0.9,
        weight_decay: float | None = 0.0,
        trust_coefficient: float = 0.001,
        epsilon: float = 0.0,
        nesterov: bool = False,
        exclude_from_weight_decay: Sequence[str] | None = None,
        exclude_from_layer_adaptation: Sequence[str] | None = None,
        exclude_bn_and_bias: bool = False,
        decay_in_norm: bool = False,
        lr_outside_momentum: bool = False,
        clip_local_lr: bool = False,
        jit_compile: bool = True,
        name: str = "lars",
        **kwargs: Any,
    ):
        if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
            # The base class accepts floats only; `LARS(learning_rate=10)` is a natural call.
            learning_rate = _number(learning_rate, "learning_rate", minimum=0.0)
        # weight_decay=None: Keras' decoupled decay must never run; LARS applies beta itself,
        # coupled (eq. 6), or decay would be applied twice.
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        self.momentum = _number(momentum, "momentum", minimum=0.0)
        if self.momentum > 1.0:
            raise ValueError(f"`momentum` must be <= 1. Received: momentum={momentum}")
        self.coupled_weight_decay = _number(
            0.0 if weight_decay is None else weight_decay, "weight_decay", minimum=0.0
        )
        self.trust_coefficient = _number(
            trust_coefficient, "trust_coefficient", minimum=0.0, strict=True
        )
        self.epsilon = _number(epsilon, "epsilon", minimum=0.0)
        for argument, value in (
            ("nesterov", nesterov),
            ("exclude_bn_and_bias", exclude_bn_and_bias),
            ("decay_in_norm", decay_in_norm),
            ("lr_outside_momentum", lr_outside_momentum),
            ("clip_local_lr", clip_local_lr),
            ("jit_compile", jit_compile),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"`{argument}` must be a bool. Received: {argument}={value!r}")
        self.nesterov = nesterov
        self.exclude_bn_and_bias = exclude_bn_and_bias
        self.decay_in_norm = decay_in_norm
        self.lr_outside_momentum = lr_outside_momentum
        self.clip_local_lr = clip_local_lr
        self.jit_compile = jit_compile
        # Compiled updates by trainable-variable list, and the statistics of the update being
        # traced, per thread (tf.distribute may run the update in each replica's thread);
        # plain attributes (see `_set_plain`), not state to track or checkpoint.
        _set_plain(self, "_xla_updates", {})
        _set_plain(self, "_collecting", threading.local())
        # Private names: `exclude_from_weight_decay` is also a method of the base class.
        self._weight_decay_exclusions = _validate_patterns(
            exclude_from_weight_decay, "exclude_from_weight_decay"
        )
        self._adaptation_exclusions = _validate_patterns(
            exclude_from_layer_adaptation, "exclude_from_layer_adaptation"
        )

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Keras' method: exclude variables (objects or name patterns) from weight decay.

        `var_names` are patterns with the same meaning as the constructor's
        `exclude_from_weight_decay` (searched in the path and the name; Keras' own optimizers
        search the name only) and are added to them. Must be called before the optimizer is
        built, since exclusions are decided at build time.
        """
        if self.built:
            raise ValueError(
                "`exclude_from_weight_decay()` must be called before the optimizer is built."
            )
        if var_names is not None:
            patterns = _validate_patterns(var_names, "var_names") or []
            self._weight_decay_exclusions = (self._weight_decay_exclusions or []) + patterns
        if var_list is not None:
            super().exclude_from_weight_decay(var_list=var_list)

    def _decays(self, variable: Any, bn_or_bias: bool) -> bool:
        if bn_or_bias or _matches(self._weight_decay_exclusions, variable):
            return False
        # The base class's record of `exclude_from_weight_decay(var_list=...)` calls.
        return keras_internals.uses_weight_decay(self, variable)

    def _adapts(self, variable: Any, bn_or_bias: bool) -> bool:
        return not bn_or_bias and not _matches(self._adaptation_exclusions, variable)

    def build(self, variables):
        """Create the momentum buffers and the per-variable statistics, and fix exclusions.

        Args:
            variables: The model's trainable variables.
        """
        if self.built:
            return
        super().build(variables)
        self.momentums = []
        if self.momentum != 0:
            self.momentums = self.add_optimizer_variables(variables, "momentum")
        normalization = normalization_variable_ids() if self.exclude_bn_and_bias else set()
        excluded = [
            self.exclude_bn_and_bias and (_is_bias(v) or id(v) in normalization) for v in variables
        ]
        if self.exclude_bn_and_bias:
            _warn_of_lookalikes(variables, excluded)
        self._apply_decay = [
            self.coupled_weight_decay > 0 and self._decays(v, bn_or_bias)
            for v, bn_or_bias in zip(variables, excluded, strict=True)
        ]
        self._apply_adaptation = [
            self._adapts(v, bn_or_bias) for v, bn_or_bias in zip(variables, excluded, strict=True)
        ]
        self._statistic_paths = [getattr(v, "path", v.name) for v in variables]
        self._has_statistics = [
            not keras_internals.overwrites_with_gradient(self, v) for v in variables
        ]
        # Row i: (local_lr, ||w||, ||g||) of variable i in the last update, zeros before it.
        self._statistics = self.add_variable(
            shape=(len(variables), len(STATISTICS)), dtype="float32", name="layer_statistics"
        )

    def _scheduled_learning_rate(self):
        # Keras evaluates a schedule at its micro-batch counter (`_iterations`), so with
        # `gradient_accumulation_steps=k` update u would get `schedule(u * k + k - 1)` and the
        # warm-up would end k times too early. LARS counts updates (`iterations`), as the
        # paper's schedules (and Caffe's `iter_size`) do.
        schedule = keras_internals.learning_rate_value(self)
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            return schedule(self.iterations)
        return keras_internals.base_learning_rate(self)

    def _update_all(self, grads, trainable_variables, learning_rate):
        # `update_step` of every variable, then their statistics in one write. On TensorFlow
        # the statistics are collected in `_tf_update_replicas`, which the base class calls in
        # the one thread that updates every replica; elsewhere the loop is single-threaded.
        if keras.backend.backend() != "tensorflow":
            with self._collecting_statistics():
                keras_internals.update_each_variable(
                    self, grads, trainable_variables, learning_rate
                )
            return
        if not self._compiles_update():
            keras_internals.update_each_variable(self, grads, trainable_variables, learning_rate)
            return
        import tensorflow as tf  # the backend is TensorFlow here

        key = tuple(id(v) for v in trainable_variables)
        if key not in self._xla_updates:
            variables = list(trainable_variables)
            self._xla_updates[key] = tf.function(
                lambda g, lr: keras_internals.update_each_variable(self, g, variables, lr),
                jit_compile=True,
                autograph=False,
            )
        # A Keras variable (a float learning rate) is no tf.function argument; its value is.
        self._xla_updates[key](list(grads), tf.identity(learning_rate))

    def _tf_update_replicas(self, distribution, grads_and_vars, learning_rate):
        # TensorFlow only, once per update. Under a strategy with merge calls (CPUs, and GPUs
        # without XLA) it runs in cross-replica context, in one thread, and updates every
        # replica's copy: each writes the same row (the gradients are all-reduced), and the
        # table assigned in cross-replica context reaches every replica's copy of the
        # statistics variable. Without merge calls (MirroredStrategy on GPUs with an XLA train
        # step) it runs in each replica's thread for that replica: the rows are per thread.
        with self._collecting_statistics():
            keras_internals.update_replicas(self, distribution, grads_and_vars, learning_rate)

    def _compiles_update(self) -> bool:
        if not self.jit_compile or keras.backend.backend() != "tensorflow":
            return False
        import tensorflow as tf

        return not tf.distribute.has_strategy()

    @contextlib.contextmanager
    def _collecting_statistics(self) -> Iterator[None]:
        # `update_step` of variable i puts its row at key i; one write of the table follows.
        self._collecting.rows = {}
        try:
            yield
            rows = self._collecting.rows
        finally:
            self._collecting.rows = None
        if len(rows) == len(self._statistic_paths):
            table = [rows[i] for i in range(len(rows))]
        else:  # a subset of the variables was updated: the others keep their rows
            previous = ops.convert_to_tensor(self._statistics)
            table = [rows[i] if i in rows else previous[i] for i in range(len(previous))]
        self.assign(self._statistics, ops.stack(table))

    def update_step(self, gradient, variable, learning_rate):
        """Apply one LARS step to `variable`."""
        index = keras_internals.variable_index(self, variable)
        # Norms of float16/bfloat16 variables overflow or lose precision: compute in float32.
        is_float64 = keras.backend.standardize_dtype(variable.dtype) == "float64"
        dtype = "float64" if is_float64 else "float32"
        weight = ops.cast(variable, dtype)
        gradient = ops.cast(ops.convert_to_tensor(gradient), dtype)
        learning_rate = ops.cast(learning_rate, dtype)

        weight_norm = _l2_norm(weight)
        grad_norm = _l2_norm(gradient)
        beta = self.coupled_weight_decay if self._apply_decay[index] else 0.0
        # Skip `0 * w` for undecayed variables so they follow plain SGD bit for bit.
        direction = gradient + beta * weight if beta else gradient
        if self._apply_adaptation[index]:
            local_lr = local_learning_rate(
                weight_norm,
                grad_norm,
                trust_coefficient=self.trust_coefficient,
                weight_decay=beta,
                epsilon=self.epsilon,
                decayed_grad_norm=_l2_norm(direction) if self.decay_in_norm else None,
                clip=self.clip_local_lr,
            )
        else:
            local_lr = ops.ones((), dtype=dtype)

        velocity_slot = self.momentums[index] if self.momentum != 0 else None
        update, new_velocity = lars_update(
            direction,
            None if velocity_slot is None else ops.cast(velocity_slot, dtype),
            learning_rate=learning_rate,
            local_lr=local_lr,
            momentum=self.momentum,
            nesterov=self.nesterov,
            lr_outside_momentum=self.lr_outside_momentum,
        )
        if velocity_slot is not None:
            self.assign(velocity_slot, new_velocity)
        self.assign_sub(variable, update)
        rows = getattr(self._collecting, "rows", None)
        if rows is not None:
            rows[index] = ops.cast(ops.stack([local_lr, weight_norm, grad_norm]), "float32")

    def layer_statistics(self) -> dict[str, dict[str, float]]:
        """The statistics of the last update, per trainable variable.

        Returns:
            `{variable.path: {"local_lr": x, "weight_norm": x, "grad_norm": x}}` with Python
            floats (read from the device in one copy): `weight_norm` is `||w||` before the
            update and `grad_norm` the `||g||` LARS used; `local_lr` is 1 for variables
            excluded from adaptation. All 0 before the first update; empty until the optimizer
            is built. `statistics_table()` gives the same values as one device tensor.
        """
        if not self.built:
            return {}
        paths, table = self.statistics_table()
        rows = ops.convert_to_numpy(table).tolist()
        return {
            path: dict(zip(STATISTICS, row, strict=True))
            for path, row in zip(paths, rows, strict=True)
        }

    def statistics_table(self) -> tuple[list[str], Any]:
        """`(paths, table)`: the variable paths and a `(len(paths), 3)` float32 tensor whose
        columns are `STATISTICS` (local LR, `||w||`, `||g||`) of the last update, for logging
        from the device without one read per variable. Needs a built optimizer."""
        rows = [i for i, tracked in enumerate(self._has_statistics) if tracked]
        paths = [self._statistic_paths[i] for i in rows]
        table = ops.convert_to_tensor(self._statistics)
        if len(rows) != len(self._statistic_paths):
            table = ops.take(table, rows, axis=0)
        return paths, table

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "weight_decay": self.coupled_weight_decay,
                "trust_coefficient": self.trust_coefficient,
                "epsilon": self.epsilon,
                "nesterov": self.nesterov,
                "exclude_from_weight_decay": _as_list(self._weight_decay_exclusions),
                "exclude_from_layer_adaptation": _as_list(self._adaptation_exclusions),
                "exclude_bn_and_bias": self.exclude_bn_and_bias,
                "decay_in_norm": self.decay_in_norm,
                "lr_outside_momentum": self.lr_outside_momentum,
                "clip_local_lr": self.clip_local_lr,
                "jit_compile": self.jit_compile,
            }
        )
        return config


def _as_list(patterns: Sequence[str] | None) -> list[str] | None:
    # The tracker wraps lists set as attributes; the config must hold plain JSON types.
    return None if patterns is None else [str(p) for p in patterns]


def _set_plain(obj: Any, name: str, value: Any) -> None:
    # Bypasses Keras' variable tracker and TF's dependency tracking: a cache of compiled
    # functions or tensors of a trace is neither state to checkpoint nor configuration.
    object.__setattr__(obj, name, value)
