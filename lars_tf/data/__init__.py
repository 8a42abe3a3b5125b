"""Input pipelines: ImageNet TFRecords, tensorflow-datasets, JPEG folders and synthetic data.

`build_dataset(source, split=..., batch_size=..., image_size=..., is_training=...)` returns
an `InputSpec` whose `dataset` yields batched `(images, int32 labels)`; see
`lars_tf.data.pipeline`. The ILSVRC-2012 TFRecord schema and label conventions are in
`lars_tf.data.imagenet`, the converter's engine in `lars_tf.data.convert`.
"""

from lars_tf.data.imagenet import imagenet_synsets
from lars_tf.data.pipeline import SOURCES, InputSpec, build_dataset
from lars_tf.data.preprocessing import (
    CIFAR10_MEAN_RGB,
    CIFAR10_STD_RGB,
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_RGB,
    MODES,
    ImagePreprocessor,
    default_resize_size,
)

__all__ = [
    "CIFAR10_MEAN_RGB",
    "CIFAR10_STD_RGB",
    "IMAGENET_MEAN_RGB",
    "IMAGENET_STD_RGB",
    "MODES",
    "SOURCES",
    "ImagePreprocessor",
    "InputSpec",
    "build_dataset",
    "default_resize_size",
    "imagenet_synsets",
]
