"""The ImageNet TFRecord schema, the ILSVRC-2012 label conventions and the shard manifest.

Records follow the schema of TensorFlow's own ImageNet converters (the Inception and TPU
`build_imagenet_data.py` / `imagenet_to_gcs.py` scripts, read by TF Model Garden):

| key | type | content |
| --- | --- | --- |
| `image/encoded` | bytes | the JPEG bytes |
| `image/format` | bytes | `JPEG` |
| `image/class/label` | int64 | 1-based class index (0 is reserved for "background") |
| `image/class/synset` | bytes | the WordNet id, e.g. `n01440764` |
| `image/filename` | bytes | the original file name |
| `image/height`, `image/width`, `image/channels` | int64 | decoded size, channels 3 |
| `image/colorspace` | bytes | `RGB` |
| `image/object/bbox/{xmin,ymin,xmax,ymax}` | float lists | optional boxes in [0, 1] |

The label of a synset is its position in the sorted list of the 1,000 ILSVRC-2012 synsets
(`imagenet_synsets()`), so labels never depend on which synsets a subset happens to hold.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

import tensorflow as tf

NUM_CLASSES = 1000
# `image/class/label` is 1-based in TF's converters; the reader subtracts this offset.
LABEL_OFFSET = 1
SPLITS = ("train", "validation")
# Written last by the converter: its presence means the listed shards are complete.
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "lars_tf.imagenet_tfrecord.v1"

_VALIDATION_NUMBER = re.compile(r"ILSVRC2012_val_(\d+)")
_BBOX_KEYS = ("ymin", "xmin", "ymax", "xmax")  # the order tf.image expects


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
    """Returns the 1,000 ILSVRC-2012 synsets (WordNet ids), sorted: index = 0-based label.

    Derived once from the official validation label list (`sorted(set(lines))`) and shipped
    as package data.
    """
    text = resources.files("lars_tf.data").joinpath("imagenet_synsets.txt").read_text()
    synsets = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(synsets) != NUM_CLASSES or list(synsets) != sorted(synsets):
        raise RuntimeError("lars_tf/data/imagenet_synsets.txt is damaged: expected 1000 sorted ids")
    return synsets


@functools.cache
def _synset_index() -> dict[str, int]:
    return {synset: index for index, synset in enumerate(imagenet_synsets())}


def synset_label(synset: str) -> int:
    """Returns the 0-based ILSVRC-2012 class index of `synset` (e.g. `n01440764` -> 0)."""
    try:
        return _synset_index()[synset]
    except KeyError:
        raise ValueError(f"synset={synset!r} is not one of the 1,000 ILSVRC-2012 synsets") from None


def validation_number(filename: str) -> int:
    """Returns the 1-based image number of `ILSVRC2012_val_00000042.JPEG` (here 42)."""
    match = _VALIDATION_NUMBER.search(os.path.basename(filename))
    if match is None:
        raise ValueError(
            f"filename={filename!r} does not look like ILSVRC2012_val_<number>.JPEG, so its "
            "synset cannot be looked up in the validation label list"
        )
    return int(match.group(1))


def read_validation_labels(path: str | os.PathLike) -> list[str]:
    """Reads the official validation label list: line i is the synset of image number i."""
    with open(path, encoding="ascii") as f:
        synsets = [line.strip() for line in f if line.strip()]
    if not synsets:
        raise ValueError(f"validation label list {os.fspath(path)!r} is empty")
    unknown = sorted(set(synsets) - set(imagenet_synsets()))
    if unknown:
        raise ValueError(
            f"validation label list {os.fspath(path)!r} holds {len(unknown)} ids that are not "
            f"ILSVRC-2012 synsets, e.g. {unknown[:3]}"
        )
    return synsets


def validation_synset(filename: str, validation_labels: Sequence[str]) -> str:
    """Looks up a validation image's synset by the number in its file name, never by order."""
    number = validation_number(filename)
    if not 1 <= number <= len(validation_labels):
        raise ValueError(
            f"{filename!r} is image number {number}, but the validation label list has "
            f"{len(validation_labels)} lines"
        )
    return validation_labels[number - 1]


def shard_name(split: str, index: int, num_shards: int) -> str:
    """Returns TF's shard file name, e.g. `train-00042-of-01024`."""
    return f"{split}-{index:05d}-of-{num_shards:05d}"


def _bytes(value: bytes | str) -> tf.train.Feature:
    if isinstance(value, str):
        value = value.encode()
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def make_example(
    encoded: bytes,
    *,
    label: int,
    synset: str,
    filename: str,
    height: int,
    width: int,
    bboxes: Iterable[Sequence[float]] = (),
) -> tf.train.Example:
    """Builds one record of the standard schema.

    Args:
        encoded: JPEG bytes (RGB or grayscale; the converter re-encodes anything else).
        label: 0-based class index; stored 1-based as TF's converters do.
        synset: WordNet id of the class.
        filename: original file name, kept for tracing a record back to its image.
        height: decoded image height in pixels.
        width: decoded image width in pixels.
        bboxes: optional `(ymin, xmin, ymax, xmax)` boxes, normalised to [0, 1].
    """
    feature = {
        "image/encoded": _bytes(encoded),
        "image/format": _bytes("JPEG"),
        "image/class/label": _int64(label + LABEL_OFFSET),
        "image/class/synset": _bytes(synset),
        "image/filename": _bytes(filename),
        "image/height": _int64(height),
        "image/width": _int64(width),
        "image/colorspace": _bytes("RGB"),
        "image/channels": _int64(3),
    }
    boxes = [tuple(box) for box in bboxes]
    for position, key in enumerate(_BBOX_KEYS):
        values = [box[position] for box in boxes]
        feature[f"image/object/bbox/{key}"] = tf.train.Feature(
            float_list=tf.train.FloatList(value=values)
        )
    return tf.train.Example(features=tf.train.Features(feature=feature))


_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    **{f"image/object/bbox/{key}": tf.io.VarLenFeature(tf.float32) for key in _BBOX_KEYS},
}


def parse_example(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Parses one serialized record (graph-safe, for `tf.data.Dataset.map`).

    Returns:
        `(encoded, label, bboxes)`: the image bytes, the 0-based int32 label, and a float32
        `[1, num_boxes, 4]` tensor of `(ymin, xmin, ymax, xmax)` boxes (`num_boxes` may be 0),
        the layout `tf.image.sample_distorted_bounding_box` takes.
    """
    features = tf.io.parse_single_example(serialized, _FEATURES)
    label = tf.cast(features["image/class/label"], tf.int32) - LABEL_OFFSET
    coords = [tf.sparse.to_dense(features[f"image/object/bbox/{key}"]) for key in _BBOX_KEYS]
    bboxes = tf.expand_dims(tf.stack(coords, axis=-1), 0)
    return features["image/encoded"], label, bboxes


def write_manifest(output_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Writes the manifest atomically (temp file + rename), so a crash never leaves half."""
    path = os.path.join(output_dir, MANIFEST_NAME)
    temporary = os.path.join(output_dir, f".{MANIFEST_NAME}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"format": MANIFEST_FORMAT, **manifest}, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(temporary, path)


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Returns the converter's manifest in `data_dir`, or None when there is none."""
    path = os.path.join(data_dir, MANIFEST_NAME)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a {MANIFEST_FORMAT} manifest")
    return manifest
