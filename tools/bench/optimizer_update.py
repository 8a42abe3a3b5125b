"""Part 1: one optimizer update of a model's trainable variables, LARS against SGD and peers.

Every variant updates its own copy of the same weights with the same gradients (float32,
the shapes of `lars_tf.models.build(model)`'s trainable variables), interleaved round by
round. The memory-traffic floor: SGD with momentum reads w, g, v and writes w, v; LARS also
reads w and g for the two norms, about 1.4x the traffic unless the norms come from cache.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lars_tf import models
from lars_tf.optimizer import LARS, _l2_norm

from . import environment, peers, timing
from .workloads import Workload

# The LARS setting of every variant (the paper's AlexNet/ResNet values); SGD uses lr/momentum.
HYPER = {"learning_rate": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "trust_coefficient": 1e-3}
LARS_XLA, LARS_PLAIN = "lars_tf LARS, XLA", "lars_tf LARS"
LARS_UNCOMPILED = "lars_tf LARS, jit_compile=False"
SGD_XLA, SGD_PLAIN = "Keras SGD, XLA", "Keras SGD"
NORMS_XLA = "norms of w and g alone, XLA"


def variable_shapes(model_name: str, **options: Any) -> list[tuple[int, ...]]:
    """Shapes of the trainable variables of `lars_tf.models.build(model_name, **options)`."""
    model = models.build(model_name, **options)
    shapes = [tuple(int(d) for d in v.shape) for v in model.trainable_variables]
    del model
    keras.backend.clear_session()
    return shapes


def make_tensors(
    shapes: list[tuple[int, ...]], seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Weights (about He-scaled) and gradients (1e-3 scale) as float32 arrays."""
    rng = np.random.default_rng(seed)
    weights = [(rng.standard_normal(s) * 0.05).astype(np.float32) for s in shapes]
    grads = [(rng.standard_normal(s) * 1e-3).astype(np.float32) for s in shapes]
    return weights, grads


def _keras_update(optimizer, weights, grads_tf, jit_compile: bool):
    variables = [keras.Variable(w.copy()) for w in weights]
    optimizer.build(variables)
    return tf.function(lambda: optimizer.apply(grads_tf, variables), jit_compile=jit_compile)


def lars_tf_variants(weights, grads) -> dict[str, Any]:
    """lars_tf's LARS and Keras' SGD(momentum), each in a `tf.function` with and without XLA."""
    grads_tf = [tf.constant(g) for g in grads]

    def lars(**options):
        return LARS(
            HYPER["learning_rate"],
            momentum=HYPER["momentum"],
            weight_decay=HYPER["weight_decay"],
            trust_coefficient=HYPER["trust_coefficient"],
            **options,
        )

    def sgd():
        return keras.optimizers.SGD(HYPER["learning_rate"], momentum=HYPER["momentum"])

    weight_variables = [tf.Variable(w) for w in weights]
    total = tf.Variable(0.0)

    @tf.function(jit_compile=True)
    def norms():
        # The one pass LARS adds to SGD's loops: ||w|| and ||g|| of every variable.
        total.assign(
            tf.add_n(
                [_l2_norm(w) + _l2_norm(g) for w, g in zip(weight_variables, grads_tf, strict=True)]
            )
        )

    return {
        LARS_XLA: _keras_update(lars(), weights, grads_tf, True),
        SGD_XLA: _keras_update(sgd(), weights, grads_tf, True),
        # Keras' default on a CPU: the tf.function is not compiled; LARS compiles its update.
        LARS_PLAIN: _keras_update(lars(), weights, grads_tf, False),
        LARS_UNCOMPILED: _keras_update(lars(jit_compile=False), weights, grads_tf, False),
        SGD_PLAIN: _keras_update(sgd(), weights, grads_tf, False),
        NORMS_XLA: norms,
    }


def run(workload: Workload, *, threads: int, with_peers: bool = True) -> dict[str, Any]:
    """Measures part 1; returns the samples, summaries, ratios and skipped peers."""
    shapes = variable_shapes(workload.update_model, **workload.update_options)
    weights, grads = make_tensors(shapes)
    parameters = sum(math.prod(s) for s in shapes)
    variants = lars_tf_variants(weights, grads)
    notes = {
        LARS_XLA: "tf.function(jit_compile=True); paper rule (P), coupled weight decay",
        LARS_PLAIN: "tf.function without XLA (Keras' default on a CPU); LARS compiles its "
        "update with XLA itself (its default, jit_compile=True)",
        LARS_UNCOMPILED: "tf.function, no XLA anywhere: every keras.ops call its own kernel",
        NORMS_XLA: "tf.function(jit_compile=True): ||w|| and ||g|| of every variable, nothing "
        "else (lars_tf's one-pass blocked norm)",
        SGD_XLA: "tf.function(jit_compile=True), no weight decay",
        SGD_PLAIN: "tf.function, no XLA, no weight decay",
    }
    skipped = {}
    if with_peers:
        for peer, build in (
            ("optax", lambda: peers.optax_variants(weights, grads, HYPER)),
            ("timm", lambda: peers.timm_variants(weights, grads, HYPER, threads)),
            ("TF Model Garden", lambda: peers.model_garden_variants(weights, grads, HYPER)),
        ):
            try:
                peer_variants, peer_notes = build()
            except peers.PeerUnavailable as error:
                skipped[peer] = str(error)
                continue
            try:
                for call in peer_variants.values():
                    call()  # a peer that breaks on this stack is recorded, not fatal
            except Exception as error:
                skipped[peer] = f"failed on its first update: {type(error).__name__}: {error}"
                continue
            variants.update(peer_variants)
            notes.update(peer_notes)
    else:
        skipped["peers"] = "not measured (--no-peers)"
    load_before = environment.load_average()
    samples = timing.run_interleaved(
        variants, repeats=workload.update_repeats, warmup=workload.update_warmup
    )
    result: dict[str, Any] = {
        "model": workload.update_model,
        "tensors": len(shapes),
        "parameters": parameters,
        "bytes_per_tensor_set": parameters * 4,
        "dtype": "float32",
        "hyperparameters": HYPER,
        "load_average_before": load_before,
        "load_average_after": environment.load_average(),
        "variants": {
            name: {"note": notes.get(name, ""), "samples_s": s, **timing.summarize(s)}
            for name, s in samples.items()
        },
        "skipped_peers": skipped,
    }
    ratios = {
        "lars_tf LARS / Keras SGD, XLA": timing.paired_ratio(samples[LARS_XLA], samples[SGD_XLA]),
        "lars_tf LARS / Keras SGD, Keras' CPU default (LARS compiles its update)": (
            timing.paired_ratio(samples[LARS_PLAIN], samples[SGD_PLAIN])
        ),
        "lars_tf LARS / Keras SGD, no XLA anywhere": timing.paired_ratio(
            samples[LARS_UNCOMPILED], samples[SGD_PLAIN]
        ),
        "(Keras SGD, XLA + norms alone) / Keras SGD, XLA: the floor of the exact rule": (
            timing.paired_ratio(
                [a + b for a, b in zip(samples[SGD_XLA], samples[NORMS_XLA], strict=True)],
                samples[SGD_XLA],
            )
        ),
        "norms alone / Keras SGD, XLA": timing.paired_ratio(samples[NORMS_XLA], samples[SGD_XLA]),
    }
    peer_lars = [n for n in samples if n in ("optax lars", "timm Lars") or "Model Garden" in n]
    for name in peer_lars:
        ratios[f"lars_tf LARS, XLA / {name}"] = timing.paired_ratio(
            samples[LARS_XLA], samples[name]
        )
        ratios[f"lars_tf LARS, Keras' CPU default / {name}"] = timing.paired_ratio(
            samples[LARS_PLAIN], samples[name]
        )
    for lars_name, sgd_name in (("optax lars", "optax sgd"), ("timm Lars", "torch SGD")):
        if lars_name in samples and sgd_name in samples:
            ratios[f"{lars_name} / {sgd_name}"] = timing.paired_ratio(
                samples[lars_name], samples[sgd_name]
            )
    result["ratios"] = ratios
    xla_ratio = ratios["lars_tf LARS / Keras SGD, XLA"]["median"]
    targets = [
        {
            "part": 1,
            "target": "LARS / SGD update time with XLA <= 1.25",
            "value": xla_ratio,
            "met": xla_ratio <= 1.25,
        }
    ]
    if peer_lars:
        worst = max(peer_lars, key=lambda n: ratios[f"lars_tf LARS, XLA / {n}"]["median"])
        value = ratios[f"lars_tf LARS, XLA / {worst}"]["median"]
        targets.append(
            {
                "part": 1,
                "target": f"lars_tf (XLA) no slower than any peer LARS (worst: {worst})",
                "value": value,
                "met": value <= 1.0,
            }
        )
    result["targets"] = targets
    return result
