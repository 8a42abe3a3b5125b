"""Callbacks under real `fit` runs: LR logging, LR driving, and LARS statistics in TensorBoard.

The LR tests train a one-bias model whose loss is the mean output: the bias gradient is
exactly 1, so with plain SGD each update moves the bias by minus the rate it applied, which
checks the rate the optimizer really used, not only the one a callback reports.
"""

from __future__ import annotations

import csv
from collections import defaultdict

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from lars_tf.callbacks import (
    LayerStatisticsLogger,
    LearningRateLogger,
    LearningRateScheduleCallback,
    LearningRateWarmupCallback,
    _histogram_buckets,
)
from lars_tf.optimizer import LARS
from lars_tf.schedules import MultiStepWithWarmup, PerUpdateSchedule, PolynomialDecayWithWarmup

STEPS_PER_EPOCH = 6
EPOCHS = 2
STEPS = STEPS_PER_EPOCH * EPOCHS

SCHEDULES = {
    # T = 9 < STEPS, so t = 9, 10, 11 check the clamp at the end LR.
    "poly_quadratic": PolynomialDecayWithWarmup(
        1.0, decay_steps=9, warmup_steps=3, warmup_start_lr=0.1, warmup_shape="quadratic"
    ),
    "multistep": MultiStepWithWarmup(
        1.0, boundaries=[5, 8], decay_rate=0.5, warmup_steps=3, warmup_start_lr=0.2
    ),
}


def _mean_output(y_true, y_pred):
    return ops.mean(y_pred)


def _bias_model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(1, kernel_initializer="zeros", bias_initializer="zeros"),
        ]
    )


class _Recorder(keras.callbacks.Callback):
    """Records the logged rate and the bias before and after every batch."""

    def __init__(self):
        super().__init__()
        self.logged, self.bias = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.bias.append(float(self.model.layers[-1].bias.numpy()[0]))

    def on_train_batch_end(self, batch, logs=None):
        self.logged.append(logs["learning_rate"])

    def applied(self) -> np.ndarray:
        final = float(self.model.layers[-1].bias.numpy()[0])
        return -np.diff(self.bias + [final])


def _fit_bias_model(optimizer, callbacks, epochs=EPOCHS, jit_compile=False, steps_per_execution=1):
    model = _bias_model()
    model.compile(
        optimizer=optimizer,
        loss=_mean_output,
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    samples = 2 * STEPS_PER_EPOCH
    zeros = np.zeros((samples, 1), "float32")
    return model.fit(
        zeros, zeros, batch_size=2, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks
    )


def _expected(schedule, steps=STEPS):
    return np.array([float(ops.convert_to_numpy(schedule(t))) for t in range(steps)])


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_callback_equals_schedule_object_step_for_step(name, tmp_path):
    schedule = SCHEDULES[name]
    expected = _expected(schedule)

    # Reference: the schedule object inside the optimizer (XLA-compiled train step).
    by_object = _Recorder()
    csv_path = tmp_path / "log.csv"
    history = _fit_bias_model(
        keras.optimizers.SGD(learning_rate=schedule),
        [LearningRateLogger(), keras.callbacks.CSVLogger(str(csv_path)), by_object],
        jit_compile=True,
    )
    # The same schedule driven from a callback, on an optimizer built with a float.
    by_callback = _Recorder()
    _fit_bias_model(
        keras.optimizers.SGD(learning_rate=123.0),
        [LearningRateScheduleCallback(schedule), LearningRateLogger(), by_callback],
    )

    for recorder in (by_object, by_callback):
        np.testing.assert_allclose(recorder.logged, expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(recorder.applied(), expected, rtol=1e-5, atol=2e-6)
    # Epoch logs hold the rate of the epoch's last update, for History and CSVLogger alike.
    last_of_epoch = expected[STEPS_PER_EPOCH - 1 :: STEPS_PER_EPOCH]
    np.testing.assert_allclose(history.history["learning_rate"], last_of_epoch, rtol=1e-6)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_allclose([float(r["learning_rate"]) for r in rows], last_of_epoch, rtol=1e-6)


def test_warmup_then_schedule_callbacks_compose_to_the_schedule_object():
    """Horovod's pattern: a warm-up callback, then a decay callback from the end of warm-up."""
    schedule = SCHEDULES["multistep"]
    recorder = _Recorder()
    warmup = LearningRateWarmupCallback(
        1.0,
        warmup_epochs=0.5,
        warmup_start_lr=0.2,  # 3 steps, from fit's 6 steps per epoch
    )
    _fit_bias_model(
        keras.optimizers.SGD(learning_rate=0.0),
        [
            warmup,
            LearningRateScheduleCallback(
                MultiStepWithWarmup(1.0, boundaries=[5, 8], decay_rate=0.5), start_step=3
            ),
            LearningRateLogger(),
            recorder,
        ],
    )
    assert warmup.warmup_steps == 3
    expected = _expected(schedule)
    np.testing.assert_allclose(recorder.logged, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(recorder.applied(), expected, rtol=1e-5, atol=2e-6)


def test_warmup_callback_alone_reaches_target_then_lets_go():
    recorder = _Recorder()
    _fit_bias_model(
        keras.optimizers.SGD(learning_rate=0.0),
        [
            LearningRateWarmupCallback(
                0.8, warmup_steps=4, warmup_start_lr=0.4, warmup_shape="quadratic"
            ),
            # Writes a rate at t = 6 only; the warm-up callback must not overwrite it after W.
            LearningRateScheduleCallback(lambda step: 0.123, start_step=6, end_step=7),
            LearningRateLogger(),
            recorder,
        ],
        epochs=1,
    )
    # 0.4 + 0.4 * (t/4)^2 for t < 4, the target 0.8 at t = 4, untouched after.
    expected = [0.4, 0.425, 0.5, 0.625, 0.8, 0.8]
    np.testing.assert_allclose(recorder.logged, expected, rtol=1e-6)
    np.testing.assert_allclose(recorder.applied(), expected, rtol=1e-5, atol=2e-6)


def test_callbacks_count_updates_under_gradient_accumulation(tmp_path):
    """k = 2 micro-batches per update: 12 batches, 6 updates, each at the rate schedule(u)."""
    schedule, k = SCHEDULES["multistep"], 2
    expected = _expected(schedule, STEPS // k)
    by_object, by_callback = _Recorder(), _Recorder()
    _fit_bias_model(
        keras.optimizers.SGD(
            learning_rate=PerUpdateSchedule(schedule, k), gradient_accumulation_steps=k
        ),
        [LearningRateLogger(), by_object],
    )
    _fit_bias_model(
        keras.optimizers.SGD(learning_rate=0.0, gradient_accumulation_steps=k),
        [LearningRateScheduleCallback(schedule), LearningRateLogger(), by_callback],
    )
    for recorder in (by_object, by_callback):
        applied = recorder.applied()
        np.testing.assert_allclose(applied[k - 1 :: k], expected, rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(applied[::k], 0.0, atol=1e-7)  # accumulating, no update
        np.testing.assert_allclose(recorder.logged, np.repeat(expected, k), rtol=1e-6)

    # The statistics logger counts updates too, and logs each once its update is done. LARS
    # evaluates its schedule at the update count itself, without PerUpdateSchedule.
    _fit_bias_model(
        LARS(
            learning_rate=schedule,
            momentum=0.0,
            gradient_accumulation_steps=k,
        ),
        [LayerStatisticsLogger(tmp_path, every_n_steps=2)],
    )
    rates = _read_events(tmp_path)["learning_rate"]
    assert sorted(rates) == [0, 2, 4]
    np.testing.assert_allclose([float(rates[u]) for u in (0, 2, 4)], expected[[0, 2, 4]])


def test_warmup_callback_reaches_target_with_steps_per_execution():
    """Callbacks run once per 3 steps here (t = 0, 3, 6, 9): the ramp must still finish."""
    optimizer = keras.optimizers.SGD(learning_rate=0.0)
    history = _fit_bias_model(
        optimizer,
        [LearningRateWarmupCallback(1.0, warmup_steps=4)],
        steps_per_execution=3,
    )
    # Rates 0 (t = 0..2), 0.75 (t = 3..5, ramp at 3/4), then the target from t = 6 on.
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(1.0)
    bias = float(history.model.layers[-1].bias.numpy()[0])
    assert bias == pytest.approx(-(3 * 0.0 + 3 * 0.75 + 6 * 1.0), rel=1e-6)


def test_schedule_callback_window_and_plain_callable():
    recorder = _Recorder()
    _fit_bias_model(
        keras.optimizers.SGD(learning_rate=0.05),
        [
            LearningRateScheduleCallback(
                lambda step: 0.1 * (ops.cast(step, "float32") + 1.0), start_step=2, end_step=4
            ),
            LearningRateLogger(),
            recorder,
        ],
        epochs=1,
    )
    expected = [0.05, 0.05, 0.3, 0.4, 0.4, 0.4]  # untouched before 2; last value kept from 4
    np.testing.assert_allclose(recorder.logged, expected, rtol=1e-6)
    np.testing.assert_allclose(recorder.applied(), expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: keras.optimizers.SGD(learning_rate=0.5, momentum=0.9, nesterov=True),
        lambda: keras.optimizers.Adam(learning_rate=0.5),
        lambda: keras.optimizers.AdamW(learning_rate=0.5, weight_decay=0.01),
        lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(learning_rate=0.5)),
        lambda: LARS(learning_rate=0.5, weight_decay=1e-4),
    ],
    ids=["sgd_nesterov", "adam", "adamw", "loss_scale_sgd", "lars"],
)
def test_schedule_callback_drives_any_optimizer(make_optimizer):
    schedule = SCHEDULES["poly_quadratic"]
    optimizer = make_optimizer()
    recorder = _Recorder()
    _fit_bias_model(
        optimizer,
        [LearningRateScheduleCallback(schedule), LearningRateLogger(), recorder],
        epochs=1,
    )
    np.testing.assert_allclose(
        recorder.logged, _expected(schedule, STEPS_PER_EPOCH), rtol=1e-6, atol=1e-7
    )
    assert int(optimizer.iterations.numpy()) == STEPS_PER_EPOCH


def test_drivers_refuse_an_optimizer_built_with_a_schedule():
    optimizer = keras.optimizers.SGD(learning_rate=SCHEDULES["multistep"])
    with pytest.raises(TypeError, match="float `learning_rate`"):
        _fit_bias_model(optimizer, [LearningRateWarmupCallback(1.0, warmup_steps=3)], epochs=1)


def test_warmup_epochs_need_a_known_epoch_length():
    zeros = np.zeros((8, 1), "float32")
    # A filter hides the cardinality, so fit cannot tell the callback the steps per epoch.
    dataset = tf.data.Dataset.from_tensor_slices((zeros, zeros)).filter(lambda x, y: True)
    model = _bias_model()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss=_mean_output)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        model.fit(
            dataset.batch(2),
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[LearningRateWarmupCallback(1.0, warmup_epochs=2)],
        )
    # Given explicitly, W = round(1.5 * 4) = 6.
    assert LearningRateWarmupCallback(1.0, warmup_epochs=1.5, steps_per_epoch=4).warmup_steps == 6


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: LearningRateWarmupCallback(1.0), "warmup_steps"),
        (lambda: LearningRateWarmupCallback(1.0, 5, warmup_epochs=1), "warmup_steps"),
        (lambda: LearningRateWarmupCallback(1.0, warmup_epochs=-1), "warmup_epochs"),
        (
            lambda: LearningRateWarmupCallback(1.0, warmup_epochs=1, steps_per_epoch=0),
            "steps_per_epoch",
        ),
        (lambda: LearningRateWarmupCallback(-1.0, 5), "initial_learning_rate"),
        (lambda: LearningRateWarmupCallback(1.0, 5, warmup_shape="cubic"), "warmup_shape"),
        (lambda: LearningRateScheduleCallback(0.1), "schedule"),
        (lambda: LearningRateScheduleCallback(lambda s: 0.1, start_step=-1), "start_step"),
        (lambda: LearningRateScheduleCallback(lambda s: 0.1, start_step=3, end_step=3), "end_step"),
        (lambda: LayerStatisticsLogger("logs", every_n_steps=0), "every_n_steps"),
        (lambda: LayerStatisticsLogger("", every_n_steps=1), "log_dir"),
        (lambda: LayerStatisticsLogger("logs", should_write=True), "should_write"),
    ],
)
def test_callbacks_reject_bad_arguments(make, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        make()


# --- LayerStatisticsLogger ------------------------------------------------------------------


def _read_events(log_dir):
    """{tag: {step: array}} from every event file under `log_dir`; checks TensorBoard plugins."""
    events, plugins = defaultdict(dict), defaultdict(set)
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                events[value.tag][event.step] = tf.make_ndarray(value.tensor)
                plugins[value.tag].add(value.metadata.plugin_data.plugin_name)
    # The plugin name is what makes TensorBoard draw a tag as a scalar or a histogram.
    for tag, names in plugins.items():
        expected = "histograms" if tag.endswith("_histogram") else "scalars"
        assert names - {""} == {expected}, (tag, names)
    return events


class _StatisticsRecorder(keras.callbacks.Callback):
    """Records, per batch, the weights before it and LARS's statistics after it (slow way)."""

    def __init__(self):
        super().__init__()
        self.weights, self.statistics = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.weights.append({v.path: v.numpy() for v in self.model.trainable_variables})

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        self.statistics.append(
            {path: dict(stats) for path, stats in optimizer.layer_statistics().items()}
        )


def _small_model(optimizer) -> keras.Model:
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="relu"), keras.layers.Dense(2)]
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _fit_small_model(model, callbacks, steps=7):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2 * steps, 4)).astype("float32")
    y = rng.integers(0, 2, size=(2 * steps,)).astype("int32")
    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    return model


def test_layer_statistics_logger_writes_what_lars_computed(tmp_path):
    schedule = PolynomialDecayWithWarmup(0.5, decay_steps=20, warmup_steps=2, warmup_start_lr=0.1)
    recorder = _StatisticsRecorder()
    logger = LayerStatisticsLogger(tmp_path, every_n_steps=3)
    model = _fit_small_model(
        _small_model(LARS(learning_rate=schedule, momentum=0.9, weight_decay=1e-3)),
        [logger, recorder],
    )
    events = _read_events(tmp_path)
    paths = [v.path for v in model.trainable_variables]
    assert len(paths) == 4
    expected_tags = {"learning_rate", "local_lr_histogram"} | {
        f"{s}/{p}" for s in ("local_lr", "weight_norm", "grad_norm") for p in paths
    }
    assert set(events) == expected_tags
    for tag in expected_tags:
        assert sorted(events[tag]) == [0, 3, 6], tag  # every 3 of 7 updates, from update 0

    for step in (0, 3, 6):
        assert float(events["learning_rate"][step]) == pytest.approx(float(schedule(step)))
        histogram = events["local_lr_histogram"][step]  # rows of (left, right, count)
        assert histogram[:, 2].sum() == pytest.approx(len(paths))
        local_lrs = []
        for path in paths:
            recorded = recorder.statistics[step][path]
            for name in ("local_lr", "weight_norm", "grad_norm"):
                logged = float(events[f"{name}/{path}"][step])
                assert logged == pytest.approx(recorded[name], rel=1e-6), (name, path, step)
            # ||w|| is the norm of the weights before update `step`.
            weight_norm = np.linalg.norm(recorder.weights[step][path])
            assert float(events[f"weight_norm/{path}"][step]) == pytest.approx(
                weight_norm, rel=1e-5
            )
            local_lrs.append(recorded["local_lr"])
        assert histogram[0, 0] <= min(local_lrs) and max(local_lrs) <= histogram[-1, 1]
    # Zero-initialised biases have ||w|| = 0 at update 0, so their local LR is 1 there.
    bias_paths = [p for p in paths if p.endswith("bias")]
    assert all(float(events[f"local_lr/{p}"][0]) == 1.0 for p in bias_paths)


def test_layer_statistics_logger_unwraps_loss_scale_and_respects_should_write(tmp_path):
    quiet_dir, loud_dir = tmp_path / "quiet", tmp_path / "loud"
    optimizer = keras.optimizers.LossScaleOptimizer(LARS(learning_rate=0.2))
    _fit_small_model(
        _small_model(optimizer),
        [
            LayerStatisticsLogger(quiet_dir, every_n_steps=1, should_write=lambda: False),
            LayerStatisticsLogger(loud_dir, every_n_steps=5),
        ],
    )
    assert not quiet_dir.exists()
    events = _read_events(loud_dir)
    assert any(tag.startswith("grad_norm/") for tag in events)
    assert sorted(events["learning_rate"]) == [0, 5]
    assert float(events["learning_rate"][5]) == pytest.approx(0.2)


def test_layer_statistics_logger_without_lars_logs_the_rate_and_warns_once(tmp_path):
    logger = LayerStatisticsLogger(tmp_path, every_n_steps=4)
    model = _small_model(keras.optimizers.SGD(learning_rate=0.3))
    with pytest.warns(UserWarning, match="layer_statistics") as caught:
        _fit_small_model(model, [logger], steps=5)
        _fit_small_model(model, [logger], steps=5)
    assert len([w for w in caught if "layer_statistics" in str(w.message)]) == 1
    events = _read_events(tmp_path)
    assert set(events) == {"learning_rate"}
    # Steps carry on across fits: 0 and 4 in the first, 8 in the second (updates 5..9).
    assert sorted(events["learning_rate"]) == [0, 4, 8]


def test_histogram_buckets_follow_tensorboard_layout():
    spread = _histogram_buckets(np.array([0.0, 0.25, 1.0, 1.0]))
    assert spread.shape == (30, 3)
    assert spread[0, 0] == 0.0 and spread[-1, 1] == 1.0
    assert spread[:, 2].sum() == 4 and spread[-1, 2] == 2  # the maximum falls in the last bucket
    # All local LRs equal (e.g. every variable excluded from adaptation): zero-width buckets.
    single = _histogram_buckets(np.ones(5))
    assert np.all(single[:, :2] == 1.0)
    assert single[-1, 2] == 5 and single[:-1, 2].sum() == 0
