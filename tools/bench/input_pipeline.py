"""Part 3: the training input pipeline on real ImageNet JPEGs, against this machine's limit.

The ILSVRC-2012 files (`../shared/data/mini-ilsvrc2012`, the original distribution format)
are converted once to TFRecords with `lars_tf.data.convert` (cached in the work directory).
Pipelines reading the same train shards, interleaved round by round:

- the limit: read, parse and decode each JPEG whole (`decode_image`), nothing else, with the
  same `num_parallel_calls=AUTOTUNE` parallelism;
- `build_dataset(..., preprocessing="paper")`: resize to 256 x 256, random crop, flip;
- `build_dataset(..., preprocessing="inception")`: random crop window, decoding only that
  window of the JPEG, resize, flip;
- for each mode, its `ImagePreprocessor` alone in the limit's bare parallel map (no shuffle,
  no corrupt-image counting): what the preprocessing costs, apart from the pipeline around it.

Each sample opens a fresh iterator, draws a few batches untimed (start-up, shuffle buffer),
then times the next batches; the iterator is closed before the next pipeline runs so that
no pipeline prefetches in the background of another.
"""

from __future__ import annotations

import os
import time
from typing import Any

import tensorflow as tf

from lars_tf.data import build_dataset, convert, preprocessing, sources

from . import environment, timing
from .workloads import Workload

LIMIT = "decode only (limit)"


def prepare_tfrecords(imagenet_dir: str, work_dir: str, workers: int | None) -> str:
    """Converts the ILSVRC-2012 files in `imagenet_dir` to TFRecords (reused when done)."""
    output = os.path.join(work_dir, "imagenet-tfrecords")
    convert.convert(
        imagenet_dir,
        output,
        train_shards=8,
        validation_shards=2,
        num_workers=workers,
        progress=False,
    )
    return output


def decode_only_dataset(data_dir: str, batch: int) -> tf.data.Dataset:
    """The train shards, read, parsed and JPEG-decoded whole, in parallel; nothing else."""
    records = sources.tfrecord_source(
        data_dir,
        "train",
        num_classes=None,
        num_shards=1,
        shard_index=0,
        shuffle=False,
        seed=None,
        deterministic=False,
    )

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
    """The limit's bare parallel map, running `preprocessor` (one fixed seed) after parsing."""
    records = sources.tfrecord_source(
        data_dir,
        "train",
        num_classes=None,
        num_shards=1,
        shard_index=0,
        shuffle=False,
        seed=None,
        deterministic=False,
    )
    seed = tf.constant([0, 0], tf.int64)

    def preprocess(*raw):
        encoded, label, bboxes = records.parse(*raw)
        return preprocessor(encoded, bboxes, seed), label

    return (
        records.dataset.repeat()
        .map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .batch(batch)
        .prefetch(tf.data.AUTOTUNE)
    )


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


def run(workload: Workload, tfrecord_dir: str, source: str) -> dict[str, Any]:
    """Measures part 3 on the TFRecords in `tfrecord_dir`, converted from `source`."""
    batch = workload.pipeline_batch
    datasets = {LIMIT: decode_only_dataset(tfrecord_dir, batch)}
    specs = {}
    for mode, size in workload.pipeline_image_sizes.items():
        spec = build_dataset(
            "tfrecord",
            split="train",
            batch_size=batch,
            image_size=size,
            data_dir=tfrecord_dir,
            is_training=True,
            preprocessing=mode,
            seed=0,
        )
        specs[mode] = spec
        datasets[f"{mode} ({size} px)"] = spec.dataset
        alone = preprocessing.ImagePreprocessor(mode=mode, is_training=True, image_size=size)
        datasets[f"{mode} preprocessing alone"] = preprocessing_only_dataset(
            tfrecord_dir, batch, alone
        )
    variants = {
        name: _sampler(ds, workload.pipeline_warmup_batches, workload.pipeline_batches)
        for name, ds in datasets.items()
    }
    load_before = environment.load_average()
    samples = timing.run_interleaved(
        variants, repeats=workload.pipeline_rounds, warmup=1, self_timed=True
    )
    images = batch * workload.pipeline_batches
    result: dict[str, Any] = {
        "source": source,
        "tfrecord_dir": tfrecord_dir,
        "train_examples": next(iter(specs.values())).num_examples if specs else None,
        "batch": batch,
        "images_per_sample": images,
        "num_parallel_calls": "AUTOTUNE",
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
    }
    ratios, targets = {}, []
    for name in samples:
        if name == LIMIT:
            continue
        # Throughput ratio = time of the limit / time of the pipeline, round by round.
        ratio = timing.paired_ratio(samples[LIMIT], samples[name])
        ratios[f"{name} / limit (images/s)"] = ratio
        if name.endswith("alone"):
            continue
        targets.append(
            {
                "part": 3,
                "target": f"input pipeline {name}: images/s >= 0.85 x decode-only limit",
                "value": ratio["median"],
                "met": ratio["median"] >= 0.85,
            }
        )
    result["ratios"] = ratios
    result["targets"] = targets
    return result
