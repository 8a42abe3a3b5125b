"""`build_dataset`: one call from a source name to batched `(image, label)` for Keras.

Order of operations (TF Model Garden's ImageNet pipeline): shard by worker before any
shuffle, shuffle files, read files in parallel, shuffle records, repeat (training),
decode and preprocess in parallel, batch (dropping the remainder when training),
prefetch.

Corrupt images: decoding runs inside the parallel map, where a bad image raises; the map
is followed by `ignore_errors()`, which drops that element. To count the drops, every
record is numbered before the map (`enumerate`) and the map keeps the order of its input
(it still runs `num_parallel_calls` images at once), so a gap in the numbers after
`ignore_errors()` is exactly the number of records dropped there. A sequential `scan`
adds the gaps to a `tf.Variable`: per batch when training (one function call per batch,
not per image, in the pipeline's one sequential thread), per image in an evaluation
pass (finite), which ends with a marker record that is never decoded, so corrupt records at
the very end are counted too. A damaged
TFRecord file (bad checksum, truncated) also stops short of crashing: the read error is
counted once and the rest of that file is lost for the pass.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from lars_tf.data import sources, synthetic
from lars_tf.data.preprocessing import IMAGENET_MEAN_RGB, ImagePreprocessor

AUTOTUNE = tf.data.AUTOTUNE
SOURCES = ("tfrecord", "folder", "synthetic", "tfds:<name>")
# Records held for shuffling (TF Model Garden's ImageNet default).
SHUFFLE_BUFFER = 10_000
# Seed used by `deterministic=True` when no seed is given.
DEFAULT_SEED = 0


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A built input pipeline and what the training loop needs to know about it.

    Attributes:
        dataset: batched `(images NHWC, int32 labels)`; endless when training.
        num_examples: examples in the whole split, before sharding.
        num_classes: number of classes.
        class_names: class names by label, when the source knows them.
        image_shape: `(height, width, channels)` of one image.
        batch_size: the per-worker batch of `dataset`.
    """

    dataset: tf.data.Dataset
    num_examples: int
    num_classes: int
    class_names: tuple[str, ...] | None
    image_shape: tuple[int, int, int]
    batch_size: int
    _corrupt: tf.Variable = dataclasses.field(repr=False)

    def steps_per_epoch(self, global_batch_size: int, drop_remainder: bool = True) -> int:
        """Optimizer steps in one epoch of the split at `global_batch_size` examples per step.

        Args:
            global_batch_size: examples per step over all workers (and accumulation steps).
            drop_remainder: floor (training drops the last partial batch) or ceil.
        """
        if not (isinstance(global_batch_size, int) and global_batch_size > 0):
            raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
        steps = self.num_examples // global_batch_size
        if not drop_remainder and self.num_examples % global_batch_size:
            steps += 1
        if steps == 0:
            raise ValueError(
                f"global_batch_size={global_batch_size} exceeds the {self.num_examples} "
                "examples of the split: an epoch would have no step"
            )
        return steps

    def corrupt_count(self) -> int:
        """Images skipped as undecodable so far by this worker (over all passes)."""
        return int(self._corrupt.numpy())


def _sentinel(element_spec: Any) -> tf.data.Dataset:
    """One record of the given structure (zeros / empty strings) marking the end of a pass."""
    zeros = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), element_spec)
    return tf.data.Dataset.from_tensors(zeros)


def _open_records(source: str, split: str, data_dir, num_classes, labels_file, shard_options):
    if source == "tfrecord":
        return sources.tfrecord_source(data_dir, split, num_classes=num_classes, **shard_options)
    if source == "folder":
        return sources.folder_source(
            data_dir, split, num_classes=num_classes, labels_file=labels_file, **shard_options
        )
    if source.startswith("tfds:") and len(source) > len("tfds:"):
        return sources.tfds_source(
            source[len("tfds:") :], data_dir, split, num_classes=num_classes, **shard_options
        )
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


def _decode_counting_skips(
    dataset: tf.data.Dataset,
    parse: Callable[..., tuple[tf.Tensor, tf.Tensor, tf.Tensor | None]],
    preprocessor: ImagePreprocessor,
    corrupt: tf.Variable,
    *,
    finite: bool,
    base_seed: tuple[int, int],
    batch_size: int,
) -> tf.data.Dataset:
    """Raw records -> batches of `(uint8 images, labels)`, dropping the undecodable records
    and counting them in `corrupt` (see the module docstring); an endless (training) stream
    drops its last partial batch, a finite one keeps it. Labels are checked per batch, later
    (`_check_labels`): an out-of-range label must not be skipped as a corrupt image.

    Each stage after the parallel decode that calls a function runs once per element in one
    thread, so a training stream has none per image: no end marker, conditional or filter,
    and the count of skipped records (the gaps in the record indices) is taken per batch."""
    if finite:
        dataset = dataset.map(lambda *raw: (raw, False))
        end = _sentinel(dataset.element_spec[0]).map(lambda *raw: (raw, True))
        dataset = dataset.concatenate(end)
    dataset = dataset.enumerate()
    base_seed = tf.constant(base_seed, tf.int64)
    empty = (tf.zeros(preprocessor.output_shape, tf.uint8), tf.constant(-1, tf.int32))

    def decode(index, raw):
        encoded, label, bboxes = parse(*raw)
        # One seed per record: the same augmentation whatever the parallelism.
        seed = tf.random.experimental.stateless_fold_in(base_seed, index)
        return preprocessor.prepare(encoded, bboxes, seed), label

    def load(index, element):
        if not finite:
            # A source's element is one tensor (a serialized record) or a tuple of them.
            raw = element if isinstance(element, tuple) else (element,)
            return (index, *decode(index, raw))
        raw, is_end = element
        image, label = tf.cond(is_end, lambda: empty, lambda: decode(index, raw))
        return index, image, label, is_end

    # deterministic=True: the map must keep its input order for the gap count below.
    dataset = dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
    dataset = dataset.ignore_errors()
    if not finite:

        def count_skipped_in_batch(expected, batch):
            # Indices rise through the batch; the records missing between `expected` and
            # the last index were dropped as undecodable.
            indices, images, labels = batch
            last = indices[-1]
            corrupt.assign_add(last + 1 - expected - tf.size(indices, tf.int64))
            return last + 1, (images, labels)

        dataset = dataset.batch(batch_size, drop_remainder=True)
        return dataset.scan(tf.constant(0, tf.int64), count_skipped_in_batch)

    def count_skipped(expected, element):
        index, *rest = element
        corrupt.assign_add(index - expected)
        return index + 1, tuple(rest)

    dataset = dataset.scan(tf.constant(0, tf.int64), count_skipped)
    dataset = dataset.filter(lambda image, label, is_end: tf.logical_not(is_end))
    dataset = dataset.map(lambda image, label, is_end: (image, label))
    return dataset.batch(batch_size, drop_remainder=False)


def _check_labels(images: tf.Tensor, labels: tf.Tensor, num_classes: int):
    """Fails on a batch with a label outside `[0, num_classes)`, naming the label: such labels
    make the loss fail on a CPU and silently NaN on a GPU. Once per batch, not per image."""
    in_range = tf.logical_and(labels >= 0, labels < num_classes)
    bad = tf.boolean_mask(labels, tf.logical_not(in_range))
    message = (
        f"a label is outside [0, num_classes={num_classes}): the data has more classes "
        "than num_classes (train.py: --num_classes), or labels that are not 0-based. Label:"
    )
    with tf.control_dependencies([tf.debugging.Assert(tf.reduce_all(in_range), [message, bad])]):
        return images, tf.identity(labels)


def build_dataset(
    source: str,
    *,
    split: str,
    batch_size: int,
    image_size: int,
    data_dir: str | os.PathLike | None = None,
    is_training: bool,
    preprocessing: str = "paper",
    num_shards: int = 1,
    shard_index: int = 0,
    deterministic: bool = False,
    seed: int | None = None,
    dtype: Any = "float32",
    shuffle_buffer: int = SHUFFLE_BUFFER,
    num_classes: int | None = None,
    resize_size: int | None = None,
    channels: int = 3,
    mean: Sequence[float] | None = IMAGENET_MEAN_RGB,
    std: Sequence[float] | None = None,
    labels_file: str | None = None,
    num_examples: int | None = None,
    normalize: bool = True,
) -> InputSpec:
    """Builds the input pipeline of one worker.

    Args:
        source: `"tfrecord"` (ImageNet-schema `train-*` / `validation-*` shards in
            `data_dir`), `"tfds:<name>"` (a prepared tensorflow-datasets dataset in
            `data_dir`), `"folder"` (`data_dir/<split>/<class>/*` images, see
            `sources.folder_images`) or `"synthetic"`.
        split: `"train"` or `"validation"` (`"val"`, `"test"`, tfds slices also accepted).
        batch_size: per-worker batch size.
        image_size: side of the square images delivered.
        data_dir: the data location (tfds: its data_dir; None means tfds' default).
        is_training: shuffle, repeat forever, random augmentation, drop the last partial
            batch; else one pass in order, evaluation preprocessing, keep every example.
        preprocessing: `"paper"`, `"inception"`, `"eval"`, `"cifar"` or `"none"` (see
            `lars_tf.data.preprocessing`).
        num_shards: number of workers reading the split (Horovod `size()`).
        shard_index: this worker's index (Horovod `rank()`).
        deterministic: same elements in the same order and the same augmentation on
            every run (seeded with `seed`, or 0); slower, as tf.data may not reorder.
        seed: seed of shuffles and augmentation; None draws one.
        dtype: image dtype, or a mixed-precision policy whose compute dtype is used.
        shuffle_buffer: records held for shuffling when training.
        num_classes: number of classes; default from the source (1000 for tfrecord).
        resize_size: see `preprocessing.ImagePreprocessor`.
        channels: 3 (RGB) or 1 (grayscale).
        mean: per-channel mean subtracted (0..255 scale); None for none.
        std: per-channel standard deviation divided by; None for none.
        labels_file: official ILSVRC-2012 validation label list, for a flat validation
            folder (`source="folder"`).
        num_examples: size of the split, for `"synthetic"` only (default ILSVRC-2012's).
        normalize: deliver float images of `dtype`, normalised with `mean` and `std` (once per
            batch); False delivers the uint8 images (0..255), for a model that normalises
            them on its own device (`lars_tf.models.build(..., normalize_input=(mean, std))`):
            the float work then leaves the CPU and a batch is a quarter of the bytes.

    Returns:
        An `InputSpec` with the dataset, the exact split size and the corrupt-image count.

    Raises:
        ValueError: on an invalid argument or an empty data location.
        FileNotFoundError: when the data location or the split's files are missing.
    """
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not (isinstance(num_shards, int) and num_shards > 0):
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    if not (isinstance(shard_index, int) and 0 <= shard_index < num_shards):
        raise ValueError(
            f"shard_index must be in [0, num_shards={num_shards}), got {shard_index!r}"
        )
    if not (isinstance(shuffle_buffer, int) and shuffle_buffer > 0):
        raise ValueError(f"shuffle_buffer must be a positive int, got {shuffle_buffer!r}")
    if num_examples is not None and source != "synthetic":
        raise ValueError(f"num_examples is only for source='synthetic', got source={source!r}")
    preprocessor = ImagePreprocessor(
        mode=preprocessing,
        is_training=is_training,
        image_size=image_size,
        resize_size=resize_size,
        channels=channels,
        mean=mean,
        std=std,
        dtype=dtype,
    )
    if deterministic and seed is None:
        seed = DEFAULT_SEED
    # Augmentation always uses stateless ops; without a seed, draw one for this run.
    augment_seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
    with tf.device("/cpu:0"):
        corrupt = tf.Variable(0, dtype=tf.int64, trainable=False, name="corrupt_images")

    if source == "synthetic":
        num_classes = num_classes or 1000
        num_examples = num_examples or synthetic.synthetic_examples(split)
        dataset = synthetic.synthetic_dataset(
            preprocessor if normalize else None,
            output_shape=preprocessor.output_shape,
            batch_size=batch_size,
            num_classes=num_classes,
            num_examples=num_examples,
            num_shards=num_shards,
            is_training=is_training,
            seed=augment_seed,
        )
        return InputSpec(
            dataset, num_examples, num_classes, None, preprocessor.output_shape, batch_size, corrupt
        )

    shard_options = dict(
        num_shards=num_shards,
        shard_index=shard_index,
        shuffle=is_training,
        seed=seed,
        deterministic=deterministic,
    )
    records = _open_records(source, split, data_dir, num_classes, labels_file, shard_options)
    dataset = records.dataset
    if is_training:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.repeat()
    dataset = _decode_counting_skips(
        dataset,
        records.parse,
        preprocessor,
        corrupt,
        finite=not is_training,
        base_seed=(augment_seed, shard_index),
        batch_size=batch_size,
    )
    dataset = dataset.map(lambda x, y: _check_labels(x, y, records.num_classes))
    if normalize:
        # uint8 images per example, float work once per batch (see `preprocessing`).
        dataset = dataset.map(
            lambda images, labels: (preprocessor.normalize(images), labels),
            num_parallel_calls=AUTOTUNE,
            deterministic=True,
        )
    dataset = dataset.prefetch(AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    dataset = dataset.with_options(options)
    return InputSpec(
        dataset,
        records.num_examples,
        records.num_classes,
        records.class_names,
        preprocessor.output_shape,
        batch_size,
        corrupt,
    )
