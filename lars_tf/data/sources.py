"""Where encoded images come from: ImageNet TFRecords, tensorflow-datasets, JPEG folders.

Each source returns a `Records`: a dataset of raw elements of this worker's shard (files
sharded and, for training, shuffled, before any record is read), a graph function that
turns one raw element into `(encoded_bytes, label, bboxes)`, and the split's metadata.
Decoding happens later, in the pipeline's parallel map, so that a corrupt image can be
skipped and counted in one place for every source.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf
from absl import logging

from lars_tf.data import imagenet

AUTOTUNE = tf.data.AUTOTUNE
# Read buffer per TFRecord file and files read at once (TF Model Garden's ImageNet values).
READ_BUFFER_BYTES = 8 * 1024 * 1024
CYCLE_LENGTH = 16
# A TFRecord record is its data framed by a length (8 bytes) and two CRCs (4 bytes each).
RECORD_FRAMING_BYTES = 16
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".gif")
# Split names tried, in order, for a folder tree; "validation" falls back to test/ (CIFAR-10).
FOLDER_SPLITS = {
    "train": ("train",),
    "validation": ("validation", "val", "test"),
    "val": ("validation", "val", "test"),
    "test": ("test",),
}


@dataclasses.dataclass(frozen=True)
class Records:
    """The raw records of one worker's shard of a split, and what is known about the split.

    Attributes:
        dataset: raw elements, already sharded; file order shuffled when training.
        parse: graph function from one raw element to `(encoded, int32 label, bboxes or None)`.
        num_examples: examples in the whole split (before sharding), exact.
        num_classes: number of classes of the labels.
        class_names: names of the classes by label, when known.
    """

    dataset: tf.data.Dataset
    parse: Callable[..., tuple[tf.Tensor, tf.Tensor, tf.Tensor | None]]
    num_examples: int
    num_classes: int
    class_names: tuple[str, ...] | None


def _require_dir(data_dir: str | os.PathLike | None, source: str) -> str:
    if data_dir is None:
        raise ValueError(f"data_dir is required for source={source!r}")
    data_dir = os.fspath(data_dir)
    if not tf.io.gfile.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir!r} for source={source!r} does not exist")
    return data_dir


def read_files(
    files: Sequence[str],
    reader: Callable[[tf.Tensor], tf.data.Dataset],
    *,
    num_shards: int,
    shard_index: int,
    shuffle: bool,
    seed: int | None,
    deterministic: bool,
) -> tf.data.Dataset:
    """Reads the records of this worker's shard of `files`.

    With at least one file per worker, whole files are sharded (before they are shuffled,
    so workers never overlap); otherwise every worker reads all files in the same fixed
    order and keeps every `num_shards`-th record.
    """
    by_file = len(files) >= num_shards
    dataset = tf.data.Dataset.from_tensor_slices(list(files))
    if by_file:
        dataset = dataset.shard(num_shards, shard_index)
        if shuffle:
            dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.interleave(
        reader,
        cycle_length=min(CYCLE_LENGTH, len(files)),
        num_parallel_calls=AUTOTUNE,
        # Record sharding needs the same order on every worker.
        deterministic=deterministic or not by_file,
    )
    if not by_file:
        dataset = dataset.shard(num_shards, shard_index)
    return dataset


def _report_if_damaged(path: tf.Tensor, bytes_read: tf.Tensor) -> bool:
    """Logs a warning naming `path` when fewer than all its bytes were read as records."""
    name = path.numpy().decode()
    size = tf.io.gfile.stat(name).length
    if int(bytes_read) != size:
        logging.warning(
            "TFRecord file %s is damaged (truncated or corrupted): only its first %d of %d "
            "bytes held readable records; the rest of the file is skipped",
            name,
            int(bytes_read),
            size,
        )
    return True


def _tfrecord_reader(path: tf.Tensor) -> tf.data.Dataset:
    """The records of one file; a damaged file is named in the log when its reading ends.

    The read error itself (truncated file, bad checksum) goes on down the pipeline, which
    drops it and counts it (see `pipeline`), but its message does not name the file. So the
    bytes of the records read are added up (in the graph: no Python per record), and one
    empty element after the last record compares the sum with the file's size (Python once
    per file); that element is then dropped.
    """
    records = tf.data.TFRecordDataset(path, buffer_size=READ_BUFFER_BYTES)
    end = tf.data.Dataset.from_tensors((tf.constant(b""), True))
    records = records.map(lambda record: (record, False)).concatenate(end)

    def add_up(bytes_read, element):
        record, is_end = element
        is_end = tf.cond(
            is_end,
            lambda: tf.py_function(_report_if_damaged, [path, bytes_read], tf.bool),
            lambda: tf.constant(False),
        )
        bytes_read += tf.cast(tf.strings.length(record), tf.int64) + RECORD_FRAMING_BYTES
        return bytes_read, (record, is_end)

    records = records.scan(tf.constant(0, tf.int64), add_up)
    return records.filter(lambda record, is_end: tf.logical_not(is_end)).map(
        lambda record, is_end: record
    )


def _count_file_records(path: str) -> int:
    try:
        return int(
            tf.data.TFRecordDataset(path).reduce(tf.constant(0, tf.int64), lambda n, _: n + 1)
        )
    except tf.errors.DataLossError as error:
        reason = error.message.split("}} ")[-1].split(" [Op:")[0]
        raise ValueError(
            f"TFRecord file {path!r} is damaged ({reason}); re-create it, or remove it"
        ) from error


def _count_records(files: Sequence[str]) -> int:
    # One file per thread (TensorFlow releases the GIL), so that a damaged file is named.
    with concurrent.futures.ThreadPoolExecutor(min(CYCLE_LENGTH, len(files))) as pool:
        return sum(pool.map(_count_file_records, files))


def tfrecord_files(data_dir: str, split: str) -> tuple[list[str], int | None]:
    """Returns the split's shard files and their example count when a manifest knows it."""
    split = "validation" if split == "val" else split
    manifest = imagenet.read_manifest(data_dir)
    if manifest is not None and split in manifest["splits"]:
        entry = manifest["splits"][split]
        files = [os.path.join(data_dir, name) for name in sorted(entry["shards"])]
        missing = [f for f in files if not tf.io.gfile.exists(f)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} shard(s) listed in {data_dir}/{imagenet.MANIFEST_NAME} are "
                f"missing, e.g. {missing[0]}"
            )
        return files, int(entry["num_examples"])
    pattern = os.path.join(data_dir, f"{split}-*")
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no TFRecord files match {pattern!r}")
    return files, None


def tfrecord_source(
    data_dir: str | os.PathLike | None,
    split: str,
    *,
    num_classes: int | None,
    **shard_options: Any,
) -> Records:
    """ImageNet-schema shards `<split>-*` in `data_dir` (see `lars_tf.data.imagenet`)."""
    data_dir = _require_dir(data_dir, "tfrecord")
    files, num_examples = tfrecord_files(data_dir, split)
    if num_examples is None:
        # No manifest: count once (reads the split; minutes for all of ImageNet).
        logging.info("counting the records of %d files in %s", len(files), data_dir)
        num_examples = _count_records(files)
    if num_examples == 0:
        raise ValueError(f"the {split!r} files in {data_dir!r} hold no records")
    num_classes = num_classes or imagenet.NUM_CLASSES
    names = imagenet.imagenet_synsets() if num_classes == imagenet.NUM_CLASSES else None
    dataset = read_files(files, _tfrecord_reader, **shard_options)
    return Records(dataset, imagenet.parse_example, num_examples, num_classes, names)


def tfds_source(
    name: str,
    data_dir: str | os.PathLike | None,
    split: str,
    *,
    num_classes: int | None,
    num_shards: int,
    shard_index: int,
    shuffle: bool,
    seed: int | None,
    deterministic: bool,
) -> Records:
    """A prepared tensorflow-datasets image classification dataset (never downloads)."""
    import tensorflow_datasets as tfds  # only this source needs it

    try:
        builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    except tfds.core.registered.DatasetNotFoundError as error:
        reason = str(error).splitlines()[0]  # the rest lists every dataset tfds knows
        raise ValueError(f"tensorflow-datasets has no dataset {name!r}: {reason}") from error
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"tensorflow-datasets dataset {name!r} is not prepared in {builder.data_dir!r}; "
            f"run tfds.builder({name!r}, data_dir=...).download_and_prepare() first"
        )
    splits = builder.info.splits
    base = split.split("[")[0]
    if base not in splits and base in ("validation", "val") and "test" in splits:
        logging.info("%s has no %r split; using 'test'", name, split)
        split = "test" + split[len(base) :]
    elif base not in splits:
        raise ValueError(f"{name} has no split {split!r}; it has {sorted(splits)}")
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    label_feature = builder.info.features[label_key]
    known = getattr(label_feature, "num_classes", None)
    if num_classes is not None and known is not None and num_classes < known:
        raise ValueError(
            f"num_classes={num_classes} but {name}'s {label_key!r} feature has {known} classes"
        )
    num_classes = num_classes or known
    if not num_classes:
        raise ValueError(f"{name}'s {label_key!r} feature is not a ClassLabel: pass num_classes")
    options = tf.data.Options()
    options.deterministic = deterministic
    read_config = tfds.ReadConfig(
        options=options, shuffle_seed=seed, interleave_cycle_length=CYCLE_LENGTH
    )
    dataset = builder.as_dataset(
        # Exact example-level shards: every worker gets a disjoint, near-equal part.
        split=tfds.even_splits(split, num_shards)[shard_index],
        shuffle_files=shuffle,
        read_config=read_config,
        decoders={image_key: tfds.decode.SkipDecoding()},  # decoded by the pipeline
    )
    dataset = dataset.map(lambda example: (example[image_key], example[label_key]))
    return Records(
        dataset,
        lambda encoded, label: (encoded, tf.cast(label, tf.int32), None),
        splits[split].num_examples,
        num_classes,
        tuple(getattr(label_feature, "names", None) or ()) or None,
    )


def _images_in(folder: str) -> list[str]:
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")
    )


def _class_folders(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def folder_images(
    data_dir: str, split: str, labels_file: str | None = None
) -> tuple[list[str], list[int], tuple[str, ...]]:
    """Lists a split of a JPEG folder tree: `(paths, labels, class_names)`.

    Classes are the sorted sub-folders of `train/` (also for other splits, so labels
    agree), or of the split's own folder when there is no `train/`. A flat split folder
    (ImageNet validation) takes each image's synset from the official label list, by the
    number in its file name: `labels_file`, else `imagenet_2012_validation_synset_labels.txt`
    in `data_dir` or in the split folder.
    """
    candidates = [os.path.join(data_dir, n) for n in FOLDER_SPLITS.get(split, (split,))]
    folder = next((c for c in candidates if os.path.isdir(c)), None)
    if folder is None:
        raise FileNotFoundError(f"no folder for split {split!r}: tried {candidates}")
    train_dir = os.path.join(data_dir, "train")
    classes = _class_folders(train_dir) if os.path.isdir(train_dir) else _class_folders(folder)
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    subfolders = _class_folders(folder)
    if subfolders:
        for name in subfolders:
            if name not in index:
                raise ValueError(
                    f"class folder {os.path.join(folder, name)!r} is not a class of {train_dir!r}"
                )
            images = _images_in(os.path.join(folder, name))
            paths += images
            labels += [index[name]] * len(images)
    else:
        paths = _images_in(folder)
        if paths:
            default = "imagenet_2012_validation_synset_labels.txt"
            found = [
                p
                for p in (os.path.join(data_dir, default), os.path.join(folder, default))
                if os.path.isfile(p)
            ]
            if labels_file is None and not found:
                raise FileNotFoundError(
                    f"{folder!r} holds images but no class folders; pass labels_file (the "
                    f"official validation label list) or put {default} in {data_dir!r}"
                )
            synsets = imagenet.read_validation_labels(labels_file or found[0])
            if not classes:
                classes = list(imagenet.imagenet_synsets())
                index = {name: i for i, name in enumerate(classes)}
            for path in paths:
                synset = imagenet.validation_synset(path, synsets)
                if synset not in index:
                    raise ValueError(f"{path!r} is of class {synset}, not a class of {train_dir!r}")
                labels.append(index[synset])
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder!r}")
    return paths, labels, tuple(classes)


def folder_source(
    data_dir: str | os.PathLike | None,
    split: str,
    *,
    num_classes: int | None,
    labels_file: str | None = None,
    num_shards: int,
    shard_index: int,
    shuffle: bool,
    seed: int | None,
    deterministic: bool,
) -> Records:
    """Image files in class folders (`train/<class>/*`, `validation/<class>/*` or flat)."""
    del deterministic  # a list of paths has one order; shuffles are seeded by `seed`
    data_dir = _require_dir(data_dir, "folder")
    paths, labels, classes = folder_images(data_dir, split, labels_file)
    if num_classes is not None and num_classes < len(classes):
        raise ValueError(f"num_classes={num_classes} but {data_dir!r} has {len(classes)} classes")
    dataset = tf.data.Dataset.from_tensor_slices((paths, tf.constant(labels, tf.int32)))
    dataset = dataset.shard(num_shards, shard_index)
    if shuffle:
        # Paths are cheap: shuffle them all, since the listing is sorted by class.
        dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    return Records(
        dataset,
        lambda path, label: (tf.io.read_file(path), label, None),
        len(paths),
        num_classes or len(classes),
        classes,
    )
