"""Tests of `lars_tf.optimizer.LARS` on the TensorFlow backend. The golden test against the
independent NumPy float64 Algorithm 1 of `lars_reference.py` is in `tests/any_backend/`, which
runs in-process under TensorFlow and in subprocesses under JAX and PyTorch.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from lars_reference import (
    ATOL,
    LEARNING_RATES,
    RTOL,
    STEPS,
    Case,
    ListSchedule,
    make_variables,
    problem,
    run_optimizer,
)

from lars_tf.optimizer import LARS, STATISTICS, local_learning_rate


def test_reference_grid_is_discriminating():
    """Each option changes the trajectory far beyond the tolerance, so the grid can fail."""
    weights, gradients = problem()

    def final(**changes):
        trajectory, _ = dataclasses.replace(Case(), **changes).reference(weights, gradients)
        return np.concatenate([x.ravel() for x in trajectory[-1]])

    base = final()
    scale = np.abs(base) * RTOL + ATOL
    for changes in (
        {"weight_decay": 0.0},
        {"momentum": 0.0},
        {"nesterov": True},
        {"epsilon": 1e-3},
        {"decay_in_norm": True},
        {"lr_outside_momentum": True},
        {"decay": [True, True, False]},
        {"adapt": [True, True, False]},
    ):
        assert np.max(np.abs(final(**changes) - base) / scale) > 100, changes
    # At eta = 0.001 no local LR of this problem exceeds 1; at 0.01 the clip binds.
    clip_base = final(trust_coefficient=0.01)
    clip_scale = np.abs(clip_base) * RTOL + ATOL
    clipped = final(trust_coefficient=0.01, clip_local_lr=True)
    assert np.max(np.abs(clipped - clip_base) / clip_scale) > 100


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("nesterov", [False, True])
def test_equals_sgd_when_nothing_is_adapted(momentum, nesterov):
    weights, gradients = problem(seed=1)
    lars = LARS(
        learning_rate=ListSchedule(LEARNING_RATES),
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=0.0,
        exclude_from_layer_adaptation=[".*"],
        # Bit for bit against Keras' SGD, which runs uncompiled; XLA may round differently
        # (fused multiply-adds), see test_xla_update_matches_the_uncompiled_one.
        jit_compile=False,
    )
    sgd = keras.optimizers.SGD(
        learning_rate=ListSchedule(LEARNING_RATES), momentum=momentum, nesterov=nesterov
    )
    lars_variables, sgd_variables = make_variables(weights), make_variables(weights)
    for t, grads in enumerate(gradients):
        lars.apply([tf.constant(g) for g in grads], lars_variables)
        sgd.apply([tf.constant(g) for g in grads], sgd_variables)
        for a, b in zip(lars_variables, sgd_variables, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=f"step {t}, {a.path}")
    assert all(float(s["local_lr"]) == 1.0 for s in lars.layer_statistics().values())


def test_xla_update_matches_the_uncompiled_one():
    # The default compiles the update with XLA on TensorFlow (one computation for every
    # variable); the numbers must be the uncompiled update's up to float32 rounding.
    weights, gradients = problem(seed=2)
    common = dict(learning_rate=ListSchedule(LEARNING_RATES), momentum=0.9, weight_decay=1e-3)
    compiled, plain = LARS(**common), LARS(**common, jit_compile=False)
    compiled_variables, plain_variables = make_variables(weights), make_variables(weights)
    for grads in gradients:
        compiled.apply([tf.constant(g) for g in grads], compiled_variables)
        plain.apply([tf.constant(g) for g in grads], plain_variables)
    assert len(compiled._xla_updates) == 1 and not plain._xla_updates
    for a, b in zip(compiled_variables, plain_variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7, err_msg=a.path)
    for path, stats in plain.layer_statistics().items():
        for name, value in stats.items():
            got = compiled.layer_statistics()[path][name]
            assert got == pytest.approx(value, rel=1e-5), (path, name)
    assert LARS.from_config(LARS(jit_compile=False).get_config()).jit_compile is False


# ---------------------------------------------------------------------------------------------
# The pure local-LR helper: zero norms, under XLA too.


@pytest.mark.parametrize("decay_in_norm", [False, True])
def test_local_lr_is_one_for_zero_norms_under_xla(decay_in_norm):
    @tf.function(jit_compile=True)
    def ratio(w_norm, g_norm):
        return local_learning_rate(
            w_norm,
            g_norm,
            trust_coefficient=0.001,
            epsilon=0.0,
            decayed_grad_norm=g_norm if decay_in_norm else None,
        )

    for w_norm, g_norm in ((0.0, 2.0), (3.0, 0.0), (0.0, 0.0)):
        assert float(ratio(tf.constant(w_norm), tf.constant(g_norm))) == 1.0
    assert float(ratio(tf.constant(3.0), tf.constant(2.0))) == pytest.approx(0.0015)


def test_float16_variables_get_float32_norms():
    # sum(w**2) = 9e6 overflows float16 (max 65504); the statistics must still be exact.
    variable = keras.Variable(np.full((30, 30), 100.0, np.float16), dtype="float16")
    optimizer = LARS(learning_rate=1.0, momentum=0.9)
    optimizer.apply([tf.fill((30, 30), tf.constant(0.5, tf.float16))], [variable])
    stats = optimizer.layer_statistics()[variable.path]
    assert float(stats["weight_norm"]) == pytest.approx(3000.0)
    assert float(stats["grad_norm"]) == pytest.approx(15.0)
    assert float(stats["local_lr"]) == pytest.approx(0.2)
    np.testing.assert_allclose(variable.numpy().astype(np.float64), 99.9, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Inside `fit`.


def small_model(seed=0, batch_norm=True, dtype=None):
    """conv -> batch norm (gamma, beta) -> dense head (kernel, bias).

    With batch norm the conv has no bias, as in ResNet: batch norm cancels a bias's gradient
    to rounding noise, which no norm test could use.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, use_bias=not batch_norm, name="conv", dtype=dtype)(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization(name="bn", dtype=dtype)(x)
    x = keras.layers.Flatten(dtype=dtype)(x)
    outputs = keras.layers.Dense(3, name="head", dtype=dtype)(x)
    return keras.Model(inputs, outputs)


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, 3, size=(n,)).astype(np.int32)
    return x, y


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def train(model, optimizer, x, y, batch_size=8, epochs=1, jit_compile=False):
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=jit_compile)
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    return [v.numpy() for v in model.trainable_variables]


def lars_for_fit(**kwargs):
    kwargs.setdefault("learning_rate", ListSchedule(LEARNING_RATES))
    kwargs.setdefault("weight_decay", 5e-4)
    return LARS(**kwargs)


def test_fit_with_jit_compile_matches_eager_graph():
    x, y = data()
    jitted = train(small_model(), lars_for_fit(), x, y, jit_compile=True)
    plain = train(small_model(), lars_for_fit(), x, y, jit_compile=False)
    for a, b in zip(jitted, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    initial = [v.numpy() for v in small_model().trainable_variables]
    assert not any(np.array_equal(a, b) for a, b in zip(jitted, initial, strict=True))


def test_fit_with_gradient_accumulation_sees_the_averaged_gradient():
    x, y = data(n=16)
    # Two micro-batches of 8 accumulated == one batch of 16: the mean of the two mean-loss
    # gradients is the gradient of the mean loss over 16. The LR is constant because Keras
    # evaluates schedules at the micro-step count. No batch norm: its batch statistics would
    # differ between micro-batches and the full batch.
    accumulated_model, single_model = small_model(batch_norm=False), small_model(batch_norm=False)
    accumulated_opt = lars_for_fit(learning_rate=3.0, gradient_accumulation_steps=2)
    single_opt = lars_for_fit(learning_rate=3.0)
    accumulated = train(accumulated_model, accumulated_opt, x, y, batch_size=8)
    single = train(single_model, single_opt, x, y, batch_size=16)
    for a, b in zip(accumulated, single, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for path, stats in single_opt.layer_statistics().items():
        got = accumulated_opt.layer_statistics()[path]
        for name in ("local_lr", "weight_norm", "grad_norm"):
            assert float(got[name]) == pytest.approx(float(stats[name]), rel=1e-5)
    assert int(accumulated_opt.iterations.numpy()) == 1


def test_fit_with_clipnorm_adapts_on_clipped_gradients():
    x, y = data(n=8)
    model = small_model()
    optimizer = lars_for_fit(clipnorm=1e-3)
    train(model, optimizer, x, y, batch_size=8)
    for path, stats in optimizer.layer_statistics().items():
        # Every gradient of this model is far above 1e-3, so LARS saw the clipped ones.
        assert float(stats["grad_norm"]) == pytest.approx(1e-3, rel=1e-4), path


def test_clipnorm_matches_reference_on_clipped_gradients():
    weights, gradients = problem(seed=2)
    clip = 2e-3
    clipped = [
        [g * min(1.0, clip / max(float(np.linalg.norm(g)), 1e-30)) for g in grads]
        for grads in gradients
    ]
    case = Case()
    optimizer = case.optimizer(clipnorm=clip)
    got, _ = run_optimizer(optimizer, weights, gradients)
    want, _ = case.reference(weights, clipped)
    for t in range(STEPS):
        for i in range(3):
            np.testing.assert_allclose(got[t][i], want[t][i], rtol=RTOL, atol=ATOL)


@pytest.fixture
def mixed_float16():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_mixed_float16_unscaled_float32_norms_and_skipped_nonfinite_step(mixed_float16):
    x, y = data(n=8)
    model = small_model()
    lars = lars_for_fit()
    model.compile(optimizer=lars, loss=LOSS)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)

    # The gradient LARS must see: the float32 one, unscaled. A float32 twin gives it within
    # float16 rounding; a scaled gradient would be 2**15 times larger.
    twin = small_model(dtype="float32")
    twin.set_weights(model.get_weights())
    with tf.GradientTape() as tape:
        loss = LOSS(y, twin(x, training=True))
    twin_grads = tape.gradient(loss, twin.trainable_variables)

    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    stats = lars.layer_statistics()
    for variable, grad in zip(twin.trainable_variables, twin_grads, strict=True):
        path = variable.path
        want = float(np.linalg.norm(grad.numpy()))
        assert float(stats[path]["grad_norm"]) == pytest.approx(want, rel=2e-2), path
    assert int(lars.iterations.numpy()) == 1

    before = [v.numpy() for v in model.trainable_variables]
    before_stats = {p: float(s["grad_norm"]) for p, s in stats.items()}
    scale = float(model.optimizer.dynamic_scale.numpy())
    bad_x = x.copy()
    bad_x[0, 0, 0, 0] = np.inf
    model.fit(bad_x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(before, model.trainable_variables, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    assert int(lars.iterations.numpy()) == 1
    assert {p: float(s["grad_norm"]) for p, s in stats.items()} == before_stats
    assert float(model.optimizer.dynamic_scale.numpy()) == scale / 2


# ---------------------------------------------------------------------------------------------
# Configuration, saving, checkpoints.


NON_DEFAULTS = dict(
    momentum=0.8,
    weight_decay=1e-4,
    trust_coefficient=0.02,
    epsilon=1e-9,
    nesterov=True,
    exclude_from_weight_decay=["bias", "bn/"],
    exclude_from_layer_adaptation=["^head/"],
    exclude_bn_and_bias=True,
    decay_in_norm=True,
    lr_outside_momentum=True,
    clip_local_lr=True,
    name="my_lars",
    clipnorm=2.0,
    gradient_accumulation_steps=3,
)


def test_config_round_trip_holds_every_argument():
    schedule = keras.optimizers.schedules.PolynomialDecay(
        10.0, 100, end_learning_rate=1e-4, power=2.0
    )
    optimizer = LARS(learning_rate=schedule, **NON_DEFAULTS)
    config = optimizer.get_config()
    for key, value in NON_DEFAULTS.items():
        assert config[key] == value, key
    # `from_config` deserializes the schedule in place, so hand it a copy.
    restored = LARS.from_config(dict(config))
    assert restored.get_config() == config
    assert restored.coupled_weight_decay == 1e-4
    assert restored._learning_rate.get_config() == schedule.get_config()
    # Through Keras' registry, as `.keras` files and `model.compile(optimizer=dict)` do.
    serialized = keras.saving.serialize_keras_object(optimizer)
    assert serialized["registered_name"] == "lars_tf>LARS"
    again = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(again, LARS) and again.get_config() == config
    assert (
        LARS.from_config(LARS(learning_rate=10).get_config()).get_config()["learning_rate"] == 10.0
    )


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"momentum": -0.1}, "momentum"),
        ({"momentum": 1.5}, "momentum"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"trust_coefficient": 0.0}, "trust_coefficient"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"nesterov": 1}, "nesterov"),
        ({"clip_local_lr": "yes"}, "clip_local_lr"),
        ({"exclude_from_weight_decay": "bias"}, "exclude_from_weight_decay"),
        ({"exclude_from_layer_adaptation": ["("]}, "exclude_from_layer_adaptation"),
    ],
)
def test_invalid_arguments_are_named(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        LARS(**kwargs)


def test_keras_exclusion_method_after_build_is_refused():
    optimizer = LARS(learning_rate=1.0)
    optimizer.build(make_variables(problem()[0]))
    with pytest.raises(ValueError, match="before the optimizer is built"):
        optimizer.exclude_from_weight_decay(var_names=["bias"])


def test_exclude_bn_and_bias_in_a_model():
    x, y = data(n=8)
    model = small_model()
    optimizer = lars_for_fit(exclude_bn_and_bias=True)
    train(model, optimizer, x, y)
    stats = optimizer.layer_statistics()
    assert set(stats) == {v.path for v in model.trainable_variables}
    for variable in model.trainable_variables:
        local_lr = float(stats[variable.path]["local_lr"])
        if variable.path.startswith("bn/") or variable.name == "bias":
            assert local_lr == 1.0, variable.path
        else:
            assert local_lr != 1.0, variable.path


def test_exclude_bn_and_bias_finds_layers_made_before_gc_freeze():
    """`gc.freeze()` (pre-fork servers, some data loaders) hides objects from `gc.get_objects`;
    the lookup must still see the batch norm, and leave the objects frozen."""
    import gc

    model = small_model()
    gc.freeze()
    try:
        optimizer = LARS(weight_decay=5e-4, exclude_bn_and_bias=True)
        optimizer.build(model.trainable_variables)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    for variable, adapts in zip(
        model.trainable_variables, optimizer._apply_adaptation, strict=True
    ):
        bn_or_bias = variable.path.startswith("bn/") or variable.name == "bias"
        assert adapts == (not bn_or_bias), variable.path


@pytest.mark.parametrize("application", ["ResNet50", "ConvNeXtTiny"])
def test_exclude_bn_and_bias_means_biases_and_normalization_layers(application, caplog):
    """On keras.applications models, exactly the biases and the variables of normalization
    layers are excluded, by their layer and not by rank: ConvNeXt's layer scales (rank 1,
    named "gamma", like a layer norm's) stay adapted and decayed."""
    model = getattr(keras.applications, application)(
        weights=None, include_top=False, input_shape=(32, 32, 3)
    )
    optimizer = LARS(weight_decay=5e-4, exclude_bn_and_bias=True)
    optimizer.build(model.trainable_variables)
    normalization = {
        id(v)
        for layer in model._flatten_layers()  # the test's own lookup, by class
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization))
        for v in layer.trainable_weights
    }
    rank_one_kept = 0
    for variable, decays, adapts in zip(
        model.trainable_variables, optimizer._apply_decay, optimizer._apply_adaptation, strict=True
    ):
        excluded = variable.name == "bias" or id(variable) in normalization
        assert decays == adapts == (not excluded), variable.path
        rank_one_kept += len(variable.shape) == 1 and not excluded
    assert len(normalization) >= 46  # ConvNeXt-Tiny: 23 layer norms; ResNet-50: 53 BNs
    # ConvNeXt-Tiny has 18 blocks, each with a layer scale; ResNet-50 no rank-1 non-BN variable.
    assert rank_one_kept == (18 if application == "ConvNeXtTiny" else 0)
    assert not [r for r in caplog.records if "exclude_bn_and_bias" in r.getMessage()]


def test_exclude_bn_and_bias_warns_of_normalization_lookalikes_it_does_not_know(caplog):
    """A normalization layer of another library (here a hand-written RMS norm whose variable
    is named "scale", as keras_hub's are) is no Keras normalization layer: it is adapted, and
    the user is told so, by path."""

    class RMSNorm(keras.layers.Layer):
        def build(self, input_shape):
            self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

        def call(self, x):
            return x * self.scale / keras.ops.sqrt(keras.ops.mean(x * x, -1, keepdims=True) + 1e-6)

    model = keras.Sequential([keras.Input((4,)), RMSNorm(name="rms"), keras.layers.Dense(2)])
    optimizer = LARS(weight_decay=5e-4, exclude_bn_and_bias=True)
    optimizer.build(model.trainable_variables)
    assert optimizer._apply_adaptation == [True, True, False]  # rms/scale, kernel, bias
    warned = [r.getMessage() for r in caplog.records if "exclude_bn_and_bias" in r.getMessage()]
    assert len(warned) == 1 and "rms/scale" in warned[0], warned


def test_layer_statistics_are_the_last_update_values():
    x, y = data(n=8)
    model = small_model()
    optimizer = lars_for_fit(learning_rate=1.0, weight_decay=0.0)
    model.compile(optimizer=optimizer, loss=LOSS)
    assert optimizer.layer_statistics() == {}
    weights = [v.numpy() for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x, training=True))
    grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    stats = optimizer.layer_statistics()
    for variable, w, g in zip(model.trainable_variables, weights, grads, strict=True):
        s = {k: float(v) for k, v in stats[variable.path].items()}
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        assert s["weight_norm"] == pytest.approx(w_norm, rel=1e-5)
        assert s["grad_norm"] == pytest.approx(g_norm, rel=1e-4)
        want = 0.001 * w_norm / g_norm if w_norm > 0 else 1.0
        assert s["local_lr"] == pytest.approx(want, rel=1e-4)
    # The statistics are one optimizer variable, so checkpoints carry them.
    assert any(v is optimizer._statistics for v in optimizer.variables)
    paths, table = optimizer.statistics_table()
    assert paths == list(stats)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(table), [[s[k] for k in STATISTICS] for s in stats.values()]
    )


def _continue(model, x, y):
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    return [v.numpy() for v in model.trainable_variables]


def _checkpoint_lars():
    return lars_for_fit(exclude_bn_and_bias=True, nesterov=True)


@pytest.mark.parametrize("how", ["keras_file", "tf_checkpoint"])
def test_restore_continues_bit_identically(tmp_path, how):
    x, y = data(n=32)
    first, second = (x[:16], y[:16]), (x[16:], y[16:])

    uninterrupted = small_model()
    train(uninterrupted, _checkpoint_lars(), *first)
    want = _continue(uninterrupted, *second)

    interrupted = small_model()
    optimizer = _checkpoint_lars()
    train(interrupted, optimizer, *first)
    if how == "keras_file":
        path = tmp_path / "model.keras"
        interrupted.save(path)
        restored = keras.models.load_model(path, custom_objects={"ListSchedule": ListSchedule})
        assert isinstance(restored.optimizer, LARS)
        assert restored.optimizer.get_config() == optimizer.get_config()
    else:
        prefix = tf.train.Checkpoint(model=interrupted, optimizer=optimizer).save(
            str(tmp_path / "ckpt")
        )
        restored = small_model(seed=1)
        restored_optimizer = _checkpoint_lars()
        restored.compile(optimizer=restored_optimizer, loss=LOSS)
        restored_optimizer.build(restored.trainable_variables)
        tf.train.Checkpoint(model=restored, optimizer=restored_optimizer).restore(
            prefix
        ).assert_consumed()
    for a, b in zip(optimizer.variables, restored.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    got = _continue(restored, *second)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_schedule_counts_updates_not_micro_batches_under_accumulation():
    """With k micro-batches per update, update u uses schedule(u), as Caffe's `iter_size` does."""
    rates = [0.5, 0.25, 0.125, 0.0625]

    class Halving(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return keras.ops.take(keras.ops.array(rates), keras.ops.minimum(step, 3))

    k = 3
    variable = keras.Variable(np.ones(4, "float32"), name="w")
    optimizer = LARS(learning_rate=Halving(), momentum=0.0, gradient_accumulation_steps=k)
    optimizer.build([variable])
    # Excluded from nothing: ||w|| = 2, ||g|| = 2, so local LR = eta = 0.001; w moves by
    # lr * 0.001 * g per update. Check the rate of each update from the weight change.
    for update in range(len(rates)):
        before = variable.numpy()
        for _ in range(k):
            optimizer.apply([keras.ops.ones(4) * 0.5], [variable])
        step = before - variable.numpy()
        local_lr = 0.001 * np.linalg.norm(before) / np.linalg.norm(np.full(4, 0.5))
        # rtol: w - step loses digits in float32; the wrong rate would be off by 2x or more.
        np.testing.assert_allclose(step, rates[update] * local_lr * 0.5, rtol=1e-3)
        assert int(optimizer.iterations) == update + 1


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("shape", [(3, 3, 64, 64), (2048, 1000), (1000,), (37, 41)])
def test_weight_norm_of_large_tensors_matches_numpy(shape, jit_compile):
    """The blocked norm (the fast path for tensors of whole 32 x 16 blocks) equals the plain one."""
    import tensorflow as tf

    from lars_tf.optimizer import _l2_norm

    x = np.random.default_rng(0).standard_normal(shape).astype("float32") * 3.0
    norm = tf.function(_l2_norm, jit_compile=jit_compile)(tf.constant(x))
    np.testing.assert_allclose(float(norm), np.linalg.norm(x.astype("float64")), rtol=2e-6)
