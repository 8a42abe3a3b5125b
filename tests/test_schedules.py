"""Schedules against hand-computed numbers at and around every boundary.

Symbols: g0 = initial_learning_rate, r0 = warmup_start_lr, W = warmup_steps, T = decay_steps.
Each table lists t = 0, W - 1, W, W + 1, T - 1, T, T + 5 (and boundaries +- 1), with the
arithmetic in the comment.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from lars_tf import schedules
from lars_tf.schedules import (
    MultiStepWithWarmup,
    PerUpdateSchedule,
    PolynomialDecayWithWarmup,
    linear_scaling,
)

POLY_CASES = {
    # Paper text: linear warm-up, then poly(2) over the full horizon T (drop at t = W).
    "linear_full_horizon": (
        dict(initial_learning_rate=2.0, decay_steps=20, warmup_steps=4, warmup_start_lr=0.4),
        {
            0: 0.4,  # r0
            1: 0.8,  # 0.4 + 1.6 * 1/4
            3: 1.6,  # 0.4 + 1.6 * 3/4
            4: 1.28,  # 2 * (1 - 4/20)^2
            5: 1.125,  # 2 * (1 - 5/20)^2
            19: 0.005,  # 2 * (1/20)^2
            20: 0.0,
            25: 0.0,
        },
    ),
    # Authors' Caffe code: quadratic warm-up, full horizon; here with an end LR.
    "quadratic_full_horizon_end_lr": (
        dict(
            initial_learning_rate=2.0,
            decay_steps=20,
            end_learning_rate=0.1,
            warmup_steps=4,
            warmup_start_lr=0.4,
            warmup_shape="quadratic",
        ),
        {
            0: 0.4,  # r0
            1: 0.5,  # 0.4 + 1.6 * (1/4)^2
            3: 1.3,  # 0.4 + 1.6 * (3/4)^2
            4: 1.316,  # 0.1 + 1.9 * (1 - 4/20)^2
            5: 1.16875,  # 0.1 + 1.9 * (1 - 5/20)^2
            19: 0.10475,  # 0.1 + 1.9 * (1/20)^2
            20: 0.1,
            25: 0.1,
        },
    ),
    # MLPerf: linear warm-up from 0, then decay over T - W from g0 (continuous at W).
    "linear_decay_after_warmup": (
        dict(
            initial_learning_rate=2.0,
            decay_steps=20,
            end_learning_rate=0.1,
            warmup_steps=4,
            decay_after_warmup=True,
        ),
        {
            0: 0.0,  # r0: the first update of an MLPerf-style run does nothing
            3: 1.5,  # 2 * 3/4
            4: 2.0,  # 0.1 + 1.9 * (1 - 0/16)^2
            5: 1.769921875,  # 0.1 + 1.9 * (15/16)^2
            19: 0.107421875,  # 0.1 + 1.9 * (1/16)^2
            20: 0.1,
            25: 0.1,
        },
    ),
    "quadratic_decay_after_warmup_power_1": (
        dict(
            initial_learning_rate=1.0,
            decay_steps=12,
            power=1.0,
            warmup_steps=2,
            warmup_start_lr=0.2,
            warmup_shape="quadratic",
            decay_after_warmup=True,
        ),
        {
            0: 0.2,
            1: 0.4,  # 0.2 + 0.8 * (1/2)^2
            2: 1.0,
            3: 0.9,  # 1 - 1/10
            11: 0.1,  # 1 - 9/10
            12: 0.0,
            17: 0.0,
        },
    ),
    "no_warmup": (
        dict(initial_learning_rate=1.0, decay_steps=10, power=1.0),
        {0: 1.0, 1: 0.9, 9: 0.1, 10: 0.0, 15: 0.0},
    ),
    # W == T: the warm-up ends on the last step; then the end LR, in both modes.
    "warmup_equals_horizon": (
        dict(initial_learning_rate=1.0, decay_steps=4, warmup_steps=4, end_learning_rate=0.05),
        {0: 0.0, 3: 0.75, 4: 0.05, 9: 0.05},
    ),
    "warmup_equals_horizon_after_warmup": (
        dict(
            initial_learning_rate=1.0,
            decay_steps=4,
            warmup_steps=4,
            end_learning_rate=0.05,
            decay_after_warmup=True,
        ),
        {0: 0.0, 3: 0.75, 4: 0.05, 9: 0.05},
    ),
}

MULTISTEP_CASES = {
    # Goyal et al.: linear warm-up, x0.1 at each boundary.
    "goyal": (
        dict(
            initial_learning_rate=0.8,
            boundaries=[6, 9],
            decay_rate=0.1,
            warmup_steps=3,
            warmup_start_lr=0.2,
        ),
        {
            0: 0.2,  # r0
            1: 0.4,  # 0.2 + 0.6 * 1/3
            2: 0.6,  # W - 1: 0.2 + 0.6 * 2/3
            3: 0.8,  # W: g0
            4: 0.8,
            5: 0.8,  # boundary - 1
            6: 0.08,  # boundary: g0 * 0.1
            7: 0.08,
            8: 0.08,
            9: 0.008,  # g0 * 0.1^2
            10: 0.008,
            100: 0.008,
        },
    ),
    # Quadratic warm-up from 0 and a boundary equal to W.
    "quadratic_boundary_at_warmup_end": (
        dict(
            initial_learning_rate=1.0,
            boundaries=[4],
            decay_rate=0.5,
            warmup_steps=4,
            warmup_shape="quadratic",
        ),
        {0: 0.0, 2: 0.25, 3: 0.5625, 4: 0.5, 5: 0.5, 50: 0.5},
    ),
    "no_warmup_no_boundaries": (
        dict(initial_learning_rate=0.3, boundaries=[]),
        {0: 0.3, 1: 0.3, 10_000: 0.3},
    ),
    "warmup_then_constant": (
        dict(initial_learning_rate=1.0, boundaries=[], warmup_steps=5, warmup_start_lr=0.5),
        {0: 0.5, 4: 0.9, 5: 1.0, 6: 1.0},
    ),
}


def _values(schedule, steps):
    return np.array([float(keras.ops.convert_to_numpy(schedule(t))) for t in steps])


@pytest.mark.parametrize("case", sorted(POLY_CASES))
def test_polynomial_decay_hand_computed(case):
    kwargs, expected = POLY_CASES[case]
    schedule = PolynomialDecayWithWarmup(**kwargs)
    np.testing.assert_allclose(
        _values(schedule, expected), list(expected.values()), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("case", sorted(MULTISTEP_CASES))
def test_multistep_hand_computed(case):
    kwargs, expected = MULTISTEP_CASES[case]
    schedule = MultiStepWithWarmup(**kwargs)
    np.testing.assert_allclose(
        _values(schedule, expected), list(expected.values()), rtol=1e-6, atol=1e-7
    )


def test_polynomial_without_warmup_matches_keras_polynomial_decay():
    ours = PolynomialDecayWithWarmup(0.5, decay_steps=10, power=2.0, end_learning_rate=0.01)
    theirs = keras.optimizers.schedules.PolynomialDecay(
        0.5, decay_steps=10, power=2.0, end_learning_rate=0.01
    )
    steps = range(15)
    np.testing.assert_allclose(_values(ours, steps), _values(theirs, steps), rtol=1e-6)


def test_multistep_counts_boundaries_in_integers():
    # float32 cannot tell 2**25 from 2**25 + 1; the boundary must still fall exactly there.
    boundary = 2**25 + 1
    schedule = MultiStepWithWarmup(1.0, boundaries=[boundary], decay_rate=0.1)
    values = _values(schedule, [tf.constant(boundary - 1, tf.int64), boundary, boundary + 1])
    np.testing.assert_allclose(values, [1.0, 0.1, 0.1], rtol=1e-6)


@pytest.mark.parametrize(
    "schedule",
    [
        PolynomialDecayWithWarmup(
            2.0, 20, warmup_steps=4, warmup_start_lr=0.4, warmup_shape="quadratic"
        ),
        PolynomialDecayWithWarmup(
            2.0, 20, end_learning_rate=0.1, warmup_steps=4, decay_after_warmup=True
        ),
        MultiStepWithWarmup(0.8, [6, 9], warmup_steps=3, warmup_start_lr=0.2),
    ],
    ids=["poly_quadratic", "poly_after_warmup", "multistep"],
)
def test_schedules_compile_under_xla(schedule):
    compiled = tf.function(schedule, jit_compile=True)
    steps = list(range(26))
    on_xla = [float(compiled(tf.constant(t, tf.int64))) for t in steps]
    np.testing.assert_allclose(on_xla, _values(schedule, steps), rtol=1e-6, atol=1e-7)


def test_first_update_uses_step_zero():
    """Keras evaluates the schedule at `iterations` before incrementing: update k uses t = k."""
    schedule = MultiStepWithWarmup(1.0, boundaries=[], warmup_steps=4, warmup_start_lr=0.25)
    variable = keras.Variable(np.zeros((1,), "float32"))
    optimizer = keras.optimizers.SGD(learning_rate=schedule)
    gradient = np.ones((1,), "float32")
    before = []
    for _ in range(3):
        before.append(float(variable.numpy()[0]))
        optimizer.apply([gradient], [variable])
    steps_taken = -np.diff(before + [float(variable.numpy()[0])])
    # Rates of t = 0, 1, 2: 0.25 + 0.75 * t / 4.
    np.testing.assert_allclose(steps_taken, [0.25, 0.4375, 0.625], rtol=1e-6)


def _rates_of_updates(optimizer, micro_batches):
    """Applies a unit gradient `micro_batches` times; returns the rate of each real update."""
    variable = keras.Variable(np.zeros((1,), "float32"))
    values = [0.0]
    for _ in range(micro_batches):
        optimizer.apply([np.ones((1,), "float32")], [variable])
        values.append(float(variable.numpy()[0]))
    moves = -np.diff(values)
    return moves[moves != 0]


def test_per_update_schedule_under_gradient_accumulation():
    schedule = MultiStepWithWarmup(
        1.0, boundaries=[3], decay_rate=0.5, warmup_steps=2, warmup_start_lr=0.5
    )
    expected = [0.5, 0.75, 1.0, 0.5, 0.5]  # schedule(u) for updates u = 0..4
    # A bare schedule under k = 2 runs twice too fast: update u gets schedule(2u + 1).
    bare = _rates_of_updates(
        keras.optimizers.SGD(learning_rate=schedule, gradient_accumulation_steps=2), 10
    )
    np.testing.assert_allclose(bare, [0.75, 0.5, 0.5, 0.5, 0.5], rtol=1e-6)  # t = 1, 3, 5, 7, 9
    wrapped = _rates_of_updates(
        keras.optimizers.SGD(
            learning_rate=PerUpdateSchedule(schedule, gradient_accumulation_steps=2),
            gradient_accumulation_steps=2,
        ),
        10,
    )
    np.testing.assert_allclose(wrapped, expected, rtol=1e-6)
    # k = 1 changes nothing.
    np.testing.assert_allclose(
        _values(PerUpdateSchedule(schedule, 1), range(6)), _values(schedule, range(6))
    )
    with pytest.raises(ValueError, match="`gradient_accumulation_steps`"):
        PerUpdateSchedule(schedule, 0)
    with pytest.raises(ValueError, match="`schedule`"):
        PerUpdateSchedule(lambda step: 0.1, 2)


@pytest.mark.parametrize(
    "schedule",
    [
        PerUpdateSchedule(
            MultiStepWithWarmup(1.0, [4], warmup_steps=2), gradient_accumulation_steps=3
        ),
        PolynomialDecayWithWarmup(
            10.0,
            decay_steps=15_600,
            power=2.0,
            end_learning_rate=1e-4,
            warmup_steps=600,
            warmup_start_lr=1.0,
            warmup_shape="quadratic",
            decay_after_warmup=True,
        ),
        MultiStepWithWarmup(3.2, [30, 60, 80], decay_rate=0.2, warmup_steps=5, warmup_start_lr=0.1),
    ],
    ids=["per_update", "poly", "multistep"],
)
def test_config_round_trip(schedule):
    config = schedule.get_config()
    clone = type(schedule).from_config(config)
    assert clone.get_config() == config
    # Through Keras' registry, as inside a saved optimizer.
    revived = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert type(revived) is type(schedule)
    assert revived.get_config() == config
    optimizer = keras.optimizers.SGD.from_config(
        keras.optimizers.SGD(learning_rate=schedule).get_config()
    )
    assert type(optimizer._learning_rate) is type(schedule)
    steps = [0, 4, 5, 6, 700, 20_000]
    np.testing.assert_allclose(_values(revived, steps), _values(schedule, steps), rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(initial_learning_rate=-0.1, decay_steps=10), "initial_learning_rate"),
        (dict(initial_learning_rate=float("nan"), decay_steps=10), "initial_learning_rate"),
        (dict(initial_learning_rate=0.1, decay_steps=0), "decay_steps"),
        (dict(initial_learning_rate=0.1, decay_steps=10.0), "decay_steps"),
        (dict(initial_learning_rate=0.1, decay_steps=10, power=0.0), "power"),
        (
            dict(initial_learning_rate=0.1, decay_steps=10, end_learning_rate=-1.0),
            "end_learning_rate",
        ),
        (dict(initial_learning_rate=0.1, decay_steps=10, warmup_steps=11), "warmup_steps"),
        (dict(initial_learning_rate=0.1, decay_steps=10, warmup_steps=-1), "warmup_steps"),
        (dict(initial_learning_rate=0.1, decay_steps=10, warmup_start_lr=-0.1), "warmup_start_lr"),
        (dict(initial_learning_rate=0.1, decay_steps=10, warmup_shape="cosine"), "warmup_shape"),
        (
            dict(initial_learning_rate=0.1, decay_steps=10, decay_after_warmup="yes"),
            "decay_after_warmup",
        ),
    ],
)
def test_polynomial_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        PolynomialDecayWithWarmup(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(initial_learning_rate=-1.0, boundaries=[5]), "initial_learning_rate"),
        (dict(initial_learning_rate=0.1, boundaries=[9, 5]), "boundaries"),
        (dict(initial_learning_rate=0.1, boundaries=[5, 5]), "boundaries"),
        (dict(initial_learning_rate=0.1, boundaries=[-1]), "boundaries"),
        (dict(initial_learning_rate=0.1, boundaries=[2.5]), "boundaries"),
        (dict(initial_learning_rate=0.1, boundaries=5), "boundaries"),
        (dict(initial_learning_rate=0.1, boundaries=[3], warmup_steps=4), "boundaries"),
        (dict(initial_learning_rate=0.1, boundaries=[5], decay_rate=0.0), "decay_rate"),
        (dict(initial_learning_rate=0.1, boundaries=[5], warmup_shape="exp"), "warmup_shape"),
    ],
)
def test_multistep_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        MultiStepWithWarmup(**kwargs)


def test_linear_scaling():
    assert linear_scaling(0.1, 256) == pytest.approx(0.1)
    assert linear_scaling(0.1, 8192) == pytest.approx(3.2)  # Goyal et al. at 8K
    assert linear_scaling(0.02, 4096, reference_batch_size=512) == pytest.approx(0.16)
    assert isinstance(linear_scaling(1, 512), float)
    with pytest.raises(ValueError, match="`batch_size`"):
        linear_scaling(0.1, 0)
    with pytest.raises(ValueError, match="`reference_batch_size`"):
        linear_scaling(0.1, 256, reference_batch_size=0)
    with pytest.raises(ValueError, match="`base_learning_rate`"):
        linear_scaling(-0.1, 256)


def test_build_by_name_is_the_schedule_classes():
    poly = schedules.build(
        "poly", 2.0, total_steps=100, warmup_steps=10, power=2.0, decay_after_warmup=True
    )
    want = schedules.PolynomialDecayWithWarmup(
        2.0, decay_steps=100, warmup_steps=10, power=2.0, decay_after_warmup=True
    )
    assert isinstance(poly, schedules.PolynomialDecayWithWarmup)
    assert poly.get_config() == want.get_config()
    steps = schedules.build("multistep", 1.0, total_steps=100, boundaries=[30, 60])
    assert isinstance(steps, schedules.MultiStepWithWarmup)
    assert [float(steps(t)) for t in (29, 30, 60)] == pytest.approx([1.0, 0.1, 0.01])
    assert schedules.available() == ["poly", "multistep"]
    with pytest.raises(ValueError, match=r"schedule must be one of \['poly', 'multistep'\]"):
        schedules.build("cosine", 1.0, total_steps=10)
