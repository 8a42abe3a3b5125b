"""Part 2: the training step on the CPU, LARS against SGD, and gradient accumulation.

For each model, five variants run interleaved on the same fixed batch, all from the same
initial weights: `Model.train_on_batch` with LARS (its default: the update compiled by XLA
inside Keras' uncompiled CPU step), with SGD(momentum), with LARS and
`gradient_accumulation_steps=k` (one timed sample is k micro-batches, i.e. exactly one
update), with LARS(jit_compile=False) (every `keras.ops` call of the update its own kernel),
and the forward and backward pass alone (the compute that part 5 scales).
"""

from __future__ import annotations

import gc
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lars_tf import models
from lars_tf.optimizer import LARS

from . import environment, timing
from .optimizer_update import HYPER
from .workloads import TrainCase, Workload

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SGD_LR = 0.01


def _build(case: TrainCase) -> keras.Model:
    return models.build(
        case.model,
        num_classes=case.num_classes,
        input_shape=(case.image_size, case.image_size, 3),
        **case.options,
    )


def _compiled(case: TrainCase, weights: list[np.ndarray], optimizer) -> keras.Model:
    model = _build(case)
    model.set_weights(weights)
    model.compile(optimizer=optimizer, loss=LOSS)
    return model


def _lars(**kwargs: Any) -> LARS:
    return LARS(
        HYPER["learning_rate"],
        momentum=HYPER["momentum"],
        weight_decay=HYPER["weight_decay"],
        trust_coefficient=HYPER["trust_coefficient"],
        **kwargs,
    )


def measure_case(case: TrainCase, workload: Workload) -> dict[str, Any]:
    """Times one model's step variants; see the module docstring."""
    steps = workload.accumulation_steps
    rng = np.random.default_rng(0)
    images = tf.constant(
        rng.standard_normal((case.batch, case.image_size, case.image_size, 3)), tf.float32
    )
    labels = tf.constant(rng.integers(0, case.num_classes, case.batch), tf.int32)
    reference = _build(case)
    weights = reference.get_weights()
    trainable = sum(int(np.prod(v.shape)) for v in reference.trainable_variables)
    del reference

    lars_model = _compiled(case, weights, _lars())
    sgd_model = _compiled(case, weights, keras.optimizers.SGD(SGD_LR, momentum=HYPER["momentum"]))
    accumulating = _compiled(case, weights, _lars(gradient_accumulation_steps=steps))
    uncompiled = _compiled(case, weights, _lars(jit_compile=False))

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            loss = LOSS(labels, sgd_model(images, training=True))
        return tape.gradient(loss, sgd_model.trainable_variables)

    def trainer(model):
        return lambda: model.train_on_batch(images, labels)

    names = (
        "LARS",
        "SGD",
        f"LARS, accumulation {steps}",
        "forward+backward",
        "LARS, jit_compile=False",
    )
    variants = dict(
        zip(
            names,
            (
                trainer(lars_model),
                trainer(sgd_model),
                trainer(accumulating),
                forward_backward,
                trainer(uncompiled),
            ),
            strict=True,
        )
    )
    load_before = environment.load_average()
    # k steps per sample and k warm-up calls keep every accumulation cycle inside one sample.
    samples = timing.run_interleaved(
        variants,
        repeats=workload.train_rounds,
        warmup=steps,
        inner={names[0]: steps, names[1]: steps, names[2]: steps, names[3]: 1, names[4]: steps},
    )
    result = {
        "model": case.model,
        "options": case.options,
        "image_size": case.image_size,
        "batch": case.batch,
        "num_classes": case.num_classes,
        "trainable_parameters": trainable,
        "role": case.role,
        "reference_image_size": case.reference_image_size,
        "accumulation_steps": steps,
        "jit_compile": bool(lars_model.jit_compile),
        "load_average_before": load_before,
        "load_average_after": environment.load_average(),
        "variants": {name: {"samples_s": s, **timing.summarize(s)} for name, s in samples.items()},
    }
    step_ratio = timing.paired_ratio(samples[names[0]], samples[names[1]])
    # Images per second at the same micro-batch: accumulating over plain is t(plain) / t(acc).
    throughput_ratio = timing.paired_ratio(samples[names[0]], samples[names[2]])
    compute = samples[names[3]]
    result["ratios"] = {
        "LARS / SGD step time": step_ratio,
        f"images/s, accumulation {steps} / 1": throughput_ratio,
        "forward+backward / LARS step": timing.paired_ratio(compute, samples[names[0]]),
        "LARS, jit_compile=False / SGD step time": timing.paired_ratio(
            samples[names[4]], samples[names[1]]
        ),
    }
    result["compute_s_per_image"] = timing.summarize(compute)["median"] / case.batch
    result["targets"] = [
        {
            "part": 2,
            "target": f"{case.model} {case.image_size}px: LARS / SGD step time <= 1.03",
            "value": step_ratio["median"],
            "met": step_ratio["median"] <= 1.03,
        },
        {
            "part": 2,
            "target": f"{case.model} {case.image_size}px: images/s accumulation {steps} / 1"
            " >= 0.95",
            "value": throughput_ratio["median"],
            "met": throughput_ratio["median"] >= 0.95,
        },
    ]
    return result


def run(workload: Workload) -> dict[str, Any]:
    """Measures part 2 for every case of the workload."""
    cases = []
    for case in workload.train_cases:
        cases.append(measure_case(case, workload))
        # Free the case's models (AlexNet's three copies hold about 3 GB) before the next.
        keras.backend.clear_session()
        gc.collect()
    return {
        "sgd_learning_rate": SGD_LR,
        "cases": cases,
        "targets": [t for case in cases for t in case["targets"]],
    }
