"""Learning-rate schedules of the LARS paper and of Goyal et al., as Keras 3 schedules.

Symbols of the paper (You, Gitman, Ginsburg 2017) and their argument names, used in every
formula of this module:

- ``gamma_0``: ``initial_learning_rate``, the peak (post-warm-up) global learning rate.
- ``t``: ``step``, the optimizer step. It counts from 0: the first update uses ``t = 0``,
  because Keras evaluates a schedule at ``optimizer.iterations`` before incrementing it
  (as the authors' Caffe solver does with its ``iter_``).
- ``T``: ``decay_steps``, the horizon of the polynomial decay, in optimizer steps.
- ``W``: ``warmup_steps``, the length of the warm-up, in optimizer steps.
- ``r_0``: ``warmup_start_lr``, the learning rate of the first warm-up step.
- ``p``: ``power`` of the polynomial decay (2 in the paper).
- ``gamma_end``: ``end_learning_rate``.

All steps are optimizer updates, not micro-batches and not epochs: convert epochs once with
``round(epochs * steps_per_epoch)``. Keras' own ``gradient_accumulation_steps`` (k) is the
exception to watch: Keras then evaluates a schedule at its micro-batch counter, so update ``u``
would get ``schedule(u * k + k - 1)``; wrap the schedule in `PerUpdateSchedule` to keep ``t``
counting updates (`lars_tf.LARS` does this itself).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import keras
from keras import ops

_WARMUP_SHAPES = ("linear", "quadratic")


def linear_scaling(
    base_learning_rate: float, batch_size: int, reference_batch_size: int = 256
) -> float:
    """Scales a learning rate linearly with the batch size (Krizhevsky 2014; Goyal et al. 2017).

    ``lr = base_learning_rate * batch_size / reference_batch_size``; Goyal's ResNet-50 recipe
    is ``linear_scaling(0.1, global_batch)``.

    Args:
        base_learning_rate: Learning rate that works at ``reference_batch_size``.
        batch_size: Global batch size of one optimizer update (all workers, all micro-batches).
        reference_batch_size: Batch size that ``base_learning_rate`` was tuned for.

    Returns:
        The scaled learning rate, a Python float.

    Raises:
        ValueError: If the learning rate is negative or a batch size is not a positive integer.
    """
    base_learning_rate = _check_non_negative("base_learning_rate", base_learning_rate)
    batch_size = _check_int("batch_size", batch_size, minimum=1)
    reference_batch_size = _check_int("reference_batch_size", reference_batch_size, minimum=1)
    return base_learning_rate * batch_size / reference_batch_size


@keras.saving.register_keras_serializable(package="lars_tf")
class PolynomialDecayWithWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Polynomial decay after a linear or quadratic warm-up (the paper's schedule).

    For ``t < W`` (warm-up)::

        lr = r_0 + (gamma_0 - r_0) * (t / W)        # warmup_shape="linear" (paper text, MLPerf)
        lr = r_0 + (gamma_0 - r_0) * (t / W) ** 2   # warmup_shape="quadratic" (authors' Caffe)

    For ``W <= t <= T``::

        lr = gamma_end + (gamma_0 - gamma_end) * (1 - t / T) ** p              # full horizon
        lr = gamma_end + (gamma_0 - gamma_end) * (1 - (t - W) / (T - W)) ** p  # after warm-up

    the second with ``decay_after_warmup=True`` (MLPerf's reference). For ``t >= T`` the rate
    stays at ``gamma_end``. Over the full horizon (the authors' code) the rate jumps at ``t = W``
    from the end of the ramp down to ``gamma_0 * (1 - W / T) ** p``; after warm-up it is
    continuous. See the module docstring for the symbols and for what ``t`` counts.

    Example, ResNet-50 with LARS at 8K (5 warm-up epochs of 156 steps, 90 epochs):

    ```python
    schedule = PolynomialDecayWithWarmup(
        initial_learning_rate=0.6, decay_steps=90 * 156, warmup_steps=5 * 156
    )
    optimizer = LARS(learning_rate=schedule, momentum=0.9, weight_decay=1e-4)
    ```

    Args:
        initial_learning_rate: ``gamma_0``, the learning rate reached at the end of warm-up.
        decay_steps: ``T``, the step at which the decay reaches ``end_learning_rate``.
        power: ``p``, the power of the polynomial.
        end_learning_rate: ``gamma_end``, the rate at and after ``T``.
        warmup_steps: ``W``; 0 disables the warm-up.
        warmup_start_lr: ``r_0``, the rate of step 0 of the warm-up.
        warmup_shape: ``"linear"`` or ``"quadratic"``.
        decay_after_warmup: Decay over ``T - W`` steps starting at ``W`` instead of over the
            full horizon ``T`` starting at 0.
    """

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        power: float = 2.0,
        end_learning_rate: float = 0.0,
        warmup_steps: int = 0,
        warmup_start_lr: float = 0.0,
        warmup_shape: str = "linear",
        decay_after_warmup: bool = False,
    ):
        super().__init__()
        self.initial_learning_rate = _check_non_negative(
            "initial_learning_rate", initial_learning_rate
        )
        self.decay_steps = _check_int("decay_steps", decay_steps, minimum=1)
        self.power = _check_real("power", power)
        if self.power <= 0:
            raise ValueError(f"Argument `power` must be > 0. Received: power={power}")
        self.end_learning_rate = _check_non_negative("end_learning_rate", end_learning_rate)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, minimum=0)
        if self.warmup_steps > self.decay_steps:
            raise ValueError(
                "Argument `warmup_steps` must be <= `decay_steps`. "
                f"Received: warmup_steps={warmup_steps}, decay_steps={decay_steps}"
            )
        self.warmup_start_lr = _check_non_negative("warmup_start_lr", warmup_start_lr)
        self.warmup_shape = _check_warmup_shape(warmup_shape)
        if not isinstance(decay_after_warmup, bool):
            raise ValueError(
                "Argument `decay_after_warmup` must be a bool. "
                f"Received: decay_after_warmup={decay_after_warmup!r}"
            )
        self.decay_after_warmup = decay_after_warmup

    def __call__(self, step):
        t = ops.cast(step, "float32")
        total = float(self.decay_steps)
        if self.decay_after_warmup:
            start = float(self.warmup_steps)
            # max(..., 1) only guards W == T, where the clamp below decides every t >= W.
            progress = (t - start) / max(total - start, 1.0)
        else:
            progress = t / total
        progress = ops.where(t >= total, 1.0, ops.clip(progress, 0.0, 1.0))
        decayed = self.end_learning_rate + (
            self.initial_learning_rate - self.end_learning_rate
        ) * ops.power(1.0 - progress, self.power)
        return _with_warmup(
            t,
            decayed,
            self.initial_learning_rate,
            self.warmup_steps,
            self.warmup_start_lr,
            self.warmup_shape,
        )

    def get_config(self) -> dict:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "power": self.power,
            "end_learning_rate": self.end_learning_rate,
            "warmup_steps": self.warmup_steps,
            "warmup_start_lr": self.warmup_start_lr,
            "warmup_shape": self.warmup_shape,
            "decay_after_warmup": self.decay_after_warmup,
        }


@keras.saving.register_keras_serializable(package="lars_tf")
class MultiStepWithWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Step decay after a warm-up (Goyal et al. 2017, "ImageNet in 1 hour").

    For ``t < W`` the warm-up of `PolynomialDecayWithWarmup` (linear or quadratic from ``r_0``
    to ``gamma_0``); for ``t >= W``::

        lr = gamma_0 * decay_rate ** (number of boundaries b with b <= t)

    so the rate drops on the step equal to a boundary. With no boundaries this is a warm-up
    followed by a constant rate. See the module docstring for the symbols.

    Example, Goyal's ResNet-50 recipe (0.1 per 256 images, 5 warm-up epochs, x0.1 at epochs
    30, 60 and 80), with ``steps`` optimizer steps per epoch:

    ```python
    schedule = MultiStepWithWarmup(
        linear_scaling(0.1, global_batch),
        boundaries=[30 * steps, 60 * steps, 80 * steps],
        warmup_steps=5 * steps,
    )
    ```

    Args:
        initial_learning_rate: ``gamma_0``, the rate at the end of warm-up.
        boundaries: Strictly increasing optimizer steps, each ``>= warmup_steps``, at which the
            rate is multiplied by ``decay_rate``.
        decay_rate: Factor applied at each boundary.
        warmup_steps: ``W``; 0 disables the warm-up.
        warmup_start_lr: ``r_0``, the rate of step 0 of the warm-up.
        warmup_shape: ``"linear"`` or ``"quadratic"``.
    """

    def __init__(
        self,
        initial_learning_rate: float,
        boundaries: Sequence[int],
        decay_rate: float = 0.1,
        warmup_steps: int = 0,
        warmup_start_lr: float = 0.0,
        warmup_shape: str = "linear",
    ):
        super().__init__()
        self.initial_learning_rate = _check_non_negative(
            "initial_learning_rate", initial_learning_rate
        )
        if isinstance(boundaries, str) or not isinstance(boundaries, Sequence):
            raise ValueError(
                f"Argument `boundaries` must be a list of ints. Received: boundaries={boundaries!r}"
            )
        self.boundaries = [_check_int("boundaries", b, minimum=0) for b in boundaries]
        if any(a >= b for a, b in zip(self.boundaries, self.boundaries[1:], strict=False)):
            raise ValueError(
                "Argument `boundaries` must be strictly increasing. "
                f"Received: boundaries={list(boundaries)}"
            )
        self.decay_rate = _check_real("decay_rate", decay_rate)
        if self.decay_rate <= 0:
            raise ValueError(
                f"Argument `decay_rate` must be > 0. Received: decay_rate={decay_rate}"
            )
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, minimum=0)
        if self.boundaries and self.boundaries[0] < self.warmup_steps:
            raise ValueError(
                "Argument `boundaries` must all be >= `warmup_steps`. "
                f"Received: boundaries={list(boundaries)}, warmup_steps={warmup_steps}"
            )
        self.warmup_start_lr = _check_non_negative("warmup_start_lr", warmup_start_lr)
        self.warmup_shape = _check_warmup_shape(warmup_shape)

    def __call__(self, step):
        # Count boundaries in integers: float32 steps stop being exact past 2**24.
        t_int = ops.cast(step, "int64")
        boundaries = ops.convert_to_tensor(self.boundaries, dtype="int64")
        passed = ops.sum(ops.cast(ops.greater_equal(t_int, boundaries), "float32"))
        decayed = self.initial_learning_rate * ops.power(self.decay_rate, passed)
        return _with_warmup(
            ops.cast(step, "float32"),
            decayed,
            self.initial_learning_rate,
            self.warmup_steps,
            self.warmup_start_lr,
            self.warmup_shape,
        )

    def get_config(self) -> dict:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "boundaries": list(self.boundaries),
            "decay_rate": self.decay_rate,
            "warmup_steps": self.warmup_steps,
            "warmup_start_lr": self.warmup_start_lr,
            "warmup_shape": self.warmup_shape,
        }


@keras.saving.register_keras_serializable(package="lars_tf")
class PerUpdateSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Evaluates a schedule at the optimizer update, under Keras' gradient accumulation.

    With ``gradient_accumulation_steps=k``, Keras evaluates an optimizer's schedule at its
    micro-batch counter, so update ``u`` (made on micro-batch ``u * k + k - 1``) would get
    ``schedule(u * k + k - 1)``: a warm-up and a decay ``k`` times too fast, and no update at
    the warm-up's start rate. This wrapper gives update ``u`` the rate ``schedule(u)``, as the
    authors' Caffe solver with ``iter_size`` does, by evaluating ``schedule(step // k)``.

    `lars_tf.LARS` already counts updates, so it needs no wrapper (a wrapped schedule would
    advance k times too slowly); this is for Keras' own optimizers:

    ```python
    optimizer = keras.optimizers.SGD(
        learning_rate=PerUpdateSchedule(schedule, gradient_accumulation_steps=4),
        momentum=0.9,
        gradient_accumulation_steps=4,
    )
    ```

    Args:
        schedule: A `keras.optimizers.schedules.LearningRateSchedule` in optimizer updates.
        gradient_accumulation_steps: k, the optimizer's own ``gradient_accumulation_steps``.
    """

    def __init__(
        self,
        schedule: keras.optimizers.schedules.LearningRateSchedule,
        gradient_accumulation_steps: int,
    ):
        super().__init__()
        if not isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            raise ValueError(
                "Argument `schedule` must be a LearningRateSchedule. "
                f"Received: schedule={schedule!r}"
            )
        self.schedule = schedule
        self.gradient_accumulation_steps = _check_int(
            "gradient_accumulation_steps", gradient_accumulation_steps, minimum=1
        )

    def __call__(self, step):
        return self.schedule(ops.floor_divide(step, self.gradient_accumulation_steps))

    def get_config(self) -> dict:
        return {
            "schedule": keras.optimizers.schedules.serialize(self.schedule),
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
        }

    @classmethod
    def from_config(cls, config: dict) -> PerUpdateSchedule:
        config = dict(config)
        config["schedule"] = keras.optimizers.schedules.deserialize(config["schedule"])
        return cls(**config)


def available() -> list[str]:
    """The names `build` takes."""
    return list(_BUILDERS)


def build(
    name: str, initial_learning_rate: float, *, total_steps: int, **options
) -> keras.optimizers.schedules.LearningRateSchedule:
    """A schedule by name, as `lars_tf.models.build` builds a model (train.py's `--lr_schedule`).

    Args:
        name: "poly" (`PolynomialDecayWithWarmup`, decaying over ``T = total_steps``) or
            "multistep" (`MultiStepWithWarmup`, which has no horizon and ignores it).
        initial_learning_rate: ``gamma_0``.
        total_steps: Optimizer updates of the run.
        **options: The schedule's other arguments (``warmup_steps``, ``power``,
            ``boundaries``, ...).

    Raises:
        ValueError: An unknown name (and each schedule's own argument checks).
    """
    if name not in _BUILDERS:
        raise ValueError(f"schedule must be one of {available()}, got {name!r}")
    return _BUILDERS[name](initial_learning_rate, total_steps, **options)


_BUILDERS = {
    "poly": lambda lr, total_steps, **options: PolynomialDecayWithWarmup(
        lr, decay_steps=total_steps, **options
    ),
    "multistep": lambda lr, total_steps, **options: MultiStepWithWarmup(lr, **options),
}


def _with_warmup(t, after_warmup, target, warmup_steps, start, shape):
    """The warm-up ramp from ``start`` to ``target`` where ``t < W``, else ``after_warmup``."""
    if warmup_steps == 0:
        return ops.cast(after_warmup, "float32")
    fraction = ops.clip(t / float(warmup_steps), 0.0, 1.0)
    if shape == "quadratic":
        fraction = fraction * fraction
    ramp = start + (target - start) * fraction
    return ops.cast(ops.where(t < float(warmup_steps), ramp, after_warmup), "float32")


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Argument `{name}` must be a number. Received: {name}={value!r}")
    return float(value)


def _check_non_negative(name: str, value) -> float:
    value_float = _check_real(name, value)
    if not value_float >= 0:  # also rejects NaN
        raise ValueError(f"Argument `{name}` must be >= 0. Received: {name}={value!r}")
    return value_float


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"Argument `{name}` must be an int. Received: {name}={value!r}")
    if value < minimum:
        raise ValueError(f"Argument `{name}` must be >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _check_warmup_shape(shape) -> str:
    if shape not in _WARMUP_SHAPES:
        raise ValueError(
            f"Argument `warmup_shape` must be one of {_WARMUP_SHAPES}. "
            f"Received: warmup_shape={shape!r}"
        )
    return shape
