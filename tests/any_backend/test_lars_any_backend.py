"""LARS on whichever Keras backend this process runs (`KERAS_BACKEND`), with `keras.ops` only.

The suite collects these under TensorFlow in-process; `tests/test_backends.py` runs this same
file in subprocesses under `KERAS_BACKEND=jax` (with two host devices) and `torch`, since a
process has one Keras backend. Set `LARS_TF_RESULTS` to a folder to have the `fit` result
written there as `<backend>.npz`, which `tests/test_backends.py` compares across backends.
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import pytest
from lars_reference import (
    ATOL,
    CASES,
    FIT_BATCH,
    FIT_STEPS,
    RTOL,
    STEPS,
    compile_for_fit,
    fit_data,
    fit_model,
    fit_optimizer,
    fit_weights,
    make_variables,
    problem,
    run_optimizer,
    weights_by_layer,
)

from lars_tf import LARS

BACKEND = keras.backend.backend()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_numpy_algorithm_1(case):
    """The float64 NumPy Algorithm 1, with a LR that changes every step, momentum, decay,
    Nesterov, exclusions and zero norms: weights and `layer_statistics()` at every step."""
    weights, gradients = problem()
    before = None
    if case.keras_method_exclusion:
        before = lambda opt: opt.exclude_from_weight_decay(var_names=case.keras_method_exclusion)
    got, got_statistics = run_optimizer(case.optimizer(), weights, gradients, before)
    want, want_statistics = case.reference(weights, gradients)
    for t in range(STEPS):
        for i in range(3):
            np.testing.assert_allclose(
                got[t][i], want[t][i], rtol=RTOL, atol=ATOL, err_msg=f"step {t}, variable {i}"
            )
            np.testing.assert_allclose(
                got_statistics[t][i], want_statistics[t][i], rtol=RTOL, atol=1e-9
            )


def test_fit_trains_with_statistics_and_exclusions():
    x, y = fit_data()
    model = compile_for_fit(fit_model(), fit_optimizer())
    history = model.fit(x, y, batch_size=FIT_BATCH, epochs=3, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 3 * FIT_STEPS
    statistics = model.optimizer.layer_statistics()
    assert sorted(statistics) == sorted(v.path for v in model.trainable_variables)
    for path, row in statistics.items():
        assert row["weight_norm"] > 0 and row["grad_norm"] > 0, (path, row)
        excluded = path.endswith(("bias", "gamma", "beta"))  # biases and the batch norm
        assert (row["local_lr"] == 1.0) == excluded, (path, row)
    results = os.environ.get("LARS_TF_RESULTS")
    if results:
        np.savez(Path(results) / f"{BACKEND}.npz", **fit_weights(epochs=2))


def test_keras_file_round_trip_continues_the_run(tmp_path):
    """Save after one epoch, load (optimizer state included), train one more: the same weights
    as two epochs without the interruption."""
    x, y = fit_data()
    uninterrupted = fit_weights(epochs=2)
    model = compile_for_fit(fit_model(), fit_optimizer())
    model.fit(x, y, batch_size=FIT_BATCH, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    assert isinstance(restored.optimizer, LARS)
    assert restored.optimizer.get_config() == model.optimizer.get_config()
    restored.fit(x, y, batch_size=FIT_BATCH, epochs=1, shuffle=False, verbose=0)
    got = weights_by_layer(restored)
    assert sorted(got) == sorted(uninterrupted)
    for path, value in uninterrupted.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-6, atol=1e-7, err_msg=path)


def _apply(optimizer, grads, variables):
    """`optimizer.apply`, or on JAX its stateless form as JAX's `fit` calls it: Keras'
    `LossScaleOptimizer.apply` cannot run statefully on JAX (a `cond` with side effects leaks
    a tracer, with Keras' own SGD too)."""
    grads = [keras.ops.convert_to_tensor(g) for g in grads]
    if BACKEND != "jax":
        optimizer.apply(grads, variables)
        return
    optimizer.build(variables)
    new_variables, new_state = optimizer.stateless_apply(
        [v.value for v in optimizer.variables], grads, [v.value for v in variables]
    )
    for variable, value in zip(variables, new_variables, strict=True):
        variable.assign(value)
    for variable, value in zip(optimizer.variables, new_state, strict=True):
        variable.assign(value)


def test_loss_scale_optimizer_unscales_before_the_norms_and_skips_nonfinite_steps():
    weights, gradients = problem(seed=3)
    variables = make_variables(weights)
    plain_variables = make_variables(weights)
    optimizer = keras.optimizers.LossScaleOptimizer(
        LARS(0.5, weight_decay=5e-4), initial_scale=1024.0
    )
    plain = LARS(0.5, weight_decay=5e-4)
    scale = 1024.0
    for grads in gradients[:3]:
        _apply(optimizer, [g * scale for g in grads], variables)
        _apply(plain, grads, plain_variables)
    for a, b in zip(variables, plain_variables, strict=True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), rtol=1e-6, atol=1e-8
        )
    ours, theirs = optimizer.inner_optimizer.layer_statistics(), plain.layer_statistics()
    for path in theirs:
        np.testing.assert_allclose(list(ours[path].values()), list(theirs[path].values()))
    before = [keras.ops.convert_to_numpy(v) for v in variables]
    bad = [np.full_like(g, np.inf) for g in gradients[3]]
    _apply(optimizer, bad, variables)
    for a, b in zip(variables, before, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), b)
    assert float(keras.ops.convert_to_numpy(optimizer.dynamic_scale)) == scale / 2


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution is implemented for JAX")
def test_jax_data_parallel_over_two_devices_equals_one_device():
    """`keras.distribution.DataParallel` shards the batch over two host devices; XLA's SPMD
    computation of the global batch (batch-norm statistics included) is the one-device one."""
    import jax

    if jax.device_count() < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=2")
    one_device = fit_weights(epochs=2)
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()[:2]))
    try:
        x, y = fit_data()
        model = compile_for_fit(fit_model(), fit_optimizer())
        model.fit(x, y, batch_size=FIT_BATCH, epochs=2, shuffle=False, verbose=0)
        distributed = weights_by_layer(model)
        # Really on two devices: the weights and LARS's state are replicated over both.
        for variable in (model.weights[0], model.optimizer.variables[-1]):
            assert len(variable.value.sharding.device_set) == 2, variable.path
    finally:
        keras.distribution.set_distribution(None)
    assert sorted(distributed) == sorted(one_device)
    for path, value in one_device.items():
        # Float32 rounding of sums split in two: a few ulps of each weight (up to ~7 here;
        # an ulp at 4-8 is 4.8e-7, and one machine measured 2.4e-6 there, i.e. 5 ulps).
        np.testing.assert_allclose(distributed[path], value, rtol=1e-6, atol=2e-6, err_msg=path)


def test_build_for_fit_keeps_fit_from_reading_the_input_first():
    """After `keras_internals.build_for_fit`, `fit` reads a tf.data input once (one shuffle
    draw, the one trained on). Without it Keras on JAX reads a first batch to build the
    compiled metrics, then iterates again: every element read twice. (On TensorFlow it does
    nothing and `fit` reads nothing early: this run passes trivially there.)"""
    tf = pytest.importorskip("tensorflow")
    from lars_tf import keras_internals

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    model.compile(
        optimizer=LARS(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    reads = []

    def record(x):
        reads.append(int(x))
        return x

    indices = tf.data.Dataset.range(4).map(lambda i: tf.py_function(record, [i], tf.int64))
    dataset = indices.map(
        lambda i: (tf.fill([2], tf.cast(i, tf.float32)), tf.cast(i % 3, tf.int32))
    ).batch(2, drop_remainder=True)
    dataset = dataset.map(lambda x, y: (tf.ensure_shape(x, [2, 2]), tf.ensure_shape(y, [2])))
    keras_internals.build_for_fit(model, dataset.element_spec)
    model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)
    assert sorted(reads) == [0, 1, 2, 3]
    assert np.isfinite(keras.ops.convert_to_numpy(model.layers[0].kernel)).all()


def test_batch_norm_recalibration_averages_batch_moments_exactly():
    """`lars_tf.batchnorm.recalibrate` on this backend (Keras' `stateless_call`, compiled
    with jax.jit on JAX): each moving statistic becomes the mean of the batches' moments."""
    tf = pytest.importorskip("tensorflow")
    from lars_tf import batchnorm

    rng = np.random.default_rng(0)
    features = (5.0 * rng.normal(size=(256, 8)) + 100.0).astype("float32")
    inputs = keras.Input((8,))
    x = keras.layers.BatchNormalization(momentum=0.9, name="bn1")(inputs)
    x = keras.layers.Dropout(0.5, seed=3)(keras.layers.Dense(4)(x))
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn2")(x))
    seeds = [keras.ops.convert_to_numpy(v) for v in model.variables if "seed" in v.path]
    batches = tf.data.Dataset.from_tensor_slices(features).batch(64)
    assert batchnorm.recalibrate(model, batches, num_batches=10) == 4  # the dataset ends first
    bn1 = model.get_layer("bn1")
    chunks = features.reshape(4, 64, 8)
    mean = keras.ops.convert_to_numpy(bn1.moving_mean)
    variance = keras.ops.convert_to_numpy(bn1.moving_variance)
    np.testing.assert_allclose(mean, chunks.mean(1).mean(0), rtol=1e-5)
    np.testing.assert_allclose(variance, chunks.var(1).mean(0), rtol=1e-4)
    assert bn1.momentum == 0.9
    assert np.abs(keras.ops.convert_to_numpy(model.get_layer("bn2").moving_mean)).max() > 0
    after = [keras.ops.convert_to_numpy(v) for v in model.variables if "seed" in v.path]
    assert seeds and all((a == b).all() for a, b in zip(after, seeds, strict=True))


def test_this_backends_keras_hooks_exist_with_their_parameters():
    """The private members lars_tf relies on in this backend's own modules (JAX's trainer's
    `_distribute_data`): tests/test_keras_internals.py runs under TensorFlow, where they skip."""
    import inspect

    from lars_tf import keras_internals

    checked = []
    for hook in keras_internals.HOOKS:
        owner = keras_internals.hook_owner(hook.owner)
        if owner is None or hook.parameters is None:
            continue
        member = inspect.getattr_static(owner, hook.name, None)
        assert member is not None, f"{hook.owner}.{hook.name} is gone (lars_tf: {hook.why})"
        parameters = tuple(inspect.signature(member).parameters)
        parameters = parameters if inspect.ismodule(owner) else parameters[1:]
        assert parameters == hook.parameters, (hook, parameters)
        checked.append(hook.owner)
    if keras.backend.backend() == "jax":
        assert "jax_trainer_module" in checked
