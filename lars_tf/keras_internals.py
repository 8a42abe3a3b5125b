"""Every use of Keras' private API in lars_tf, in one place.

Keras 3 gives an optimizer subclass no public way to change how the learning rate is read or
how the per-variable updates are driven, and a Keras variable holds no reference to its
layer. lars_tf needs each of these, so it relies on a few private methods; they are named
only here. `HOOKS` lists them, and `tests/test_keras_internals.py` checks, per hook, that the
installed Keras still has it with the same parameters, failing with the hook's name and the
Keras version when a release changes it. The Keras range these were tested with is the one
`setup.cfg` requires.

- `OptimizerHooks` is the mixin through which `LARS` overrides Keras' private optimizer
  methods: each override forwards to a LARS method with its own name, so the optimizer's code
  reads without knowing Keras' internals.
- `update_each_variable`, `uses_weight_decay`, `variable_index`, `overwrites_with_gradient`,
  `learning_rate_value` call or read the base class's private members.
- `override_instance_method` replaces a method of one optimizer object (the Horovod layer's
  all-reduce before clipping, the agreed finiteness check under loss scaling).
- `flatten_layers` lists a layer's sublayers, nested ones included.
- `build_for_fit` builds a compiled model's metrics and loss from the input's spec, so that
  `fit` does not iterate the input once before training to learn its shapes (which draws a
  new shuffle order, and breaks an exact resume).
- `fit_under_multi_worker_mirrored` works around the two failures of Keras 3's `fit` under
  `MultiWorkerMirroredStrategy` (keras-team/keras#20585).
- `distribute_batch` lays a process's batch out as the global array a JAX step takes, as
  Keras' `fit` does (batch-norm re-estimation over several JAX processes).
- `random_states`, `with_draws_of` and `with_seed_offset` read and write a model's seed
  generators' `[seed, draws]` states.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any

import keras


@dataclasses.dataclass(frozen=True)
class Hook:
    """One private member of Keras that lars_tf relies on.

    Attributes:
        owner: Where it is defined: "optimizer" (`keras.optimizers.Optimizer`),
            "tf_optimizer" (the TensorFlow backend's optimizer base class, TensorFlow only),
            "loss_scale_optimizer" (`keras.optimizers.LossScaleOptimizer`), "layer"
            (`keras.layers.Layer`) or "model" (`keras.Model`).
        name: The member's name.
        parameters: Its parameters after `self`, or None for an attribute that is not called.
        why: What lars_tf uses it for.
    """

    owner: str
    name: str
    parameters: tuple[str, ...] | None
    why: str


HOOKS = (
    Hook(
        "optimizer",
        "_backend_update_step",
        ("grads", "trainable_variables", "learning_rate"),
        "LARS drives the per-variable updates itself (one XLA computation, one statistics "
        "write per update)",
    ),
    Hook(
        "tf_optimizer",
        "_distributed_tf_update_step",
        ("distribution", "grads_and_vars", "learning_rate"),
        "the one thread in which every replica's variables are updated under tf.distribute, "
        "where LARS collects its per-variable statistics",
    ),
    Hook(
        "optimizer",
        "_get_current_learning_rate",
        (),
        "LARS evaluates a schedule at the update counter, not the micro-batch counter",
    ),
    Hook("optimizer", "_learning_rate", None, "the schedule or variable given as learning_rate"),
    Hook(
        "optimizer",
        "_use_weight_decay",
        ("variable",),
        "honours Keras' exclude_from_weight_decay(var_list=...)",
    ),
    Hook(
        "optimizer",
        "_get_variable_index",
        ("variable",),
        "the slot (momentum buffer, statistics row) of a variable, as Keras' own optimizers do",
    ),
    Hook(
        "optimizer",
        "_overwrite_variable_with_gradient",
        ("variable",),
        "float8 scale variables are overwritten by Keras, not updated: no statistics row",
    ),
    Hook(
        "optimizer",
        "_clip_gradients",
        ("grads",),
        "runs once per update, after unscaling and before clipping: where Horovod averages",
    ),
    Hook(
        "loss_scale_optimizer",
        "check_finite",
        ("grads",),
        "the skip-the-step decision, agreed between Horovod workers",
    ),
    Hook(
        "layer",
        "_flatten_layers",
        ("include_self", "recursive"),
        "every sublayer of a model, nested ones included (batch-norm recalibration)",
    ),
    Hook(
        "tf_trainer",
        "_maybe_symbolic_build",
        ("iterator", "data_batch"),
        "under MultiWorkerMirroredStrategy it reduces a PerReplica batch and fails: replaced "
        "on the model, which is built from the input's spec instead",
    ),
    Hook(
        "tf_trainer_module",
        "reduce_per_replica",
        ("values", "strategy", "reduction"),
        "under MultiWorkerMirroredStrategy it reduces the step's logs along axis 0, which "
        "fails on scalars: wrapped to reduce every log element-wise along no axis",
    ),
    Hook(
        "tf_trainer_module",
        "_collective_all_reduce_multi_worker",
        ("strategy",),
        "tells reduce_per_replica's failing multi-worker case from the others",
    ),
    Hook(
        "jax_trainer_module",
        "_distribute_data",
        ("data", "layouts"),
        "a process's batch as the global array of the distribution, as fit feeds a JAX step "
        "(batch-norm re-estimation over several processes)",
    ),
    Hook(
        "model",
        "_symbolic_build",
        ("iterator", "data_batch"),
        "builds the compiled metrics from the input's spec: else the first fit on JAX or "
        "PyTorch iterates the input once to learn its shapes",
    ),
)


def hook_owner(owner: str) -> Any:
    """What `owner` names (see `Hook.owner`): a Keras class, or for "tf_trainer_module" and
    "jax_trainer_module" the TensorFlow or JAX backend's trainer module; None for a backend's
    own on other backends."""
    if owner == "optimizer":
        return keras.optimizers.Optimizer
    if owner == "loss_scale_optimizer":
        return keras.optimizers.LossScaleOptimizer
    if owner == "layer":
        return keras.layers.Layer
    if owner == "model":
        return keras.Model
    if owner in ("tf_optimizer", "tf_trainer", "tf_trainer_module"):
        if keras.backend.backend() != "tensorflow":
            return None
        from keras.src.backend.tensorflow import optimizer, trainer

        return {
            "tf_optimizer": optimizer.TFOptimizer,
            "tf_trainer": trainer.TensorFlowTrainer,
            "tf_trainer_module": trainer,
        }[owner]
    if owner == "jax_trainer_module":
        if keras.backend.backend() != "jax":
            return None
        from keras.src.backend.jax import trainer

        return trainer
    raise ValueError(f"unknown hook owner {owner!r}")


class OptimizerHooks:
    """Keras' private optimizer methods that `LARS` overrides, each forwarded to LARS.

    Put it before `keras.optimizers.Optimizer` in the bases. The forwarded-to methods are
    `_scheduled_learning_rate()`, `_update_all(grads, variables, learning_rate)` and
    `_tf_update_replicas(distribution, grads_and_vars, learning_rate)`.
    """

    def _get_current_learning_rate(self):
        return self._scheduled_learning_rate()

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        self._update_all(grads, trainable_variables, learning_rate)

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        # TensorFlow backend only: called once per update in cross-replica context (or
        # directly without a strategy), with the all-reduced gradients of every replica.
        self._tf_update_replicas(distribution, grads_and_vars, learning_rate)


def update_each_variable(optimizer: Any, grads: Any, variables: Any, learning_rate: Any) -> None:
    """The base class's update of every variable: `update_step` per variable. On TensorFlow
    this sums the gradients over the replicas of a `tf.distribute` strategy and calls
    `_distributed_tf_update_step` (see `OptimizerHooks`) in cross-replica context."""
    super(OptimizerHooks, optimizer)._backend_update_step(grads, variables, learning_rate)


def update_replicas(optimizer: Any, distribution: Any, grads_and_vars: Any, lr: Any) -> None:
    """The TensorFlow base class's `update_step` of every variable on every replica."""
    super(OptimizerHooks, optimizer)._distributed_tf_update_step(distribution, grads_and_vars, lr)


def base_learning_rate(optimizer: Any) -> Any:
    """The base class's current learning rate (a float's variable, or a schedule evaluated at
    its micro-batch counter)."""
    return super(OptimizerHooks, optimizer)._get_current_learning_rate()


def learning_rate_value(optimizer: keras.optimizers.Optimizer) -> Any:
    """What was given as `learning_rate`: a schedule, or the variable that holds a float."""
    return optimizer._learning_rate


def uses_weight_decay(optimizer: keras.optimizers.Optimizer, variable: Any) -> bool:
    """False for variables excluded with Keras' `exclude_from_weight_decay(var_list=...)`."""
    return optimizer._use_weight_decay(variable)


def variable_index(optimizer: keras.optimizers.Optimizer, variable: Any) -> int:
    """The position of `variable` among the variables the optimizer was built on."""
    return optimizer._get_variable_index(variable)


def overwrites_with_gradient(optimizer: keras.optimizers.Optimizer, variable: Any) -> bool:
    """Whether Keras overwrites `variable` with its gradient instead of updating it."""
    return optimizer._overwrite_variable_with_gradient(variable)


def override_instance_method(obj: Any, name: str, wrapper: Callable[..., Any]) -> None:
    """Make `obj.<name>(*args)` call `wrapper(original, *args)`, for the object `obj` alone.

    `original` is the class's method bound to `obj`. The attribute is set past Keras' tracker
    and TensorFlow's dependency tracking: a bound method is neither state to checkpoint nor
    configuration to serialize.
    """
    if name not in {hook.name for hook in HOOKS}:
        raise ValueError(f"{name!r} is not one of the Keras hooks listed in HOOKS")
    original = getattr(type(obj), name).__get__(obj)

    def method(self, *args):
        return wrapper(original, *args)

    object.__setattr__(obj, name, types.MethodType(method, obj))


def flatten_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """`layer` and every layer nested in it, depth first."""
    return list(layer._flatten_layers(include_self=True, recursive=True))


def build_for_fit(model: keras.Model, element_spec: Any) -> None:
    """Build `model`'s compiled loss and metrics (and the model) from `element_spec`, a
    dataset's `(images, labels)` spec, without reading the dataset; on JAX and PyTorch.

    There Keras' `fit` builds what is unbuilt from the first batch of its input and then
    starts a new iteration for training; iterating a dataset twice draws its
    `reshuffle_each_iteration` shuffle twice, so a resumed run (whose first `fit` starts at a
    later epoch) would train on another order than an uninterrupted one. TensorFlow's `fit`
    reads nothing early without a strategy, and under one reads a batch at every `fit` call
    whatever is built (so every segment alike): nothing to do there.
    """
    if keras.backend.backend() == "tensorflow":
        return
    model._symbolic_build(data_batch=_symbolic(element_spec))


def fit_under_multi_worker_mirrored(model: keras.Model, element_spec: Any) -> None:
    """Let Keras 3's `fit` train `model` under `MultiWorkerMirroredStrategy` (TensorFlow).

    Keras' `fit` fails there with Keras' own SGD too (keras-team/keras#20585), twice:

    1. `TensorFlowTrainer._maybe_symbolic_build` reads the first distributed batch and
       reduces it with `strategy.reduce("MEAN", batch, axis=None)` to learn its shapes,
       which the collective strategy cannot do ("Attempt to convert a value (PerReplica").
       Here the model, its loss, metrics and optimizer are built from `element_spec` (the
       dataset's `(images, labels)` spec) instead, now and whenever `fit` would have built.
    2. `reduce_per_replica` reduces the step's logs, scalars, with
       `strategy.reduce("MEAN", v, axis=0)` under a multi-worker strategy ("Invalid
       reduction dimension 0 for input with 0 dimensions"). The module's function is
       wrapped, once and for the whole process, to reduce there along no axis (the
       element-wise mean over the replicas, as Keras means on one worker); every other
       strategy and reduction goes to Keras' own.

    Call it after `compile`, before `fit`; `tests/test_strategies.py` checks that the result
    equals one device's and that without it Keras still fails.
    """
    from keras.src.backend.tensorflow import trainer

    def build(iterator=None, data_batch=None):
        # What is unbuilt (after a new `compile`, say) is built from the spec, not a batch.
        with model.distribute_strategy.scope():
            model._symbolic_build(data_batch=_symbolic(element_spec))

    build()
    object.__setattr__(model, "_maybe_symbolic_build", build)
    if getattr(trainer.reduce_per_replica, "_lars_tf_wrapped", False):
        return
    keras_reduce = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not trainer._collective_all_reduce_multi_worker(
            strategy
        ):
            return keras_reduce(values, strategy, reduction)
        # The element-wise mean over every replica of every worker, of a metric's value of
        # any shape: what one worker's `tf.reduce_mean(local_results, axis=0)` gives.
        return keras.tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)

    reduce_per_replica._lars_tf_wrapped = True
    trainer.reduce_per_replica = reduce_per_replica


def distribute_batch(data: Any) -> Any:
    """JAX: this process's NumPy batch `data` as the global array that the current
    `keras.distribution` lays out (each process contributes its rows), as Keras' `fit` feeds
    a step; without a distribution, on the default device."""
    from keras.src.backend.jax import trainer

    return trainer._distribute_data(data)


def _symbolic(element_spec: Any) -> Any:
    return keras.tree.map_structure(
        lambda spec: keras.KerasTensor(tuple(spec.shape), spec.dtype.name), element_spec
    )


def random_states(model: keras.Model) -> list:
    """The model's variables that are not weights: the states of its layers'
    `keras.random.SeedGenerator`s (dropout's), which Keras tracks in `model.variables` but not
    in `model.weights` (`tests/test_keras_internals.py` checks that nothing else is there)."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def with_draws_of(own_state: Any, other_state: Any) -> list:
    """A `keras.random.SeedGenerator` state with `own_state`'s seed and `other_state`'s count
    of draws.

    Keras keeps a generator's state as `[seed, draws]` (`SeedGenerator.next` adds `[0, 1]`,
    the layout `tests/test_keras_internals.py` checks). Horovod workers seed their dropout
    with `--seed` + rank, and only rank 0 restores a checkpoint: every worker takes rank 0's
    count and keeps its own seed, so that a resumed run draws the masks it would have drawn.
    """
    return [own_state[0], other_state[1]]


def with_seed_offset(state: Any, offset: int) -> list:
    """A `keras.random.SeedGenerator` state `[seed, draws]` with `offset` added to the seed
    and the draws kept: distinct masks per replica where a strategy starts every replica's
    generator with one state (`lars_tf.engines.tf_distribute`)."""
    return [state[0] + offset, state[1]]
