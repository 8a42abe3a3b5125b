"""Converts the ILSVRC-2012 distribution files to sharded TFRecords in the standard schema.

The engine behind `tools/build_imagenet_tfrecords.py` (which only parses flags). It reads
either the original tars, without extracting them, or their extracted folders:

- train: `ILSVRC2012_img_train.tar` (a tar of per-synset tars), or a `train/` folder of
  per-synset tars or per-synset folders, or per-synset folders directly in the input;
- validation: `ILSVRC2012_img_val.tar`, or a `val/` or `validation/` folder (flat, or in
  sub-folders), or the `ILSVRC2012_val_*.JPEG` files directly in the input; each image's
  synset is looked up by the number in its file name in the official validation label list.

Tar members are indexed once (offsets, no extraction), so shards are written in parallel
by worker processes that each seek into the tar. Each shard is written under a temporary
name and renamed when complete; a rerun reuses complete shards, and `manifest.json`,
written last, records the exact example count of every shard.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import re
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import tensorflow as tf
from absl import logging

from lars_tf.data import imagenet

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VALIDATION_TAR = "ILSVRC2012_img_val.tar"
LABELS_FILE = "imagenet_2012_validation_synset_labels.txt"
# Fixed so that reruns plan the same shards, and every shard mixes classes.
SHUFFLE_SEED = 12345
# TF's converter re-encodes CMYK and PNG images at this quality.
REENCODE_QUALITY = 100
# Quality of images stored resized (`resize=`): Caffe's ImageNet LMDBs held raw pixels; 95
# keeps the JPEG loss far below what the crop, flip and bilinear resampling change.
RESIZED_QUALITY = 95

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
_SYNSET = re.compile(r"^n\d{8}$")
# Start-of-frame markers; the byte 9 after one holds the number of colour components.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageRef(NamedTuple):
    """Where one image's bytes are: a whole file, or `size` bytes at `offset` in a tar."""

    path: str
    offset: int | None
    size: int | None
    filename: str
    synset: str


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES) and not os.path.basename(name).startswith(".")


def _check_synset(synset: str, where: str) -> str:
    if _SYNSET.match(synset) is None or synset not in imagenet.imagenet_synsets():
        raise ValueError(f"{where}: {synset!r} is not one of the 1,000 ILSVRC-2012 synsets")
    return synset


def _open_tar(path: str, fileobj: Any = None) -> tarfile.TarFile:
    try:
        # "r:" refuses compressed tars: the offsets the workers seek to need a plain tar.
        return tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj)
    except tarfile.ReadError as error:
        raise ValueError(f"{path} is not an uncompressed tar ({error})") from error


def _index_tar(path: str, synset_of: Callable[[str], str], base: int = 0, fileobj: Any = None):
    """Yields an ImageRef per image member of a plain tar (its data offset, no extraction)."""
    with _open_tar(path, fileobj) as archive:
        for member in archive:
            if member.isfile() and _is_image(member.name):
                name = os.path.basename(member.name)
                yield ImageRef(path, base + member.offset_data, member.size, name, synset_of(name))


def _index_train_tar(path: str) -> Iterator[ImageRef]:
    """Indexes the tar of per-synset tars (`n01440764.tar`, ...)."""
    with _open_tar(path) as outer:
        for member in outer:
            if not (member.isfile() and member.name.endswith(".tar")):
                continue
            synset = _check_synset(os.path.basename(member.name)[: -len(".tar")], path)
            inner = outer.extractfile(member)
            yield from _index_tar(path, lambda _, s=synset: s, member.offset_data, inner)


def _list_folder(folder: str) -> Iterator[str]:
    for root, _, files in os.walk(folder):
        for name in files:
            if _is_image(name):
                yield os.path.join(root, name)


def _find_train(input_dir: str) -> list[ImageRef]:
    tar_path = os.path.join(input_dir, TRAIN_TAR)
    if os.path.isfile(tar_path):
        logging.info("indexing %s (headers only; about a minute for all of ImageNet)", tar_path)
        return list(_index_train_tar(tar_path))
    train_dir = os.path.join(input_dir, "train")
    root = train_dir if os.path.isdir(train_dir) else input_dir
    refs = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        stem = entry.name[: -len(".tar")] if entry.name.endswith(".tar") else entry.name
        if _SYNSET.match(stem) is None:
            continue
        synset = _check_synset(stem, entry.path)
        if entry.is_dir():
            refs += [
                ImageRef(p, None, None, os.path.basename(p), synset)
                for p in _list_folder(entry.path)
            ]
        elif entry.is_file() and entry.name.endswith(".tar"):
            refs += _index_tar(entry.path, lambda _, s=synset: s)
    return refs


def _find_validation(input_dir: str, labels_file: str | None) -> list[ImageRef]:
    tar_path = os.path.join(input_dir, VALIDATION_TAR)
    paths: list[str] = []
    if not os.path.isfile(tar_path):
        folders = [os.path.join(input_dir, n) for n in ("validation", "val")]
        folder = next((f for f in folders if os.path.isdir(f)), None)
        if folder is not None:
            paths = sorted(_list_folder(folder))
        else:
            paths = sorted(
                e.path
                for e in os.scandir(input_dir)
                if e.is_file() and e.name.startswith("ILSVRC2012_val_")
            )
        if not paths:
            return []
    labels_path = labels_file or os.path.join(input_dir, LABELS_FILE)
    if not os.path.isfile(labels_path):
        raise FileNotFoundError(
            f"validation images found in {input_dir} but no label list at {labels_path}; "
            f"pass labels_file (--labels_file) pointing at {LABELS_FILE}"
        )
    labels = imagenet.read_validation_labels(labels_path)

    def synset_of(filename: str) -> str:
        return imagenet.validation_synset(filename, labels)

    if os.path.isfile(tar_path):
        refs = list(_index_tar(tar_path, synset_of))
    else:
        refs = [ImageRef(p, None, None, os.path.basename(p), synset_of(p)) for p in paths]
    return sorted(refs, key=lambda ref: imagenet.validation_number(ref.filename))


def find_images(
    input_dir: str | os.PathLike, labels_file: str | os.PathLike | None = None
) -> dict[str, list[ImageRef]]:
    """Lists the images of each split found in `input_dir` (tars or extracted folders).

    Returns:
        `{"train": [...], "validation": [...]}`, a split left out when absent.

    Raises:
        FileNotFoundError: when `input_dir` is missing or holds neither split.
    """
    input_dir = os.fspath(input_dir)
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"input directory {input_dir!r} does not exist")
    found = {
        "train": _find_train(input_dir),
        "validation": _find_validation(input_dir, labels_file),
    }
    found = {split: refs for split, refs in found.items() if refs}
    if not found:
        raise FileNotFoundError(
            f"no ILSVRC-2012 images in {input_dir!r}: expected {TRAIN_TAR} / {VALIDATION_TAR}, "
            "or train/<synset>/ and val/ folders"
        )
    return found


def plan_shards(refs: Sequence[ImageRef], num_shards: int, shuffle: bool) -> list[list[ImageRef]]:
    """Splits images into `num_shards` contiguous, near-equal shards (shuffled first if asked)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    refs = sorted(refs, key=lambda r: (r.synset, r.filename)) if shuffle else list(refs)
    if shuffle:
        random.Random(SHUFFLE_SEED).shuffle(refs)
    return [
        refs[i * len(refs) // num_shards : (i + 1) * len(refs) // num_shards]
        for i in range(num_shards)
    ]


def jpeg_components(data: bytes) -> int | None:
    """Returns the colour components of a JPEG (1 gray, 3 YCbCr, 4 CMYK/YCCK) from its header.

    Needed because `tf.io.decode_jpeg` silently converts CMYK to RGB, so decoding alone does
    not reveal the CMYK files that other readers (DALI, PIL-based loaders) trip over.
    """
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF_MARKERS:
            return data[i + 9] if i + 9 < len(data) else None
        if marker == 0xDA:  # start of scan before any frame header: malformed
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def prepare_image(data: bytes, resize: int | None = None) -> tuple[bytes, int, int, str | None]:
    """Checks that an image decodes and makes it a standard RGB or grayscale JPEG.

    Args:
        data: The image file's bytes.
        resize: When given, the image is stored resized to `resize x resize` (bilinear, the
            aspect ratio not kept), as the paper's Caffe LMDBs held ImageNet at 256 x 256:
            `preprocessing="paper"` then skips its own resize, which otherwise costs about
            what the decode costs.

    Returns:
        `(jpeg_bytes, height, width, reencoded)`, where `reencoded` names why the bytes were
        re-encoded (`"cmyk"`, `"png"`, `"other"`) or is None when they are kept as they are.

    Raises:
        tf.errors.InvalidArgumentError: when the image cannot be decoded.
    """
    reason = None
    if data[:3] == b"\xff\xd8\xff":
        image = tf.io.decode_jpeg(data, channels=3)
        if jpeg_components(data) == 4:
            reason = "cmyk"
    else:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        reason = "png" if data[:4] == b"\x89PNG" else "other"
    if resize is not None:
        resized = tf.image.resize(image, [resize, resize], method="bilinear")
        image = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
        data = tf.io.encode_jpeg(image, format="rgb", quality=RESIZED_QUALITY).numpy()
    elif reason is not None:
        # No chroma subsampling either: the re-encoded image stays as close as JPEG allows.
        data = tf.io.encode_jpeg(
            image, format="rgb", quality=REENCODE_QUALITY, chroma_downsampling=False
        ).numpy()
    return data, int(image.shape[0]), int(image.shape[1]), reason


def _read(ref: ImageRef, handles: dict[str, Any]) -> bytes:
    if ref.offset is None:
        with open(ref.path, "rb") as f:
            return f.read()
    if ref.path not in handles:
        handles[ref.path] = open(ref.path, "rb")  # noqa: SIM115 - kept open for the shard
    handle = handles[ref.path]
    handle.seek(ref.offset)
    return handle.read(ref.size)


def _count_records(path: str) -> int:
    return int(tf.data.TFRecordDataset(path).reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


def write_shard(task: tuple[str, str, int, int, list[ImageRef], int | None]) -> dict[str, Any]:
    """Writes one shard (temp file, then atomic rename); reuses it when already complete.

    Args:
        task: `(output_dir, split, index, num_shards, refs, resize)`.

    Returns:
        `{"name", "count", "planned", "reused", "reencoded": {filename: reason},
        "skipped": {filename: error}}`.
    """
    output_dir, split, index, num_shards, refs, resize = task
    name = imagenet.shard_name(split, index, num_shards)
    path = os.path.join(output_dir, name)
    result = {"name": name, "planned": len(refs), "reused": False, "reencoded": {}, "skipped": {}}
    if os.path.exists(path):
        return {**result, "count": _count_records(path), "reused": True}
    temporary = os.path.join(output_dir, f".{name}.tmp-{os.getpid()}")
    handles: dict[str, Any] = {}
    count = 0
    try:
        with tf.io.TFRecordWriter(temporary) as writer:
            for ref in refs:
                try:
                    data, height, width, reason = prepare_image(_read(ref, handles), resize)
                except tf.errors.OpError as error:
                    # One bad source image must not cost the other 1.28 million.
                    message = re.sub(r"\{\{.*?\}\}\s*", "", error.message).splitlines()[0]
                    result["skipped"][ref.filename] = message
                    continue
                if reason is not None:
                    result["reencoded"][ref.filename] = reason
                example = imagenet.make_example(
                    data,
                    label=imagenet.synset_label(ref.synset),
                    synset=ref.synset,
                    filename=ref.filename,
                    height=height,
                    width=width,
                )
                writer.write(example.SerializeToString())
                count += 1
        os.replace(temporary, path)
    finally:
        for handle in handles.values():
            handle.close()
        if os.path.exists(temporary):
            os.remove(temporary)
    return {**result, "count": count}


def _init_worker() -> None:
    # Each worker handles whole shards; one TF thread each keeps N workers on N cores.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def _plan_digest(shards: Sequence[Sequence[ImageRef]], resize: int | None = None) -> str:
    digest = hashlib.sha256()
    if resize is not None:  # None keeps the digests of manifests written before `resize`
        digest.update(f"resize={resize}\n".encode())
    for index, refs in enumerate(shards):
        for ref in refs:
            digest.update(f"{index}/{ref.synset}/{ref.filename}\n".encode())
    return digest.hexdigest()


class _Progress:
    """tqdm when installed, else a counter on stderr every 5 seconds."""

    def __init__(self, total: int, description: str, enabled: bool):
        self._bar = None
        self._done, self._total, self._description = 0, total, description
        self._enabled, self._last = enabled, 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=description, unit="img", file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._enabled and (time.monotonic() - self._last > 5 or self._done == self._total):
            self._last = time.monotonic()
            print(f"{self._description}: {self._done}/{self._total} images", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _convert_split(split, shards, output_dir, pool, progress, resize) -> dict[str, Any]:
    tasks = [(output_dir, split, i, len(shards), refs, resize) for i, refs in enumerate(shards)]
    bar = _Progress(sum(len(r) for r in shards), split, progress)
    results = []
    try:
        mapper = pool.imap_unordered(write_shard, tasks) if pool else map(write_shard, tasks)
        for result in mapper:
            results.append(result)
            bar.update(result["planned"])
    finally:
        bar.close()
    results.sort(key=lambda r: r["name"])
    reencoded = {k: v for r in results for k, v in r["reencoded"].items()}
    skipped = {k: v for r in results for k, v in r["skipped"].items()}
    for filename, error in sorted(skipped.items()):
        logging.warning("%s: skipped undecodable %s: %s", split, filename, error)
    logging.info(
        "%s: %d images in %d shards (%d reused), %d re-encoded to RGB JPEG, %d skipped",
        split,
        sum(r["count"] for r in results),
        len(results),
        sum(r["reused"] for r in results),
        len(reencoded),
        len(skipped),
    )
    return {
        "num_examples": sum(r["count"] for r in results),
        "shards": {r["name"]: r["count"] for r in results},
        "plan_digest": _plan_digest(shards, resize),
        "resize": resize,
        "reencoded": reencoded,
        "skipped": skipped,
    }


def _warn_stale(output_dir: str, split: str, shards: dict[str, int]) -> None:
    stale = sorted(
        name
        for name in os.listdir(output_dir)
        if name.startswith(f"{split}-") and name not in shards
    )
    if stale:
        # Readers use the manifest's list, but a plain `train-*` glob would pick these up.
        logging.warning(
            "%s: %d files in %s are not part of this conversion (e.g. %s); remove them",
            split,
            len(stale),
            output_dir,
            stale[0],
        )


def convert(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    train_shards: int = 1024,
    validation_shards: int = 128,
    labels_file: str | os.PathLike | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    resize: int | None = None,
) -> dict[str, Any]:
    """Converts ILSVRC-2012 (tars or extracted folders) to `train-*` / `validation-*` shards.

    Args:
        input_dir: folder holding the distribution tars or their extracted folders.
        output_dir: where shards and `manifest.json` go (created if missing).
        train_shards: number of train shards (fewer when there are fewer images).
        validation_shards: number of validation shards (likewise).
        labels_file: the official validation label list; default
            `<input_dir>/imagenet_2012_validation_synset_labels.txt`.
        num_workers: worker processes; default one per CPU core, 1 runs in this process.
        progress: show a progress bar per split.
        resize: store every image resized to `resize x resize` (see `prepare_image`): the
            paper's format (256), for `preprocessing="paper"` only, which then skips its
            resize. None (default) keeps the original JPEGs, which every mode can use.

    Returns:
        The manifest written to `<output_dir>/manifest.json`.
    """
    found = find_images(input_dir, labels_file)
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    previous = imagenet.read_manifest(output_dir) or {"splits": {}}
    requested = {"train": train_shards, "validation": validation_shards}
    manifest: dict[str, Any] = {"splits": dict(previous["splits"])}
    plans = {}
    for split, refs in found.items():
        num_shards = min(requested[split], len(refs))
        if num_shards < requested[split]:
            logging.warning("%s: only %d images, so %d shards", split, len(refs), num_shards)
        shards = plan_shards(refs, num_shards, shuffle=split == "train")
        done = previous["splits"].get(split, {})
        digest = _plan_digest(shards, resize)
        if done.get("plan_digest") == digest:
            if all(os.path.exists(os.path.join(output_dir, name)) for name in done["shards"]):
                logging.info("%s: already complete in %s", split, output_dir)
                continue
        elif done:
            # A different plan (input or shard count changed): never reuse its shards,
            # and forget them before writing, so an interrupted rerun reuses only new ones.
            for name in done["shards"]:
                if os.path.exists(os.path.join(output_dir, name)):
                    os.remove(os.path.join(output_dir, name))
            del manifest["splits"][split]
            imagenet.write_manifest(output_dir, manifest)
        plans[split] = shards
    num_workers = min(num_workers or os.cpu_count() or 1, sum(map(len, plans.values())) or 1)
    pool = None
    if num_workers > 1:
        # spawn, not fork: a forked copy of a process running TensorFlow can deadlock.
        pool = multiprocessing.get_context("spawn").Pool(num_workers, initializer=_init_worker)
    try:
        for split, shards in plans.items():
            manifest["splits"][split] = _convert_split(
                split, shards, output_dir, pool, progress, resize
            )
            imagenet.write_manifest(output_dir, manifest)
            _warn_stale(output_dir, split, manifest["splits"][split]["shards"])
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    imagenet.write_manifest(output_dir, manifest)
    return imagenet.read_manifest(output_dir)
