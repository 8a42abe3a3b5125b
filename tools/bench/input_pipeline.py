"""Part 3: the training input pipeline on real ImageNet JPEGs, against this machine's limit.

The ILSVRC-2012 files (`../shared/data/mini-ilsvrc2012`, the original distribution format)
are converted once to TFRecords with `lars_tf.data.convert` (cached in the work directory).
Pipelines reading the same train shards, interleaved round by round:

- the limit: read, parse and decode each JPEG whole (`decode_image`), nothing else, with the
  same `num_parallel_calls=AUTOTUNE` parallelism;
- `build_dataset(..., preprocessing="paper", normalize=False)` (train.py's default: uint8
  batches, normalised by the model on the accelerator): resize to 256 x 256, random crop, flip;
- `build_dataset(..., preprocessing="inception", normalize=False)`: random crop window,
  decoding only that window of the JPEG, resize, flip;
- each of those with `normalize=True` (float32 batches normalised in tf.data);
- for each mode, its per-image part alone in the limit's bare parallel map (no shuffle, no
  corrupt-image counting): the preprocessing, apart from the pipeline around it;
- the same images stored at 256 x 256 (`convert(..., resize=256)`, the paper's format): the
  paper's mode on them against the decoding of those same bytes.
- keras-cv's random-resized crop and flip (`RandomCropAndResize`, `RandomFlip`) as on-device
  augmentation of the uint8 batches `--normalize_on_device` ships, when keras-cv is installed
  (it is not a dependency): the host decodes the stored 256 x 256 images (the bare parallel
  map) and each batch then goes through keras-cv, against today's tf.data Inception crop.

Each sample opens a fresh iterator, draws a few batches untimed (start-up, shuffle buffer),
then times the next batches; the iterator is closed before the next pipeline runs so that
no pipeline prefetches in the background of another.
"""

from __future__ import annotations

import os
import time
from typing import Any

import tensorflow as tf

from lars_tf.data import build_dataset, convert, pipeline, preprocessing, sources

from . import environment, timing
from .workloads import Workload

LIMIT = "decode only (limit)"
# The same images stored at 256 x 256 (the converter's `resize`, the paper's Caffe format),
# with their own limit: decoding those bytes.
STORED = "stored 256 x 256"
STORED_LIMIT = f"decode only, {STORED} (limit)"
STORED_SIZE = 256
# The pipeline normalising its float images itself (--nonormalize_on_device).
HOST = "normalised in tf.data"
# Suffixes of the variants that show what changed: the stored images decoded whole (the crop
# before), and the pipelines as measured before, with train.py's 10,000-record shuffle buffer,
# which holds the whole sample (see `shuffle_buffer_for`).
WHOLE = "decoded whole"
FULL_BUFFER = f"shuffle buffer {pipeline.SHUFFLE_BUFFER:,}"
BEFORE = "as before"
IMAGENET_TRAIN_IMAGES = 1_281_167
# keras-cv's crop and flip of uint8 batches (the accelerator's work, here on the same CPU).
KERAS_CV = "keras-cv crop + flip of uint8 batches"
KERAS_CV_VS = "inception"


def prepare_tfrecords(
    imagenet_dir: str, work_dir: str, workers: int | None, resize: int | None = None
) -> str:
    """Converts the ILSVRC-2012 files in `imagenet_dir` to TFRecords (reused when done),
    the images kept as they are or stored at `resize x resize`."""
    name = "imagenet-tfrecords" + (f"-{resize}" if resize else "")
    output = os.path.join(work_dir, name)
    convert.convert(
        imagenet_dir,
        output,
        train_shards=8,
        validation_shards=2,
        num_workers=workers,
        progress=False,
        resize=resize,
    )
    return output


def _train_records(data_dir: str) -> sources.Records:
    """The train shards, one worker, files in order: what the bare pipelines read."""
    return sources.tfrecord_source(
        data_dir,
        "train",
        num_classes=None,
        num_shards=1,
        shard_index=0,
        shuffle=False,
        seed=None,
        deterministic=False,
    )


def decode_only_dataset(data_dir: str, batch: int) -> tf.data.Dataset:
    """The train shards, read, parsed and JPEG-decoded whole, in parallel; nothing else."""
    records = _train_records(data_dir)

    def decode(*raw):
        encoded, _, _ = records.parse(*raw)
        image = preprocessing.decode(encoded, 3)
        # A pixel and the shape: tiny to batch, and both need the whole image decoded.
        return tf.shape(image), image[0, 0]

    return (
        records.dataset.repeat()
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .batch(batch)
        .prefetch(tf.data.AUTOTUNE)
    )


def preprocessing_only_dataset(
    data_dir: str, batch: int, preprocessor: preprocessing.ImagePreprocessor
) -> tf.data.Dataset:
    """The limit's bare parallel map running the per-image part of `preprocessor` (one fixed
    seed) after parsing, batched as uint8: the preprocessing without the pipeline around it."""
    records = _train_records(data_dir)
    seed = tf.constant([0, 0], tf.int64)

    def preprocess(*raw):
        encoded, label, bboxes = records.parse(*raw)
        return preprocessor.prepare(encoded, bboxes, seed), label

    return (
        records.dataset.repeat()
        .map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .batch(batch)
        .prefetch(tf.data.AUTOTUNE)
    )


def stored_batches(stored_dir: str, batch: int, size: int = STORED_SIZE) -> tf.data.Dataset:
    """Uint8 batches of the images stored at `size` x `size`, decoded whole in the limit's bare
    parallel map: what an on-device augmentation needs from the host (one image size)."""
    records = _train_records(stored_dir)

    def decode(*raw):
        encoded, _, _ = records.parse(*raw)
        image = preprocessing.decode(encoded, 3)
        image.set_shape([size, size, 3])
        return image

    return (
        records.dataset.repeat()
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .batch(batch)
        .prefetch(tf.data.AUTOTUNE)
    )


def keras_cv_augmentation(image_size: int):
    """keras-cv's Inception-style random-resized crop (area 8-100 %, aspect 3/4-4/3) and
    horizontal flip of a uint8 batch, compiled as a tf.function; None when keras-cv is not
    installed (the reason is returned instead)."""
    try:
        import keras
        import keras_cv
    except ImportError as error:
        return None, f"keras-cv not installed ({error})"
    augment = keras.Sequential(
        [
            keras_cv.layers.RandomCropAndResize(
                (image_size, image_size),
                crop_area_factor=preprocessing.AREA_RANGE,
                aspect_ratio_factor=preprocessing.ASPECT_RATIO_RANGE,
            ),
            keras_cv.layers.RandomFlip("horizontal"),
        ]
    )

    @tf.function
    def apply(images):
        return tf.cast(augment(images, training=True), tf.uint8)

    return apply, f"keras-cv {keras_cv.__version__}"


def _batch_sampler(dataset: tf.data.Dataset, warmup_batches: int, batches: int, apply):
    """As `_sampler`, each batch's images then passed through `apply` (and read back)."""

    def sample() -> float:
        iterator = iter(dataset)
        for _ in range(warmup_batches):
            apply(next(iterator)).numpy()
        began = time.perf_counter()
        for _ in range(batches):
            apply(next(iterator)).numpy()
        elapsed = time.perf_counter() - began
        del iterator
        return elapsed

    return sample


def _sampler(dataset: tf.data.Dataset, warmup_batches: int, batches: int):
    def sample() -> float:
        iterator = iter(dataset)
        for _ in range(warmup_batches):
            next(iterator)
        began = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        elapsed = time.perf_counter() - began
        del iterator  # stops its prefetching threads before the next pipeline runs
        return elapsed

    return sample


def shuffle_buffer_for(data_dir: str) -> int:
    """train.py's shuffle buffer scaled to the sample: `pipeline.SHUFFLE_BUFFER` (10,000
    records) is 1/128 of ImageNet's 1,281,167 training images, so the sample's buffer is
    1/128 of its images. A training stream shuffles before it repeats (every epoch holds each
    image once), so each epoch starts by filling the buffer anew, reading without decoding:
    once per 128 buffers on ImageNet, but on the sample a 10,000 buffer holds all of it and
    the whole sample (about one timed sample) is read before each epoch's first image."""
    _, count = sources.tfrecord_files(data_dir, "train")
    count = count or sum(1 for _ in _train_records(data_dir).dataset)
    return max(1, round(count * pipeline.SHUFFLE_BUFFER / IMAGENET_TRAIN_IMAGES))


def _whole_decode_crop(encoded, window, resize_size, channels):
    # The paper mode's crop before it decoded only the window of a stored image.
    image = preprocessing._resize_unless_sized(preprocessing.decode(encoded, channels), resize_size)
    return tf.slice(
        image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], -1])
    )


def _training_dataset(
    data_dir: str,
    batch: int,
    mode: str,
    size: int,
    normalize: bool = False,
    shuffle_buffer: int | None = None,
    whole_decode: bool = False,
):
    # normalize=False: train.py's default (--normalize_on_device), uint8 batches.
    crop = preprocessing._paper_crop
    if whole_decode:  # the function is traced by build_dataset, so swapped for that call only
        preprocessing._paper_crop = _whole_decode_crop
    try:
        return build_dataset(
            "tfrecord",
            split="train",
            batch_size=batch,
            image_size=size,
            data_dir=data_dir,
            is_training=True,
            preprocessing=mode,
            seed=0,
            normalize=normalize,
            shuffle_buffer=shuffle_buffer or shuffle_buffer_for(data_dir),
        )
    finally:
        preprocessing._paper_crop = crop


def run(
    workload: Workload, tfrecord_dir: str, source: str, stored_dir: str | None = None
) -> dict[str, Any]:
    """Measures part 3 on the TFRecords in `tfrecord_dir`, converted from `source`, and
    (`stored_dir`) on the same images stored at 256 x 256 for the paper's mode."""
    batch = workload.pipeline_batch
    datasets = {LIMIT: decode_only_dataset(tfrecord_dir, batch)}
    specs = {}
    if stored_dir is not None and "paper" in workload.pipeline_image_sizes:
        size = workload.pipeline_image_sizes["paper"]
        datasets[STORED_LIMIT] = decode_only_dataset(stored_dir, batch)
        specs["paper, stored"] = _training_dataset(stored_dir, batch, "paper", size)
        datasets[f"paper ({size} px), {STORED}"] = specs["paper, stored"].dataset
        whole = _training_dataset(stored_dir, batch, "paper", size, whole_decode=True)
        datasets[f"paper ({size} px), {STORED}, {WHOLE}"] = whole.dataset
        full = _training_dataset(
            stored_dir,
            batch,
            "paper",
            size,
            shuffle_buffer=pipeline.SHUFFLE_BUFFER,
            whole_decode=True,
        )
        datasets[f"paper ({size} px), {STORED}, {BEFORE} ({WHOLE}, {FULL_BUFFER})"] = full.dataset
    for mode, size in workload.pipeline_image_sizes.items():
        spec = _training_dataset(tfrecord_dir, batch, mode, size)
        specs[mode] = spec
        datasets[f"{mode} ({size} px)"] = spec.dataset
        before = _training_dataset(
            tfrecord_dir, batch, mode, size, shuffle_buffer=pipeline.SHUFFLE_BUFFER
        )
        datasets[f"{mode} ({size} px), {BEFORE} ({FULL_BUFFER})"] = before.dataset
        host = _training_dataset(tfrecord_dir, batch, mode, size, normalize=True)
        specs[f"{mode}, {HOST}"] = host
        datasets[f"{mode} ({size} px), {HOST}"] = host.dataset
        alone = preprocessing.ImagePreprocessor(mode=mode, is_training=True, image_size=size)
        datasets[f"{mode} preprocessing alone"] = preprocessing_only_dataset(
            tfrecord_dir, batch, alone
        )
    variants = {
        name: _sampler(ds, workload.pipeline_warmup_batches, workload.pipeline_batches)
        for name, ds in datasets.items()
    }
    keras_cv_name, keras_cv_note = None, "no stored 256 x 256 images"
    if stored_dir is not None and KERAS_CV_VS in workload.pipeline_image_sizes:
        size = workload.pipeline_image_sizes[KERAS_CV_VS]
        apply, keras_cv_note = keras_cv_augmentation(size)
        if apply is not None:
            keras_cv_name = f"{KERAS_CV} ({size} px), {STORED}"
            variants[keras_cv_name] = _batch_sampler(
                stored_batches(stored_dir, batch),
                workload.pipeline_warmup_batches,
                workload.pipeline_batches,
                apply,
            )
    load_before = environment.load_average()
    samples = timing.run_interleaved(
        variants, repeats=workload.pipeline_rounds, warmup=1, self_timed=True
    )
    images = batch * workload.pipeline_batches
    result: dict[str, Any] = {
        "source": source,
        "tfrecord_dir": tfrecord_dir,
        "stored_dir": stored_dir,
        "train_examples": specs[next(iter(workload.pipeline_image_sizes))].num_examples,
        "batch": batch,
        "images_per_sample": images,
        "num_parallel_calls": "AUTOTUNE",
        "shuffle_buffer": shuffle_buffer_for(tfrecord_dir),
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": environment.load_average(),
        "variants": {
            name: {
                "samples_s": s,
                "images_per_s": timing.summarize([images / t for t in s]),
                **timing.summarize(s),
            }
            for name, s in samples.items()
        },
        "corrupt_images_skipped": {mode: spec.corrupt_count() for mode, spec in specs.items()},
        "keras_cv": keras_cv_note,
    }
    ratios, targets = {}, []
    for name in samples:
        if name in (LIMIT, STORED_LIMIT):
            continue
        # Throughput ratio = time of the limit / time of the pipeline, round by round; a
        # pipeline on the stored 256 x 256 images against decoding those same bytes.
        limit = STORED_LIMIT if STORED in name else LIMIT
        ratio = timing.paired_ratio(samples[limit], samples[name])
        ratios[f"{name} / limit (images/s)"] = ratio
        if name == keras_cv_name:
            today = next(
                n for n in samples if n.startswith(f"{KERAS_CV_VS} (") and n.endswith("px)")
            )
            ratios[f"{name} / {today} (images/s)"] = timing.paired_ratio(
                samples[today], samples[name]
            )
            continue
        if name.endswith(("alone", WHOLE)) or HOST in name or BEFORE in name:
            continue
        targets.append(
            {
                "part": 3,
                "target": f"input pipeline {name}: images/s >= 0.85 x its decode-only limit",
                "value": ratio["median"],
                "met": ratio["median"] >= 0.85,
            }
        )
    result["ratios"] = ratios
    # Each pipeline against itself as it was before, in the same rounds: the gain.
    result["speedups"] = {
        name.split(f", {BEFORE}")[0]: timing.paired_ratio(
            samples[name], samples[name.split(f", {BEFORE}")[0]]
        )
        for name in samples
        if BEFORE in name
    }
    result["targets"] = targets
    return result
