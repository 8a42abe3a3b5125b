"""Input pipelines: every source, preprocessing, sharding, corrupt images, determinism."""

from __future__ import annotations

import collections
import tarfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from jpeg_fixtures import (
    LABELS_NAME,
    jpeg_bytes,
    official_labels,
    png_bytes,
    random_pixels,
    tfds_builder,
    write_class_folders,
)

from lars_tf.data import (
    IMAGENET_MEAN_RGB,
    ImagePreprocessor,
    build_dataset,
    convert,
    imagenet,
    preprocessing,
)
from lars_tf.data import preprocessing as pp

SYNSETS = imagenet.imagenet_synsets()


def write_shards(folder: Path, split: str, images: list[bytes], num_files: int) -> list[int]:
    """Writes ImageNet-schema records round-robin into `num_files` files, without a
    manifest; record i gets label i. Returns the labels."""
    folder.mkdir(parents=True, exist_ok=True)
    writers = [
        tf.io.TFRecordWriter(str(folder / imagenet.shard_name(split, i, num_files)))
        for i in range(num_files)
    ]
    for i, data in enumerate(images):
        example = imagenet.make_example(
            data, label=i, synset=SYNSETS[i], filename=f"{i}.JPEG", height=0, width=0
        )
        writers[i % num_files].write(example.SerializeToString())
    for writer in writers:
        writer.close()
    return list(range(len(images)))


def labels_of(dataset: tf.data.Dataset) -> list[int]:
    return [int(y) for _, labels in dataset for y in labels.numpy()]


def first_labels(dataset: tf.data.Dataset, count: int) -> list[int]:
    return [int(y) for _, y in dataset.unbatch().take(count)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """12 train and 10 validation records of distinct labels in 4 (train) / 2 files."""
    root = tmp_path_factory.mktemp("shards")
    write_shards(root, "train", [jpeg_bytes(40, 48, seed=i) for i in range(12)], 4)
    write_shards(root, "validation", [jpeg_bytes(36, 30, seed=50 + i) for i in range(10)], 2)
    return root


# --- preprocessing -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", pp.MODES)
@pytest.mark.parametrize("is_training", [True, False])
@pytest.mark.parametrize("encoder", [jpeg_bytes, png_bytes])
def test_every_mode_gives_the_requested_shape_dtype_and_range(mode, is_training, encoder):
    preprocessor = ImagePreprocessor(
        mode, is_training, image_size=16, resize_size=20, dtype="mixed_bfloat16"
    )
    seed = tf.constant([1, 2], tf.int64)
    image = preprocessor(tf.constant(encoder(30, 44, seed=3)), None, seed)
    assert image.shape == (16, 16, 3) and image.dtype == tf.bfloat16
    values = image.numpy().astype(np.float32)
    low, high = (
        (0, 255) if mode == "none" else (-max(IMAGENET_MEAN_RGB), 255 - min(IMAGENET_MEAN_RGB))
    )
    assert low - 1 <= values.min() and values.max() <= high + 1
    assert values.std() > 5  # a real image, not a constant


def resized_uint8(data: bytes, size: int) -> np.ndarray:
    """The reference: bilinear resize of the decoded JPEG, rounded to uint8 values."""
    resized = tf.image.resize(tf.io.decode_jpeg(data, channels=3), [size, size]).numpy()
    return np.floor(resized + 0.5)


def test_paper_evaluation_is_resize_then_central_crop():
    data = jpeg_bytes(30, 50, seed=4)
    preprocessor = ImagePreprocessor("paper", False, image_size=20, resize_size=26, mean=None)
    np.testing.assert_array_equal(
        preprocessor(tf.constant(data)), resized_uint8(data, 26)[3:23, 3:23]
    )


def test_paper_training_crops_from_the_resized_image_and_may_flip():
    data = jpeg_bytes(30, 50, seed=5)
    preprocessor = ImagePreprocessor("paper", True, image_size=20, resize_size=26, mean=None)
    resized = resized_uint8(data, 26)
    crops = {
        (y, x, flip): (
            resized[y : y + 20, x : x + 20, :][:, ::-1] if flip else resized[y : y + 20, x : x + 20]
        )
        for y in range(7)
        for x in range(7)
        for flip in (False, True)
    }
    seen = set()
    for s in range(12):
        image = preprocessor(tf.constant(data), None, tf.constant([s, 0], tf.int64)).numpy()
        match = [key for key, crop in crops.items() if np.array_equal(crop, image)]
        assert match, f"seed {s}: not a crop of the 26x26 resize"
        seen.add(match[0])
    assert len(seen) > 3 and {key[2] for key in seen} == {False, True}


def test_paper_mode_on_images_stored_at_the_resize_size_skips_nothing_but_time():
    # The converter's `resize` stores images at resize_size; the mode then skips its resize,
    # which must give exactly what resizing would (bilinear maps a size onto itself).
    image = tf.io.decode_jpeg(jpeg_bytes(26, 26, seed=6), channels=3)
    np.testing.assert_array_equal(
        preprocessing._resize_unless_sized(image, 26), tf.image.resize(image, [26, 26])
    )
    other = jpeg_bytes(30, 50, seed=6)
    np.testing.assert_array_equal(
        preprocessing._resize_unless_sized(tf.io.decode_jpeg(other, channels=3), 26),
        resized_uint8(other, 26),
    )
    evaluation = ImagePreprocessor("paper", False, image_size=20, resize_size=26, mean=None)
    got = evaluation(tf.constant(jpeg_bytes(26, 26, seed=6)))
    np.testing.assert_array_equal(got, tf.cast(image, tf.float32)[3:23, 3:23])


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("subsampling", [True, False])
def test_paper_mode_decodes_only_the_crop_window_of_a_stored_jpeg(channels, subsampling):
    # Images stored at the resize size (256 x 256 in the paper) are decoded in the crop window
    # only (decode_and_crop_jpeg): bit for bit the crop of the whole decoded image, and the
    # crop tf.image.stateless_random_crop cuts with the same seed (the pipeline's crop before).
    pixels = random_pixels(64, 64, 3, seed=21)
    data = tf.io.encode_jpeg(pixels, quality=90, chroma_downsampling=subsampling).numpy()
    whole = tf.io.decode_jpeg(data, channels=channels)
    preprocessor = ImagePreprocessor(
        "paper", True, image_size=45, resize_size=64, channels=channels, mean=None
    )
    offsets = set()
    for s in range(16):
        seed = tf.constant([s, 7], tf.int64)
        crop_seed, _ = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        window = pp.paper_crop_window(64, 45, crop_seed).numpy()
        y, x = int(window[0]), int(window[1])
        offsets.add((y, x))
        cut = pp._paper_crop(tf.constant(data), tf.constant(window), 64, channels)
        np.testing.assert_array_equal(cut, whole[y : y + 45, x : x + 45])
        expected = tf.image.stateless_random_crop(whole, [45, 45, channels], crop_seed)
        np.testing.assert_array_equal(cut, expected)
        # The whole preprocessing: that crop, flipped or not.
        image = preprocessor.prepare(tf.constant(data), None, seed).numpy()
        assert np.array_equal(image, expected) or np.array_equal(image, expected[:, ::-1])
    assert len(offsets) > 8  # odd offsets too: windows that do not start on a JPEG block


@pytest.mark.parametrize("height, width", [(64, 64), (45, 77)])
def test_decode_and_crop_equals_decoding_whole_and_cropping(height, width):
    # TensorFlow's decode_and_crop_jpeg alone upsamples a 4:2:0 JPEG's chroma as if the
    # window's edges were the image's (an edge column off in about half the windows); the
    # margin decode_and_crop adds makes every window exact, the Inception crop's included.
    data = jpeg_bytes(height, width, seed=height)  # TensorFlow encodes 4:2:0 by default
    whole = tf.io.decode_jpeg(data, channels=3).numpy()
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
        y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        window = tf.constant([y, x, h, w], tf.int32)
        for known_width in (None, tf.constant(width)):
            np.testing.assert_array_equal(
                pp.decode_and_crop(tf.constant(data), window, 3, known_width),
                whole[y : y + h, x : x + w],
            )


def test_paper_mode_crop_of_a_stored_png_and_of_an_image_to_resize():
    png = png_bytes(26, 26, seed=8)
    window = tf.constant([5, 2, 20, 20])
    np.testing.assert_array_equal(
        pp._paper_crop(tf.constant(png), window, 26, 3), tf.io.decode_png(png)[5:25, 2:22]
    )
    other = jpeg_bytes(30, 50, seed=8)
    np.testing.assert_array_equal(
        pp._paper_crop(tf.constant(other), window, 26, 3), resized_uint8(other, 26)[5:25, 2:22]
    )


def test_inception_crop_decodes_a_window_guided_by_boxes():
    data = tf.constant(jpeg_bytes(64, 64, seed=6))
    box = tf.constant([[[0.5, 0.5, 1.0, 1.0]]])  # the lower right quarter
    for s in range(10):
        window = pp.random_crop_window(tf.constant([64, 64]), box, tf.constant([s, 1], tf.int64))
        y, x, h, w = window.numpy()
        assert y >= 0 and x >= 0 and y + h <= 64 and x + w <= 64
        area = max(0, min(y + h, 64) - max(y, 32)) * max(0, min(x + w, 64) - max(x, 32))
        assert area >= 0.1 * 32 * 32 - 1  # covers >= 10 % of the box
        crop = pp.decode_and_crop(data, window, 3)
        full = tf.io.decode_jpeg(data, channels=3)[y : y + h, x : x + w]
        assert crop.shape == (h, w, 3)
        # Equal but for chroma upsampling at the window's edges.
        assert np.abs(crop.numpy().astype(int) - full.numpy()).mean() < 1


def test_center_crop_window_is_the_central_square_of_the_crop_fraction():
    window = pp.center_crop_window(tf.constant([300, 400]), 224, 256)
    assert window.numpy().tolist() == [19, 69, 262, 262]


def test_same_seed_same_image_other_seed_other_image():
    data = tf.constant(jpeg_bytes(40, 40, seed=7))
    preprocessor = ImagePreprocessor("inception", True, image_size=24)
    one, two = (preprocessor(data, None, tf.constant([s, 0], tf.int64)) for s in (3, 3))
    other = preprocessor(data, None, tf.constant([4, 0], tf.int64))
    np.testing.assert_array_equal(one, two)
    assert not np.array_equal(one, other)


def test_normalization_mean_std_and_grayscale():
    data = tf.constant(jpeg_bytes(16, 16, seed=8))
    mean, std = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)
    raw = ImagePreprocessor("eval", False, image_size=16, resize_size=16, mean=None)(data)
    normalized = ImagePreprocessor(
        "eval", False, image_size=16, resize_size=16, mean=mean, std=std
    )(data)
    np.testing.assert_allclose(normalized, (raw - np.array(mean)) / np.array(std), rtol=1e-5)
    gray = ImagePreprocessor("cifar", True, image_size=16, channels=1, mean=(127.0,), std=(64.0,))
    assert gray(data, None, tf.constant([0, 0], tf.int64)).shape == (16, 16, 1)


def test_defaults_and_invalid_arguments():
    assert [pp.default_resize_size(s) for s in (224, 227, 32, 299)] == [256, 256, 37, 342]
    assert pp.compute_dtype("mixed_float16") == tf.float16
    assert pp.compute_dtype(keras.DTypePolicy("mixed_bfloat16")) == tf.bfloat16
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        ImagePreprocessor("random", True, 16)
    with pytest.raises(ValueError, match="resize_size=8 must be >= image_size=16"):
        ImagePreprocessor("paper", True, 16, resize_size=8)
    with pytest.raises(ValueError, match="mean has 3 values; expected 1 or channels=1"):
        ImagePreprocessor("paper", True, 16, channels=1)
    with pytest.raises(ValueError, match="dtype must be a float dtype"):
        ImagePreprocessor("paper", True, 16, dtype="int32")


# --- tfrecord source -----------------------------------------------------------------------


def test_tfrecord_evaluation_keeps_every_example_in_order(shards):
    spec = build_dataset(
        "tfrecord",
        split="validation",
        batch_size=4,
        image_size=16,
        data_dir=str(shards),
        is_training=False,
        preprocessing="eval",
        dtype="float16",
    )
    assert (spec.num_examples, spec.num_classes, spec.image_shape) == (10, 1000, (16, 16, 3))
    assert spec.class_names == SYNSETS
    batches = list(spec.dataset)
    assert [len(labels) for _, labels in batches] == [4, 4, 2]  # the remainder is kept
    assert sorted(labels_of(spec.dataset)) == list(range(10))
    images, labels = batches[0]
    assert images.dtype == tf.float16 and labels.dtype == tf.int32
    assert spec.steps_per_epoch(4) == 2 and spec.steps_per_epoch(4, drop_remainder=False) == 3
    assert spec.corrupt_count() == 0


def test_tfrecord_training_shuffles_repeats_and_drops_the_remainder(shards):
    spec = build_dataset(
        "tfrecord",
        split="train",
        batch_size=5,
        image_size=16,
        data_dir=str(shards),
        is_training=True,
        preprocessing="paper",
        resize_size=20,
        seed=1,
    )
    labels = []
    for images, batch in spec.dataset.take(6):  # 30 examples: 2.5 passes over 12
        assert images.shape == (5, 16, 16, 3)
        labels += batch.numpy().tolist()
    assert sorted(labels[:12]) == list(range(12))  # the first pass is a permutation
    assert labels[:12] != list(range(12))
    assert collections.Counter(labels[:24]) == collections.Counter(2 * list(range(12)))


def test_manifest_counts_are_used(tmp_path):
    write_shards(tmp_path, "train", [jpeg_bytes(8, 8, seed=i) for i in range(3)], 1)
    imagenet.write_manifest(
        tmp_path, {"splits": {"train": {"num_examples": 3, "shards": {"train-00000-of-00001": 3}}}}
    )
    (tmp_path / "train-99999-of-99999").write_bytes(b"stale shard not in the manifest")
    spec = build_dataset(
        "tfrecord",
        split="train",
        batch_size=1,
        image_size=8,
        data_dir=str(tmp_path),
        is_training=False,
    )
    assert spec.num_examples == 3 and len(list(spec.dataset)) == 3


@pytest.mark.parametrize("num_files", [4, 1])  # file sharding; record sharding
@pytest.mark.parametrize("is_training", [False, True])
def test_two_workers_see_disjoint_examples_that_cover_the_split(tmp_path, num_files, is_training):
    all_labels = write_shards(
        tmp_path, "train", [jpeg_bytes(8, 8, seed=i) for i in range(11)], num_files
    )
    seen = []
    for rank in range(2):
        spec = build_dataset(
            "tfrecord",
            split="train",
            batch_size=1,
            image_size=8,
            data_dir=str(tmp_path),
            is_training=is_training,
            num_shards=2,
            shard_index=rank,
            preprocessing="cifar",
        )
        assert spec.num_examples == 11
        if is_training:
            count = len(
                labels_of(
                    build_dataset(
                        "tfrecord",
                        split="train",
                        batch_size=1,
                        image_size=8,
                        data_dir=str(tmp_path),
                        is_training=False,
                        num_shards=2,
                        shard_index=rank,
                    ).dataset
                )
            )
            seen.append(first_labels(spec.dataset, count))
        else:
            seen.append(labels_of(spec.dataset))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == all_labels


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    images = [jpeg_bytes(16, 16, seed=i) for i in range(10)]
    images[0] = images[0][:100]  # truncated, first
    images[4] = b"not an image at all"
    images[9] = images[9][:-300]  # truncated, last of the pass
    write_shards(tmp_path, "validation", images, 2)
    write_shards(tmp_path, "train", images, 2)
    spec = build_dataset(
        "tfrecord",
        split="validation",
        batch_size=3,
        image_size=16,
        data_dir=str(tmp_path),
        is_training=False,
        preprocessing="eval",
    )
    assert sorted(labels_of(spec.dataset)) == [1, 2, 3, 5, 6, 7, 8]
    assert spec.corrupt_count() == 3
    assert sorted(labels_of(spec.dataset)) == [1, 2, 3, 5, 6, 7, 8]
    assert spec.corrupt_count() == 6  # counted again on the second pass
    train = build_dataset(
        "tfrecord",
        split="train",
        batch_size=7,
        image_size=16,
        data_dir=str(tmp_path),
        is_training=True,
        preprocessing="inception",
        seed=0,
        shuffle_buffer=2,
    )
    for images_batch, labels in train.dataset.take(4):  # 4 passes of 7 good images
        assert not set(labels.numpy()) & {0, 4, 9}
        assert np.isfinite(images_batch.numpy()).all()
    assert train.corrupt_count() >= 9


def test_a_damaged_tfrecord_file_does_not_crash_the_run(tmp_path):
    write_shards(tmp_path, "validation", [jpeg_bytes(16, 16, seed=i) for i in range(6)], 2)
    damaged = tmp_path / "validation-00000-of-00002"  # labels 0, 2, 4
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the second record: its checksum fails
    damaged.write_bytes(bytes(data))
    options = dict(split="validation", batch_size=2, image_size=8, is_training=False)
    with pytest.raises(ValueError, match="is damaged"):  # counting the records, no manifest
        build_dataset("tfrecord", data_dir=str(tmp_path), **options)
    shards = {p.name: 3 for p in tmp_path.glob("validation-*")}
    imagenet.write_manifest(
        tmp_path, {"splits": {"validation": {"num_examples": 6, "shards": shards}}}
    )
    spec = build_dataset("tfrecord", data_dir=str(tmp_path), **options)
    labels = labels_of(spec.dataset)
    assert {1, 3, 5} <= set(labels) and 0 in labels and 2 not in labels
    assert spec.corrupt_count() == 1


def test_deterministic_pipelines_repeat_exactly(shards):
    def run(seed):
        spec = build_dataset(
            "tfrecord",
            split="train",
            batch_size=4,
            image_size=16,
            data_dir=str(shards),
            is_training=True,
            preprocessing="inception",
            deterministic=True,
            seed=seed,
        )
        return [(x.numpy(), y.numpy()) for x, y in spec.dataset.take(5)]

    first, again, other = run(3), run(3), run(4)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(x1, x2)
    assert any(not np.array_equal(x1, x2) for (x1, _), (x2, _) in zip(first, other, strict=True))


@pytest.mark.parametrize("source", ["tfrecord", "synthetic"])
def test_uint8_output_normalised_later_is_the_float_output(shards, source):
    # normalize=False hands the float work to the model (train.py --normalize_on_device); the
    # numbers must be the same as normalising in the pipeline.
    def run(normalize):
        spec = build_dataset(
            source,
            split="train",
            batch_size=4,
            image_size=16,
            data_dir=None if source == "synthetic" else str(shards),
            is_training=True,
            preprocessing="paper",
            deterministic=True,
            seed=5,
            mean=(120.0, 110.0, 100.0),
            std=(60.0, 50.0, 40.0),
            normalize=normalize,
            num_examples=8 if source == "synthetic" else None,
        )
        return [(x.numpy(), y.numpy()) for x, y in spec.dataset.take(3)]

    preprocessor = ImagePreprocessor("paper", True, 16, mean=(120, 110, 100), std=(60, 50, 40))
    for (raw, y1), (floats, y2) in zip(run(False), run(True), strict=True):
        assert raw.dtype == np.uint8 and floats.dtype == np.float32
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_allclose(preprocessor.normalize(raw), floats, rtol=1e-6, atol=1e-6)


def test_missing_or_empty_data_locations_are_named(tmp_path):
    options = dict(split="train", batch_size=1, image_size=8, is_training=True)
    with pytest.raises(ValueError, match="data_dir is required"):
        build_dataset("tfrecord", **options)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset("tfrecord", data_dir=str(tmp_path / "nowhere"), **options)
    with pytest.raises(FileNotFoundError, match=r"train-\*"):
        build_dataset("tfrecord", data_dir=str(tmp_path), **options)
    (tmp_path / "train-00000-of-00001").write_bytes(b"")
    with pytest.raises(ValueError, match="hold no records"):
        build_dataset("tfrecord", data_dir=str(tmp_path), **options)
    with pytest.raises(FileNotFoundError, match="no folder for split"):
        build_dataset("folder", data_dir=str(tmp_path), **options)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        build_dataset("folder", data_dir=str(tmp_path), **options)
    with pytest.raises(ValueError, match="source must be one of"):
        build_dataset("lmdb", data_dir=str(tmp_path), **options)
    with pytest.raises(ValueError, match="shard_index must be in"):
        build_dataset("synthetic", num_shards=2, shard_index=2, **options)


def test_keras_fit_consumes_the_pipeline(shards):
    spec = build_dataset(
        "tfrecord",
        split="train",
        batch_size=4,
        image_size=16,
        data_dir=str(shards),
        is_training=True,
        preprocessing="inception",
        seed=0,
    )
    model = keras.Sequential(
        [
            keras.Input(spec.image_shape),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(1000),
        ]
    )
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(spec.dataset, steps_per_epoch=2, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


# --- folder, tfds and synthetic sources ----------------------------------------------------


def test_folder_source_class_folders_and_validation_fallback_to_test(tmp_path):
    classes = {"cat": 3, "dog": 2, "eel": 4}
    for split, offset in (("train", 0), ("test", 100)):
        write_class_folders(
            tmp_path,
            split,
            {
                c: [jpeg_bytes(12, 12, seed=offset + i) for i in range(n)]
                for c, n in classes.items()
            },
        )
    spec = build_dataset(
        "folder",
        split="validation",
        batch_size=4,
        image_size=8,
        data_dir=str(tmp_path),
        is_training=False,
        preprocessing="cifar",
    )
    assert spec.class_names == ("cat", "dog", "eel") and spec.num_classes == 3
    assert spec.num_examples == 9
    assert sorted(labels_of(spec.dataset)) == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    train = build_dataset(
        "folder",
        split="train",
        batch_size=3,
        image_size=8,
        data_dir=str(tmp_path),
        is_training=True,
        preprocessing="cifar",
        channels=1,
        mean=(120.0,),
        seed=2,
    )
    images, labels = next(iter(train.dataset))
    assert images.shape == (3, 8, 8, 1)
    assert sorted(first_labels(train.dataset, 9)) == [0, 0, 0, 1, 1, 2, 2, 2, 2]


def test_folder_source_flat_validation_uses_the_label_list(tmp_path):
    write_class_folders(
        tmp_path, "train", {SYNSETS[7]: [jpeg_bytes(8, 8)], SYNSETS[3]: [jpeg_bytes(8, 8)]}
    )
    (tmp_path / "val").mkdir()
    synsets = [SYNSETS[3], SYNSETS[7], SYNSETS[7], SYNSETS[3], SYNSETS[7]]
    for number in (5, 2, 4):
        (tmp_path / "val" / f"ILSVRC2012_val_{number:08d}.JPEG").write_bytes(jpeg_bytes(8, 8))
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(synsets) + "\n")
    options = dict(
        split="validation", batch_size=8, image_size=8, data_dir=str(tmp_path), is_training=False
    )
    with pytest.raises(FileNotFoundError, match="labels_file"):
        build_dataset("folder", **options)
    spec = build_dataset("folder", labels_file=str(labels_file), **options)
    # Classes sorted: SYNSETS[3] -> 0, SYNSETS[7] -> 1; files 2, 4, 5 are 7, 3, 7.
    assert spec.class_names == (SYNSETS[3], SYNSETS[7])
    assert labels_of(spec.dataset) == [1, 0, 1]


LarsTfTinyImages = tfds_builder(
    "LarsTfTinyImages", num_classes=20, splits={"train": (0, 20, 20, 24), "test": (100, 7, 20, 24)}
)


def test_tfds_source_reads_a_prepared_dataset_by_name(tmp_path):
    LarsTfTinyImages(data_dir=str(tmp_path)).download_and_prepare()
    options = dict(batch_size=4, image_size=16, data_dir=str(tmp_path), preprocessing="eval")
    spec = build_dataset(
        "tfds:lars_tf_tiny_images", split="validation", is_training=False, **options
    )
    assert (spec.num_examples, spec.num_classes) == (7, 20)  # "validation" -> "test"
    assert sorted(labels_of(spec.dataset)) == list(range(7))
    seen = [
        labels_of(
            build_dataset(
                "tfds:lars_tf_tiny_images",
                split="train",
                is_training=False,
                num_shards=2,
                shard_index=rank,
                **options,
            ).dataset
        )
        for rank in range(2)
    ]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(20))
    train = build_dataset(
        "tfds:lars_tf_tiny_images", split="train", is_training=True, seed=0, **options
    )
    images, labels = next(iter(train.dataset))
    assert images.shape == (4, 16, 16, 3) and labels.dtype == tf.int32


def test_tfds_source_never_downloads(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared"):
        build_dataset(
            "tfds:cifar10",
            split="train",
            batch_size=1,
            image_size=8,
            data_dir=str(tmp_path),
            is_training=False,
        )


@pytest.mark.parametrize("is_training", [True, False])
def test_synthetic_source(is_training):
    spec = build_dataset(
        "synthetic",
        split="train",
        batch_size=3,
        image_size=12,
        is_training=is_training,
        num_classes=5,
        num_examples=20,
        num_shards=2,
        dtype="bfloat16",
    )
    batches = list(spec.dataset.take(10))
    assert len(batches) == (10 if is_training else 4)  # ceil(20 / (3 * 2))
    images, labels = batches[0]
    assert images.shape == (3, 12, 12, 3) and images.dtype == tf.bfloat16
    assert labels.dtype == tf.int32 and set(labels.numpy()) <= set(range(5))
    assert float(tf.reduce_min(images)) >= -124 and float(tf.reduce_max(images)) <= 152
    assert spec.num_examples == 20 and spec.steps_per_epoch(6) == 3 and spec.corrupt_count() == 0
    default = build_dataset(
        "synthetic", split="validation", batch_size=1, image_size=8, is_training=False
    )
    assert (default.num_examples, default.num_classes) == (50_000, 1000)


# --- the shared data -----------------------------------------------------------------------


def _thumbnails(images: list[bytes]) -> np.ndarray:
    return np.stack(
        [tf.image.resize(tf.io.decode_jpeg(d, channels=3), [32, 32]).numpy() for d in images]
    )


@pytest.fixture(scope="module")
def mini_validation(shared_data):
    """(numbers, thumbnails, official label list) of the shared mini ImageNet validation."""
    source = shared_data / "mini-ilsvrc2012"
    if not source.is_dir():
        pytest.skip(f"{source} not found")
    with tarfile.open(source / "ILSVRC2012_img_val.tar") as archive:
        members = [(m.name, archive.extractfile(m).read()) for m in archive if m.isfile()]
    numbers = [imagenet.validation_number(name) for name, _ in members]
    return source, members, numbers, _thumbnails([d for _, d in members])


def assert_labels_match_official_list(spec, mini_validation, class_index):
    """Each image of the pipeline is matched to its source file by content; its label must
    be the official synset of that file's number."""
    source, _, numbers, thumbnails = mini_validation
    official = official_labels(source / LABELS_NAME)
    matched = set()
    for images, labels in spec.dataset:
        for image, label in zip(images.numpy(), labels.numpy(), strict=True):
            distances = np.abs(thumbnails - image).mean(axis=(1, 2, 3))
            best = int(distances.argmin())
            assert distances[best] < 2, "the image is none of the validation files"
            assert label == class_index[official[numbers[best] - 1]]
            matched.add(best)
    assert len(matched) == len(numbers) == spec.num_examples == 500


@pytest.mark.slow
def test_mini_imagenet_through_tfrecords(mini_validation, tmp_path):
    source = mini_validation[0]
    convert.convert(
        str(source),
        str(tmp_path),
        train_shards=4,
        validation_shards=2,
        num_workers=1,
        progress=False,
    )
    spec = build_dataset(
        "tfrecord",
        split="validation",
        batch_size=64,
        image_size=32,
        data_dir=str(tmp_path),
        is_training=False,
        preprocessing="none",
    )
    assert_labels_match_official_list(spec, mini_validation, {s: i for i, s in enumerate(SYNSETS)})
    train = build_dataset(
        "tfrecord",
        split="train",
        batch_size=50,
        image_size=64,
        data_dir=str(tmp_path),
        is_training=True,
        preprocessing="inception",
        seed=0,
    )
    assert train.num_examples == 1000 and train.steps_per_epoch(256) == 3
    images, labels = next(iter(train.dataset))
    assert images.shape == (50, 64, 64, 3)
    with tarfile.open(source / "ILSVRC2012_img_train.tar") as archive:
        synsets = {member.name[: -len(".tar")] for member in archive}
    assert {SYNSETS[label] for label in labels.numpy()} <= synsets


@pytest.mark.slow
def test_mini_imagenet_through_extracted_folders(mini_validation, tmp_path):
    source, members, _, _ = mini_validation
    with tarfile.open(source / "ILSVRC2012_img_train.tar") as outer:
        for member in outer:
            synset = member.name[: -len(".tar")]
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                inner.extractall(tmp_path / "train" / synset, filter="data")
    (tmp_path / "val").mkdir()
    for name, data in members:
        (tmp_path / "val" / name).write_bytes(data)
    spec = build_dataset(
        "folder",
        split="validation",
        batch_size=64,
        image_size=32,
        data_dir=str(tmp_path),
        is_training=False,
        preprocessing="none",
        labels_file=str(source / LABELS_NAME),
    )
    assert len(spec.class_names) == 10
    assert_labels_match_official_list(
        spec, mini_validation, {s: i for i, s in enumerate(spec.class_names)}
    )
    train = build_dataset(
        "folder",
        split="train",
        batch_size=100,
        image_size=32,
        data_dir=str(tmp_path),
        is_training=False,
        preprocessing="eval",
    )
    assert collections.Counter(labels_of(train.dataset)) == {i: 100 for i in range(10)}


def test_cifar10_jpeg_folders(shared_data, tmp_path):
    tarball = shared_data / "cifar10-jpeg.tar.gz"
    if not tarball.exists():
        pytest.skip(f"{tarball} not found")
    with tarfile.open(tarball) as archive:  # a few images per class and split
        wanted = [m for m in archive if m.isfile() and int(Path(m.name).stem) < 3]
        archive.extractall(tmp_path, members=wanted, filter="data")
    spec = build_dataset(
        "folder",
        split="validation",
        batch_size=16,
        image_size=32,
        data_dir=str(tmp_path),
        is_training=False,
        preprocessing="cifar",
        mean=pp.CIFAR10_MEAN_RGB,
        std=pp.CIFAR10_STD_RGB,
    )
    assert spec.class_names[0] == "airplane" and spec.class_names[-1] == "truck"
    assert collections.Counter(labels_of(spec.dataset)) == {i: 3 for i in range(10)}
    images, _ = next(iter(spec.dataset))
    assert images.shape == (16, 32, 32, 3) and abs(float(tf.reduce_mean(images))) < 1.5
