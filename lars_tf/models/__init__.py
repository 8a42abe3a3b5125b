"""The models of the LARS paper, and CPU-sized twins, looked up by name.

    model = lars_tf.models.build("alexnet_bn", num_classes=1000, dtype="mixed_float16")

| name               | builder   | input | trainable parameters            |
| ------------------ | --------- | ----- | ------------------------------- |
| `alexnet`          | `alexnet` | 227   | 60,965,224 (1,000 classes)      |
| `alexnet_bn`       | `alexnet` | 227   | 60,965,224 (1,000 classes)      |
| `resnet50`         | `resnet`  | 224   | 25,557,032 (1,000 classes)      |
| `alexnet_bn_small` | `alexnet` | 32    | 1,796,458 (10 classes, 32 px)   |
| `resnet20_cifar`   | `resnet`  | 32    | 269,722 (10 classes)            |
| `resnet32_cifar`   | `resnet`  | 32    | 464,154 (10 classes)            |

Every name is a set of default options of one of two builders (`alexnet.alexnet`,
`resnet.resnet`); options given to `build` override them, e.g.
`build("resnet20_cifar", num_classes=10, shortcut="B")`. Options every model takes:
`input_shape`, `data_format`, `dtype` (a dtype policy; logits are float32 whatever it is),
`dropout`, `bn_momentum`, `bn_epsilon`, `name`. Under TensorFlow, "channels_first" needs a
GPU or oneDNN's CPU kernels (`TF_ENABLE_ONEDNN_OPTS=1` before TensorFlow is imported): without
either, building one raises a ValueError that says so. The AlexNet family also takes
`width_multiplier`, `groups`, `normalization` and `conv1_*`; the ResNets
`zero_init_residual`, `shortcut`, `stage_blocks`, `stage_filters`, `block` and `stem`.
Models output logits: use losses with `from_logits=True`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import keras

from lars_tf.models import _common
from lars_tf.models.alexnet import alexnet
from lars_tf.models.layers import LocalResponseNormalization, ZeroPadShortcut
from lars_tf.models.resnet import resnet

__all__ = [
    "LocalResponseNormalization",
    "ZeroPadShortcut",
    "alexnet",
    "available",
    "build",
    "default_image_size",
    "resnet",
]


@dataclasses.dataclass(frozen=True)
class _Entry:
    builder: Callable[..., keras.Model]
    image_size: int
    defaults: Mapping[str, Any]


_CIFAR_RESNET = MappingProxyType(
    {"stage_filters": (16, 32, 64), "block": "basic", "stem": "cifar", "shortcut": "A"}
)

_REGISTRY: dict[str, _Entry] = {
    "alexnet": _Entry(alexnet, 227, MappingProxyType({"normalization": "lrn"})),
    "alexnet_bn": _Entry(alexnet, 227, MappingProxyType({"normalization": "batch_norm"})),
    "resnet50": _Entry(resnet, 224, MappingProxyType({"stage_blocks": (3, 4, 6, 3)})),
    "alexnet_bn_small": _Entry(
        alexnet,
        32,
        MappingProxyType(
            {
                "normalization": "batch_norm",
                "width_multiplier": 0.25,
                # A 32 px image cannot afford AlexNet's 11x11/4 conv1 (it would leave 6x6).
                "conv1_kernel_size": 5,
                "conv1_strides": 1,
                "conv1_padding": "same",
            }
        ),
    ),
    "resnet20_cifar": _Entry(
        resnet, 32, MappingProxyType({**_CIFAR_RESNET, "stage_blocks": (3, 3, 3)})
    ),
    "resnet32_cifar": _Entry(
        resnet, 32, MappingProxyType({**_CIFAR_RESNET, "stage_blocks": (5, 5, 5)})
    ),
}


def available() -> list[str]:
    """Names `build` accepts, paper models first."""
    return list(_REGISTRY)


def default_image_size(name: str) -> int:
    """Side of the square images the model `name` is defined for (227, 224 or 32).

    Raises:
        ValueError: If `name` is not registered.
    """
    return _lookup(name).image_size


def build(name: str, num_classes: int = 1000, **options: Any) -> keras.Model:
    """Builds the registered model `name`, uncompiled, outputting logits.

    Args:
        name: One of `available()`.
        num_classes: Number of output logits.
        **options: Keyword arguments of the model's builder (`alexnet.alexnet` or
            `resnet.resnet`), overriding the registered defaults. `input_shape` defaults
            to a square RGB image of `default_image_size(name)` in `data_format`.

    Returns:
        A functional `keras.Model` named `name` (unless `name=` is given in options).

    Raises:
        ValueError: If `name` is not registered, an option is unknown to its builder, an
            option's value is out of range, or "channels_first" cannot run here.
    """
    entry = _lookup(name)
    accepted = set(inspect.signature(entry.builder).parameters) - {"num_classes"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for model {name!r}; it accepts {sorted(accepted)}"
        )
    kwargs = {**entry.defaults, "name": name, **options}
    if kwargs.get("input_shape") is None:
        data_format = _common.resolve_data_format(kwargs.get("data_format"))
        kwargs["input_shape"] = _common.resolve_input_shape(None, entry.image_size, data_format)
    return entry.builder(num_classes, **kwargs)


def _lookup(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; available models: {available()}") from None
