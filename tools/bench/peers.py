"""The same optimizer update in the peers' own code: optax (JAX), timm (PyTorch), TF Model Garden.

Each `*_variants` function builds its framework's copy of the weights, gradients and optimizer
state from the same NumPy arrays and returns `{name: call}`, where one call applies one update
and returns when it is done. A peer that is not installed (they are optional extras) raises
`PeerUnavailable` with the reason, which the report records instead of a time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# What stands in the way of TF Model Garden beside Keras 3 (tried in a throwaway venv).
MODEL_GARDEN_NOTE = (
    "tf-models-official 2.20 requires tensorflow~=2.20.0 and tensorflow-text~=2.20 (this "
    "environment has TensorFlow 2.21), and its `official.modeling.optimization` package "
    "imports gin-config and other extras; its LARS itself needs only tf-keras"
)


class PeerUnavailable(Exception):
    """The peer cannot run here; the message says why."""


def _import_without_package_init(module: str) -> types.ModuleType:
    """Imports `module` (e.g. "timm.optim.lars") from its installed distribution without
    running the `__init__.py` of its parent packages, which may import what is not installed
    (timm's imports torchvision; Model Garden's imports gin). The module's own code runs as
    shipped."""
    root = module.split(".")[0]
    spec = importlib.util.find_spec(root)
    if spec is None or not spec.submodule_search_locations:
        raise PeerUnavailable(f"{root} is not installed")
    base = list(spec.submodule_search_locations)[0]
    parts = module.split(".")
    for depth in range(1, len(parts)):
        name = ".".join(parts[:depth])
        if name in sys.modules:
            continue
        stub = types.ModuleType(name)
        stub.__path__ = [os.path.join(base, *parts[1:depth])]
        sys.modules[name] = stub
    return importlib.import_module(module)


def optax_variants(
    weights: Sequence[np.ndarray], grads: Sequence[np.ndarray], hyper: dict[str, float]
) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """`optax.lars` and `optax.sgd(momentum)` under `jax.jit` on the CPU, updating in place
    (the parameters and state are donated, as a training loop would)."""
    try:
        import jax
        import optax
    except ImportError as error:
        raise PeerUnavailable(f"optax/JAX not installed ({error})") from error

    grads_device = [jax.device_put(g) for g in grads]

    def make(transform):
        params = [jax.device_put(w.copy()) for w in weights]
        state = transform.init(params)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(params, state, grads):
            updates, state = transform.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        box = [params, state]

        def run():
            box[0], box[1] = step(box[0], box[1], grads_device)
            jax.block_until_ready(box[0])

        return run

    variants = {
        "optax lars": make(
            optax.lars(
                hyper["learning_rate"],
                weight_decay=hyper["weight_decay"],
                trust_coefficient=hyper["trust_coefficient"],
                momentum=hyper["momentum"],
            )
        ),
        "optax sgd": make(optax.sgd(hyper["learning_rate"], momentum=hyper["momentum"])),
    }
    notes = {
        "optax lars": "jax.jit (XLA:CPU); decay folded into the gradient norm (rule G)",
        "optax sgd": "jax.jit (XLA:CPU)",
    }
    return variants, notes


def _timm_lars() -> tuple[Any, str]:
    try:
        from timm.optim import Lars

        return Lars, "timm.optim.Lars"
    except ImportError as error:
        if importlib.util.find_spec("timm") is None:
            raise PeerUnavailable("timm not installed") from error
        # `import timm` needs torchvision (no CPU build here); lars.py itself needs torch only.
        module = _import_without_package_init("timm.optim.lars")
        return module.Lars, f"timm/optim/lars.py loaded without timm/__init__ ({error})"


def timm_variants(
    weights: Sequence[np.ndarray],
    grads: Sequence[np.ndarray],
    hyper: dict[str, float],
    threads: int,
) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """timm's `Lars` and `torch.optim.SGD(momentum)`, eager PyTorch on the CPU."""
    try:
        import torch
    except ImportError as error:
        raise PeerUnavailable(f"torch not installed ({error})") from error
    lars_class, how = _timm_lars()
    torch.set_num_threads(threads)
    # Only settable before PyTorch's first parallel work; when it was, it stays as it was.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)

    def make(factory):
        params = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in weights]
        for param, grad in zip(params, grads, strict=True):
            param.grad = torch.from_numpy(grad.copy())
        optimizer = factory(params)
        return optimizer.step

    variants = {
        "timm Lars": make(
            lambda p: lars_class(
                p,
                lr=hyper["learning_rate"],
                momentum=hyper["momentum"],
                weight_decay=hyper["weight_decay"],
                trust_coeff=hyper["trust_coefficient"],
            )
        ),
        "torch SGD": make(
            lambda p: torch.optim.SGD(p, lr=hyper["learning_rate"], momentum=hyper["momentum"])
        ),
    }
    notes = {
        "timm Lars": f"eager PyTorch {torch.__version__}; {how}; LR outside momentum (rule P')",
        "torch SGD": f"eager PyTorch {torch.__version__}, default (for-loop) CPU path",
    }
    return variants, notes


def _model_garden_lars() -> tuple[Any, str]:
    try:
        import tf_keras  # noqa: F401
    except ImportError as error:
        raise PeerUnavailable(f"tf-keras not installed; {MODEL_GARDEN_NOTE}") from error
    try:
        from official.modeling.optimization.lars import LARS

        return LARS, "official.modeling.optimization.lars.LARS"
    except ImportError as error:
        if importlib.util.find_spec("official") is None:
            raise PeerUnavailable(
                f"tf-models-official not installed; {MODEL_GARDEN_NOTE}"
            ) from error
        module = _import_without_package_init("official.modeling.optimization.lars")
        return module.LARS, f"official/modeling/optimization/lars.py loaded alone ({error})"


def model_garden_variants(
    weights: Sequence[np.ndarray], grads: Sequence[np.ndarray], hyper: dict[str, float]
) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """TF Model Garden's Keras-2 LARS (tf-keras), in a `tf.function`, with and without XLA."""
    lars_class, how = _model_garden_lars()
    import tensorflow as tf

    grads_tf = [tf.constant(g) for g in grads]

    def make(jit_compile):
        variables = [tf.Variable(w.copy()) for w in weights]
        optimizer = lars_class(
            learning_rate=hyper["learning_rate"],
            momentum=hyper["momentum"],
            weight_decay_rate=hyper["weight_decay"],
            eeta=hyper["trust_coefficient"],
        )

        def update():
            optimizer.apply_gradients(zip(grads_tf, variables, strict=True))

        return tf.function(update, jit_compile=jit_compile)

    variants = {"Model Garden LARS, XLA": make(True), "Model Garden LARS": make(False)}
    notes = {name: f"{how}; decay folded into the gradient norm (rule G)" for name in variants}
    return variants, notes
