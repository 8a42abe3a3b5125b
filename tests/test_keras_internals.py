"""Each Keras private member lars_tf relies on still exists with the parameters it expects.

A failure names the hook, what lars_tf uses it for and the installed Keras version: the sign
that a Keras release changed an internal and `lars_tf/keras_internals.py` must follow it.
"""

from __future__ import annotations

import inspect

import keras
import pytest

from lars_tf import keras_internals
from lars_tf.optimizer import LARS


@pytest.mark.parametrize("hook", keras_internals.HOOKS, ids=lambda h: f"{h.owner}.{h.name}")
def test_hook_exists_with_its_parameters(hook):
    owner = keras_internals.hook_owner(hook.owner)
    if owner is None:
        pytest.skip(f"{hook.owner} belongs to another backend than this one")
    where = f"{owner.__name__}.{hook.name} (Keras {keras.__version__}; lars_tf: {hook.why})"
    if hook.parameters is None:  # an attribute set on instances
        optimizer = keras.optimizers.SGD(0.1)
        assert hasattr(optimizer, hook.name), f"{where} is gone"
        return
    member = inspect.getattr_static(owner, hook.name, None)
    assert member is not None, f"{where} is gone"
    parameters = tuple(inspect.signature(member).parameters)
    if not inspect.ismodule(owner):
        parameters = parameters[1:]  # after self
    assert parameters == hook.parameters, f"{where} now takes {parameters}, not {hook.parameters}"


def test_lars_overrides_go_through_the_hooks_module():
    """LARS defines no Keras private method itself: its overrides are the mixin's."""
    for name in (
        "_backend_update_step",
        "_get_current_learning_rate",
        "_distributed_tf_update_step",
    ):
        assert name not in vars(LARS), name
        assert name in vars(keras_internals.OptimizerHooks), name
        assert {h.name for h in keras_internals.HOOKS} >= {name}


def test_override_instance_method_refuses_unlisted_names():
    optimizer = keras.optimizers.SGD(0.1)
    with pytest.raises(ValueError, match="not one of the Keras hooks"):
        keras_internals.override_instance_method(optimizer, "apply", lambda original, g: None)
    calls = []

    def clip(original, grads):
        calls.append(len(grads))
        return original(grads)

    keras_internals.override_instance_method(optimizer, "_clip_gradients", clip)
    assert optimizer._clip_gradients([1.0, 2.0]) == [1.0, 2.0] and calls == [2]
    assert "_clip_gradients" not in keras.optimizers.SGD(0.1).__dict__


def test_flatten_layers_finds_nested_layers():
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="inner_dense")])
    outer = keras.Sequential([keras.Input((3,)), inner, keras.layers.Dense(1, name="head")])
    names = [layer.name for layer in keras_internals.flatten_layers(outer)]
    assert names[0] == outer.name and {"inner_dense", "head", inner.name} <= set(names)


def test_the_hooks_are_called_as_lars_relies_on():
    """Call semantics, not only signatures: once per update, after accumulation."""
    import numpy as np

    variables = [keras.Variable(np.ones((3, 2), "float32"), name="kernel")]
    grads = [keras.ops.ones((3, 2))]
    # Uncompiled, so that Python runs at every update (a compiled update is traced once).
    optimizer = LARS(0.1, gradient_accumulation_steps=2, jit_compile=False)
    clips, replica_updates = [], []

    def clip(original, g):
        clips.append(len(g))
        return original(g)

    keras_internals.override_instance_method(optimizer, "_clip_gradients", clip)
    if keras.backend.backend() == "tensorflow":
        original = optimizer._tf_update_replicas

        def count(*args):
            replica_updates.append(1)
            return original(*args)

        object.__setattr__(optimizer, "_tf_update_replicas", count)
    for _ in range(4):  # 4 micro-batches, 2 updates
        optimizer.apply(grads, variables)
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 2
    assert clips == [1, 1]  # once per update, on the accumulated gradients
    if keras.backend.backend() == "tensorflow":
        assert replica_updates == [1, 1]  # _distributed_tf_update_step: once per update
    # _get_current_learning_rate is what `learning_rate` reads (a float here).
    assert float(keras.ops.convert_to_numpy(optimizer.learning_rate)) == np.float32(0.1)


def test_seed_generator_state_is_the_seed_then_the_draws():
    # `with_draws_of` (Horovod's resume of each worker's dropout masks) and `with_seed_offset`
    # (tf.distribute's seed per replica) rely on this layout.
    generator = keras.random.SeedGenerator(seed=7)
    seed, draws = keras.ops.convert_to_numpy(generator.state)
    generator.next()
    generator.next()
    state = keras.ops.convert_to_numpy(generator.state)
    assert (state[0], state[1]) == (seed, draws + 2)
    assert keras_internals.with_draws_of([5, 0], state) == [5, draws + 2]
    assert keras_internals.with_seed_offset(state, 3) == [seed + 3, draws + 2]


@pytest.mark.parametrize("name", ["alexnet_bn_small", "alexnet_bn"])
def test_a_models_variables_beyond_its_weights_are_seed_generator_states(name):
    # `random_states`: what the checkpoint saves beside the model and what
    # `distributed.broadcast_seed_draws` resumes as [seed, draws] on every worker.
    from lars_tf import models

    size = models.default_image_size(name)
    model = models.build(name, num_classes=10, input_shape=(size, size, 3), width_multiplier=0.125)
    others = keras_internals.random_states(model)
    assert others, "the model has dropout: seed generators expected"
    for variable in others:
        assert tuple(variable.shape) == (2,) and variable.path.endswith("seed_generator_state")


def test_the_multi_worker_workaround_wraps_once_and_passes_other_cases_through(monkeypatch):
    # tests/test_strategies.py runs it on two real workers; here, in one process: a second
    # call does not wrap Keras' function again; under a multi-worker collective strategy the
    # "auto" and "mean" reductions become element-wise means along no axis, and every other
    # case (another strategy, another reduction) goes to Keras' own, which returns plain
    # tensors as they are.
    import numpy as np
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    spec = (tf.TensorSpec((4, 3), tf.float32), tf.TensorSpec((4, 2), tf.float32))
    keras_internals.fit_under_multi_worker_mirrored(model, spec)
    wrapped = trainer.reduce_per_replica
    keras_internals.fit_under_multi_worker_mirrored(model, spec)
    assert trainer.reduce_per_replica is wrapped and wrapped._lars_tf_wrapped

    class Strategy:
        def __init__(self):
            self.calls = []

        def reduce(self, op, value, axis="not given"):
            self.calls.append((op, tuple(value.shape), axis))
            return value

    logs = {"loss": tf.constant(0.5), "per_class": tf.constant([1.0, 2.0])}
    for multi_worker, reduction, expected_calls in (
        (True, "auto", [("MEAN", (), None), ("MEAN", (2,), None)]),
        (True, "mean", [("MEAN", (), None), ("MEAN", (2,), None)]),
        # Keras' own multi-worker sum, which passes no axis.
        (True, "sum", [("SUM", (), "not given"), ("SUM", (2,), "not given")]),
        (False, "auto", []),
    ):
        is_multi_worker = lambda strategy, answer=multi_worker: answer  # noqa: E731
        monkeypatch.setattr(trainer, "_collective_all_reduce_multi_worker", is_multi_worker)
        strategy = Strategy()
        reduced = wrapped(logs, strategy, reduction)
        assert sorted(strategy.calls) == expected_calls, (multi_worker, reduction)
        assert np.asarray(reduced["per_class"]).tolist() == [1.0, 2.0]
    monkeypatch.undo()
    # Built from the spec; `fit` no longer builds from a batch, and trains.
    assert model.built and model.optimizer.built
    model.fit(np.ones((4, 3), "float32"), np.ones((4, 2), "float32"), epochs=1, verbose=0)
