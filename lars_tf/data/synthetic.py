"""Synthetic input for benchmarks: one random batch, made once and repeated.

No files, no decoding, no per-step host work beyond handing the same tensors on, so a
benchmark measures the model and the optimizer. Values have the range of real
preprocessed images (uniform pixels through the same normalisation).
"""

from __future__ import annotations

import math

import tensorflow as tf

from lars_tf.data.preprocessing import ImagePreprocessor

# Example counts of ILSVRC-2012, so synthetic epochs last as long as real ones.
IMAGENET_EXAMPLES = {"train": 1_281_167, "validation": 50_000}


def synthetic_examples(split: str) -> int:
    """ILSVRC-2012's size of `split` (train or validation), the default synthetic size."""
    name = "validation" if split in ("val", "test") else split
    if name not in IMAGENET_EXAMPLES:
        raise ValueError(f"split={split!r} has no default synthetic size; pass num_examples")
    return IMAGENET_EXAMPLES[name]


def synthetic_dataset(
    preprocessor: ImagePreprocessor | None,
    *,
    output_shape: tuple[int, int, int],
    batch_size: int,
    num_classes: int,
    num_examples: int,
    num_shards: int,
    is_training: bool,
    seed: int,
) -> tf.data.Dataset:
    """Batches of `(images, int32 labels)`: endless when training, else one pass.

    Images are `preprocessor.normalize`d random pixels, or uint8 pixels when `preprocessor`
    is None (for a model that normalises its input).

    One pass is `ceil(num_examples / (batch_size * num_shards))` batches per worker.
    """
    # Stateless ops with a fixed seed: the same batch on every run and every worker.
    seeds = tf.random.experimental.stateless_split(tf.constant([seed, 0], tf.int64), 2)
    # Whole pixel values, as decoded images have: uint8 or normalised, the same numbers.
    pixels = tf.random.stateless_uniform(
        (batch_size, *output_shape), seeds[0], minval=0, maxval=256, dtype=tf.int32
    )
    pixels = tf.cast(pixels, tf.uint8)
    images = pixels if preprocessor is None else preprocessor.normalize(pixels)
    labels = tf.random.stateless_uniform(
        (batch_size,), seeds[1], minval=0, maxval=num_classes, dtype=tf.int32
    )
    dataset = tf.data.Dataset.from_tensors((images, labels))
    if is_training:
        return dataset.repeat()
    return dataset.repeat(math.ceil(num_examples / (batch_size * num_shards)))
