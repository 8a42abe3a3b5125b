"""An independent NumPy float64 Algorithm 1 of LARS, and the problems and cases it is run on.

`reference_lars` is written from the paper (and, for the variants, from the shared doc's
formulas), in float64, and shares no code with the optimizer. Nothing here needs TensorFlow:
`tests/test_optimizer.py` runs the cases on the TensorFlow backend, and
`tests/any_backend/` on every Keras backend.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from lars_tf.optimizer import LARS

STEPS = 12
# A global LR that changes every step, so that "LR inside the momentum" (the paper) and "LR
# outside the momentum" (P') give different trajectories.
LEARNING_RATES = [2.0, 3.5, 1.0, 5.0, 0.5, 4.0, 2.5, 6.0, 1.5, 3.0, 0.75, 4.5]
# Float32 results against the float64 reference, after up to 12 steps.
RTOL, ATOL = 1e-5, 1e-7


class ListSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`values[step]`, the last value after the end."""

    def __init__(self, values):
        self.values = list(values)

    def __call__(self, step):
        index = keras.ops.minimum(keras.ops.cast(step, "int32"), len(self.values) - 1)
        return keras.ops.take(keras.ops.convert_to_tensor(self.values, "float32"), index)

    def get_config(self):
        return {"values": self.values}


# ---------------------------------------------------------------------------------------------
# The NumPy float64 reference.


def reference_lars(
    weights,
    gradients,
    learning_rates,
    *,
    momentum,
    beta,
    eta,
    epsilon=0.0,
    nesterov=False,
    decay=None,
    adapt=None,
    decay_in_norm=False,
    lr_outside_momentum=False,
    clip_local_lr=False,
):
    """Algorithm 1 of the paper, float64, per variable; returns per-step weights and statistics.

    Args:
        weights: Initial arrays.
        gradients: `gradients[t][i]` is variable i's gradient at step t.
        learning_rates: `gamma_t` per step.
        decay, adapt: Per-variable bools (default all True): False means beta = 0, resp.
            local LR = 1.

    Returns:
        `(trajectory, statistics)`: `trajectory[t][i]` the weights after step t;
        `statistics[t][i]` the (local LR, ||w||, ||g||) of step t.
    """
    w = [np.asarray(x, np.float64).copy() for x in weights]
    v = [np.zeros_like(x) for x in w]
    decay = decay or [True] * len(w)
    adapt = adapt or [True] * len(w)
    trajectory, statistics = [], []
    for gamma, grads in zip(learning_rates, gradients, strict=False):
        step_statistics = []
        for i, g in enumerate(grads):
            g = np.asarray(g, np.float64)
            b = beta if decay[i] else 0.0
            w_norm = math.sqrt(float(np.sum(w[i] ** 2)))
            g_norm = math.sqrt(float(np.sum(g**2)))
            decayed = g + b * w[i]
            if not adapt[i]:
                lam = 1.0
            elif decay_in_norm:
                d_norm = math.sqrt(float(np.sum(decayed**2)))
                lam = eta * w_norm / (d_norm + epsilon) if w_norm > 0 and d_norm > 0 else 1.0
            else:
                lam = (
                    eta * w_norm / (g_norm + b * w_norm + epsilon)
                    if w_norm > 0 and g_norm > 0
                    else 1.0
                )
            if adapt[i] and clip_local_lr:
                lam = min(lam, 1.0)
            if lr_outside_momentum:
                v[i] = momentum * v[i] + lam * decayed
                step = gamma * (momentum * v[i] + lam * decayed) if nesterov else gamma * v[i]
            else:
                v[i] = momentum * v[i] + gamma * lam * decayed
                step = momentum * v[i] + gamma * lam * decayed if nesterov else v[i]
            w[i] = w[i] - step
            step_statistics.append((lam, w_norm, g_norm))
        trajectory.append([x.copy() for x in w])
        statistics.append(step_statistics)
    return trajectory, statistics


# ---------------------------------------------------------------------------------------------
# A bias, a dense kernel and a conv kernel, with zero-norm events built in.


def problem(seed=0):
    """Initial weights and `STEPS` gradients for (bias, kernel, conv kernel).

    The bias starts at 0 (||w|| == 0) and gets a zero gradient on steps 0-1 (both norms 0); the
    conv kernel gets a zero gradient on step 3 and the dense kernel on step 6 (||g|| == 0).
    Gradients are ~1e-3 against weights ~1, so that beta * ||w|| is comparable to ||g|| and
    decay visibly changes the local LR.
    """
    rng = np.random.default_rng(seed)
    shapes = [(7,), (5, 3), (3, 3, 2, 4)]
    weights = [
        np.zeros(shapes[0], np.float32),
        rng.normal(0.0, 1.0, shapes[1]).astype(np.float32),
        rng.normal(0.0, 0.5, shapes[2]).astype(np.float32),
    ]
    gradients = []
    for t in range(STEPS):
        grads = [rng.normal(0.0, 1e-3, s).astype(np.float32) for s in shapes]
        if t < 2:
            grads[0][:] = 0.0
        if t == 3:
            grads[2][:] = 0.0
        if t == 6:
            grads[1][:] = 0.0
        gradients.append(grads)
    return weights, gradients


def make_variables(weights, dtype="float32"):
    with keras.name_scope("dense"):
        bias = keras.Variable(weights[0], name="bias", dtype=dtype)
        kernel = keras.Variable(weights[1], name="kernel", dtype=dtype)
    with keras.name_scope("conv"):
        conv = keras.Variable(weights[2], name="kernel", dtype=dtype)
    return [bias, kernel, conv]


def run_optimizer(optimizer, weights, gradients, before_first_step=None):
    variables = make_variables(weights)
    if before_first_step is not None:
        before_first_step(optimizer)
    trajectory, statistics = [], []
    for grads in gradients:
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
        trajectory.append([keras.ops.convert_to_numpy(v) for v in variables])
        stats = optimizer.layer_statistics()
        statistics.append(
            [
                tuple(float(stats[v.path][k]) for k in ("local_lr", "weight_norm", "grad_norm"))
                for v in variables
            ]
        )
    return trajectory, statistics


@dataclasses.dataclass
class Case:
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    trust_coefficient: float = 0.001
    epsilon: float = 0.0
    decay_in_norm: bool = False
    lr_outside_momentum: bool = False
    clip_local_lr: bool = False
    exclude_from_weight_decay: list | None = None
    exclude_from_layer_adaptation: list | None = None
    exclude_bn_and_bias: bool = False
    # Per (bias, kernel, conv): what the reference must do, matching the exclusions above.
    decay: list | None = None
    adapt: list | None = None
    keras_method_exclusion: list | None = None

    def optimizer(self, **extra):
        return LARS(
            learning_rate=ListSchedule(LEARNING_RATES),
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            trust_coefficient=self.trust_coefficient,
            epsilon=self.epsilon,
            nesterov=self.nesterov,
            exclude_from_weight_decay=self.exclude_from_weight_decay,
            exclude_from_layer_adaptation=self.exclude_from_layer_adaptation,
            exclude_bn_and_bias=self.exclude_bn_and_bias,
            decay_in_norm=self.decay_in_norm,
            lr_outside_momentum=self.lr_outside_momentum,
            clip_local_lr=self.clip_local_lr,
            **extra,
        )

    def reference(self, weights, gradients):
        return reference_lars(
            weights,
            gradients,
            LEARNING_RATES,
            momentum=self.momentum,
            beta=self.weight_decay,
            eta=self.trust_coefficient,
            epsilon=self.epsilon,
            nesterov=self.nesterov,
            decay=self.decay,
            adapt=self.adapt,
            decay_in_norm=self.decay_in_norm,
            lr_outside_momentum=self.lr_outside_momentum,
            clip_local_lr=self.clip_local_lr,
        )


CASES = {
    f"paper-m{m}-wd{wd}-{'nesterov' if n else 'plain'}": Case(
        momentum=m, weight_decay=wd, nesterov=n
    )
    for m in (0.0, 0.9)
    for wd in (0.0, 5e-4)
    for n in (False, True)
}
CASES.update(
    {
        "epsilon": Case(epsilon=1e-3),
        "decay_in_norm": Case(decay_in_norm=True),
        "decay_in_norm-nesterov": Case(decay_in_norm=True, nesterov=True),
        "lr_outside_momentum": Case(lr_outside_momentum=True),
        "lr_outside_momentum-nesterov": Case(lr_outside_momentum=True, nesterov=True),
        # eta = 0.01 puts the dense and conv local LRs around 10, so the clip is active.
        "clip_local_lr": Case(clip_local_lr=True, trust_coefficient=0.01),
        "clip_local_lr-nesterov": Case(clip_local_lr=True, trust_coefficient=0.01, nesterov=True),
        "all-variants": Case(
            decay_in_norm=True,
            lr_outside_momentum=True,
            clip_local_lr=True,
            nesterov=True,
            trust_coefficient=0.01,
        ),
        "exclusion-patterns": Case(
            exclude_from_weight_decay=["bias"],
            exclude_from_layer_adaptation=["^conv/"],
            decay=[False, True, True],
            adapt=[True, True, False],
        ),
        "exclude_bn_and_bias": Case(
            exclude_bn_and_bias=True, decay=[False, True, True], adapt=[False, True, True]
        ),
        "keras-exclude_from_weight_decay-method": Case(
            keras_method_exclusion=["kernel"], decay=[True, False, False]
        ),
    }
)


# ---------------------------------------------------------------------------------------------
# A small model trained by `fit`, with the same initial weights and data on every backend.

FIT_BATCH = 16
FIT_STEPS = 4


def fit_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(FIT_BATCH * FIT_STEPS, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, size=(FIT_BATCH * FIT_STEPS,)).astype("int32")
    return x, y


def fit_model(seed=0):
    """Conv, batch norm, dense: weights drawn by NumPy, so every backend starts alike."""
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="fc", dtype="float32"),
        ]
    )
    rng = np.random.default_rng(seed + 1)
    model.set_weights(
        [
            rng.normal(0.0, 0.5, w.shape).astype("float32")
            if w.path.endswith("kernel")
            else keras.ops.convert_to_numpy(w)
            for w in model.weights
        ]
    )
    return model


def fit_optimizer(**kwargs):
    return LARS(
        learning_rate=keras.optimizers.schedules.PolynomialDecay(2.0, FIT_STEPS, 0.5),
        momentum=0.9,
        weight_decay=5e-4,
        trust_coefficient=0.01,
        exclude_bn_and_bias=True,
        **kwargs,
    )


def compile_for_fit(model, optimizer):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def weights_by_layer(model):
    """`{"conv/kernel": array, ...}` by layer and variable name (a variable's path carries the
    model's name, which Keras numbers, and is not kept by every backend's `load_model`)."""
    return {
        f"{layer.name}/{w.name}": keras.ops.convert_to_numpy(w)
        for layer in model.layers
        for w in layer.weights
    }


def fit_weights(epochs=1, seed=0):
    """`weights_by_layer` after `epochs` of `fit` of `fit_model` with `fit_optimizer`."""
    x, y = fit_data(seed)
    model = compile_for_fit(fit_model(seed), fit_optimizer())
    model.fit(x, y, batch_size=FIT_BATCH, epochs=epochs, shuffle=False, verbose=0)
    return weights_by_layer(model)
