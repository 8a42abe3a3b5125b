"""The ILSVRC-2012 -> TFRecord converter: tars and folders, labels, re-encoding, reruns."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from jpeg_fixtures import (
    LABELS_NAME,
    cmyk_jpeg_bytes,
    jpeg_bytes,
    official_labels,
    png_bytes,
    write_ilsvrc,
)

from lars_tf.data import convert, imagenet

SYNSETS = imagenet.imagenet_synsets()
FISH, SHARK, DOG = SYNSETS[0], SYNSETS[2], SYNSETS[155]  # n01440764, n01491361, n02086240


def read_records(path: Path) -> list[dict]:
    """Every record of one shard file, parsed with the full standard schema."""
    records = []
    for serialized in tf.data.TFRecordDataset(str(path)):
        features = tf.train.Example.FromString(serialized.numpy()).features.feature
        records.append(
            {
                key: (value.bytes_list.value or value.int64_list.value or value.float_list.value)
                for key, value in features.items()
            }
        )
    return records


def read_split(output: Path, split: str) -> list[dict]:
    return [r for path in sorted(output.glob(f"{split}-*")) for r in read_records(path)]


def generated_distribution():
    """Train: 3 synsets (one CMYK JPEG, one PNG named .JPEG, one corrupt file); validation:
    numbers 1..7 with synsets that do not follow file order."""
    cmyk = cmyk_jpeg_bytes(30, 36, seed=90) or jpeg_bytes(30, 36, seed=90)
    train = {
        FISH: [jpeg_bytes(30, 40, seed=i) for i in range(4)],
        SHARK: [jpeg_bytes(40, 30, seed=10 + i) for i in range(3)] + [png_bytes(24, 24), cmyk],
        DOG: [jpeg_bytes(36, 36, 1, seed=20), jpeg_bytes(36, 36, seed=21), b"\xff\xd8\xffjunk"],
    }
    order = [DOG, FISH, DOG, SHARK, FISH, SHARK, DOG]
    validation = {n: (order[n - 1], jpeg_bytes(32, 32, seed=100 + n)) for n in range(1, 8)}
    return train, validation


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ilsvrc")
    train, validation = generated_distribution()
    write_ilsvrc(root / "tars", train, validation, as_tars=True)
    manifest = convert.convert(
        str(root / "tars"),
        str(root / "out"),
        train_shards=3,
        validation_shards=2,
        num_workers=1,
        progress=False,
    )
    return root, manifest


def test_jpeg_components_reads_the_frame_header():
    assert convert.jpeg_components(jpeg_bytes(8, 8, 3)) == 3
    assert convert.jpeg_components(jpeg_bytes(8, 8, 1)) == 1
    assert convert.jpeg_components(png_bytes(8, 8)) is None
    cmyk = cmyk_jpeg_bytes(8, 8)
    if cmyk is None:
        pytest.skip("PIL is not installed, so no CMYK JPEG can be made")
    assert convert.jpeg_components(cmyk) == 4


@pytest.mark.parametrize("kind", ["rgb", "gray", "png", "cmyk"])
def test_prepare_image_keeps_jpegs_and_reencodes_the_rest(kind):
    data = {
        "rgb": jpeg_bytes(20, 30),
        "gray": jpeg_bytes(20, 30, 1),
        "png": png_bytes(20, 30),
        "cmyk": cmyk_jpeg_bytes(20, 30),
    }[kind]
    if data is None:
        pytest.skip("PIL is not installed, so no CMYK JPEG can be made")
    encoded, height, width, reason = convert.prepare_image(data)
    assert (height, width) == (20, 30)
    assert reason == {"rgb": None, "gray": None, "png": "png", "cmyk": "cmyk"}[kind]
    assert (encoded == data) == (reason is None)
    assert encoded[:3] == b"\xff\xd8\xff"
    assert convert.jpeg_components(encoded) in (1, 3)
    decoded = tf.io.decode_jpeg(encoded, channels=3).numpy()
    original = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    # Re-encoded at quality 100: the pixels survive (CMYK goes through a colour conversion).
    assert np.abs(decoded.astype(float) - original).mean() < 3


def test_converts_tars_to_the_standard_schema(converted):
    root, manifest = converted
    out = root / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "manifest.json",
        "train-00000-of-00003",
        "train-00001-of-00003",
        "train-00002-of-00003",
        "validation-00000-of-00002",
        "validation-00001-of-00002",
    ]
    train = read_split(out, "train")
    assert len(train) == manifest["splits"]["train"]["num_examples"] == 11
    assert manifest["splits"]["train"]["skipped"].keys() == {f"{DOG}_2.JPEG"}
    expected_reencoded = {f"{SHARK}_3.JPEG": "png"}
    if cmyk_jpeg_bytes(4, 4) is not None:
        expected_reencoded[f"{SHARK}_4.JPEG"] = "cmyk"
    assert manifest["splits"]["train"]["reencoded"] == expected_reencoded
    for record in train:
        synset = record["image/class/synset"][0].decode()
        assert record["image/filename"][0].decode().startswith(synset + "_")
        assert record["image/class/label"][0] == SYNSETS.index(synset) + 1
        assert record["image/format"][0] == b"JPEG"
        assert record["image/colorspace"][0] == b"RGB"
        assert record["image/channels"][0] == 3
        image = tf.io.decode_jpeg(record["image/encoded"][0], channels=3)
        assert list(image.shape[:2]) == [record["image/height"][0], record["image/width"][0]]
    counts = {name: len(read_records(out / name)) for name in manifest["splits"]["train"]["shards"]}
    assert counts == manifest["splits"]["train"]["shards"]
    # Shuffled before sharding: the first shard is not one class.
    first = read_records(out / "train-00000-of-00003")
    assert len({r["image/class/synset"][0] for r in first}) > 1


def test_validation_synset_comes_from_the_file_number(converted):
    root, manifest = converted
    labels = official_labels(root / "tars" / LABELS_NAME)
    validation = read_split(root / "out", "validation")
    assert len(validation) == manifest["splits"]["validation"]["num_examples"] == 7
    for record in validation:
        filename = record["image/filename"][0].decode()
        synset = labels[int(filename[len("ILSVRC2012_val_") : -len(".JPEG")]) - 1]
        assert record["image/class/synset"][0].decode() == synset
        assert record["image/class/label"][0] == SYNSETS.index(synset) + 1


def test_extracted_folders_give_the_same_records(converted, tmp_path):
    root, _ = converted
    train, validation = generated_distribution()
    write_ilsvrc(tmp_path / "folders", train, validation, as_tars=False)
    convert.convert(
        str(tmp_path / "folders"),
        str(tmp_path / "out"),
        train_shards=3,
        validation_shards=2,
        num_workers=1,
        progress=False,
    )
    for name in sorted(p.name for p in (root / "out").glob("*-of-*")):
        assert read_records(tmp_path / "out" / name) == read_records(root / "out" / name), name


def test_rerun_keeps_complete_shards_and_redoes_missing_ones(converted, tmp_path):
    root, _ = converted
    train, validation = generated_distribution()
    write_ilsvrc(tmp_path / "in", train, validation)
    out = tmp_path / "out"
    options = dict(train_shards=3, validation_shards=2, num_workers=1, progress=False)
    first = convert.convert(str(tmp_path / "in"), str(out), **options)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*-of-*")}
    # Finished: nothing is rewritten.
    assert convert.convert(str(tmp_path / "in"), str(out), **options) == first
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-of-*")} == stamps
    # Interrupted: no manifest, one shard missing, a temp file left behind.
    (out / "manifest.json").unlink()
    (out / "train-00001-of-00003").unlink()
    (out / ".train-00002-of-00003.tmp-999").write_bytes(b"half a shard")
    second = convert.convert(str(tmp_path / "in"), str(out), **options)
    assert second["splits"]["train"]["shards"] == first["splits"]["train"]["shards"]
    assert second["splits"]["validation"]["num_examples"] == 7
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("*-of-*")}
    rewritten = {name for name in stamps if now[name] != stamps[name]}
    assert rewritten == {"train-00001-of-00003"}
    # A different plan (more shards) replaces the old shards of that split.
    third = convert.convert(str(tmp_path / "in"), str(out), **{**options, "train_shards": 4})
    assert len(third["splits"]["train"]["shards"]) == 4
    assert sorted(p.name for p in out.glob("train-*")) == sorted(third["splits"]["train"]["shards"])
    assert sum(third["splits"]["train"]["shards"].values()) == 11


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.convert(str(tmp_path / "nowhere"), str(tmp_path / "out"), num_workers=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no ILSVRC-2012 images"):
        convert.find_images(str(tmp_path / "empty"))
    train, validation = generated_distribution()
    write_ilsvrc(tmp_path / "in", train, validation)
    (tmp_path / "in" / LABELS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=LABELS_NAME):
        convert.find_images(str(tmp_path / "in"))


def test_unknown_synset_is_refused(tmp_path):
    (tmp_path / "train" / "n99999999").mkdir(parents=True)
    (tmp_path / "train" / "n99999999" / "x.JPEG").write_bytes(jpeg_bytes(8, 8))
    with pytest.raises(ValueError, match="n99999999"):
        convert.find_images(str(tmp_path))


def test_command_line_help_lists_every_flag(repo_root):
    result = subprocess.run(
        [sys.executable, str(repo_root / "tools" / "build_imagenet_tfrecords.py"), "--help"],
        capture_output=True,
        text=True,
        check=False,  # absl exits 1 after --help
    )
    for flag in ("input", "output", "train_shards", "validation_shards", "labels_file"):
        assert f"--{flag}:" in result.stdout


@pytest.mark.slow
def test_command_line_converts_in_parallel(repo_root, tmp_path):
    train, validation = generated_distribution()
    labels = write_ilsvrc(tmp_path / "in", train, validation)
    os.rename(labels, tmp_path / "labels.txt")
    command = [
        sys.executable,
        str(repo_root / "tools" / "build_imagenet_tfrecords.py"),
        f"--input={tmp_path / 'in'}",
        f"--output={tmp_path / 'out'}",
        "--train_shards=2",
        "--validation_shards=1",
        f"--labels_file={tmp_path / 'labels.txt'}",
        "--num_workers=2",
        "--noprogress",
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_examples"] == 11
    assert manifest["splits"]["validation"]["shards"] == {"validation-00000-of-00001": 7}


def test_packaged_synset_list_is_the_official_one(shared_data):
    labels = shared_data / "mini-ilsvrc2012" / LABELS_NAME
    if not labels.exists():
        pytest.skip(f"{labels} not found")
    assert imagenet.imagenet_synsets() == tuple(sorted(set(official_labels(labels))))


def test_converts_the_shared_mini_imagenet(shared_data, tmp_path):
    source = shared_data / "mini-ilsvrc2012"
    if not source.is_dir():
        pytest.skip(f"{source} not found")
    labels = official_labels(source / LABELS_NAME)
    manifest = convert.convert(
        str(source),
        str(tmp_path),
        train_shards=4,
        validation_shards=2,
        num_workers=1,
        progress=False,
    )
    assert manifest["splits"]["train"]["num_examples"] == 1000
    assert manifest["splits"]["validation"]["num_examples"] == 500
    train = read_split(tmp_path, "train")
    per_class = collections.Counter(r["image/class/synset"][0].decode() for r in train)
    assert len(per_class) == 10 and set(per_class.values()) == {100}
    for record in train:
        synset = record["image/filename"][0].decode().split("_")[0]
        assert record["image/class/synset"][0].decode() == synset
        assert record["image/class/label"][0] == SYNSETS.index(synset) + 1
    for record in read_split(tmp_path, "validation"):
        number = imagenet.validation_number(record["image/filename"][0].decode())
        assert record["image/class/synset"][0].decode() == labels[number - 1]
        assert record["image/class/label"][0] == SYNSETS.index(labels[number - 1]) + 1


def test_resize_stores_the_papers_format_and_is_part_of_the_plan(tmp_path):
    train, validation = generated_distribution()
    write_ilsvrc(tmp_path / "in", train, validation)
    out = tmp_path / "out"
    options = dict(train_shards=2, validation_shards=1, num_workers=1, progress=False)
    manifest = convert.convert(str(tmp_path / "in"), str(out), resize=24, **options)
    assert manifest["splits"]["train"]["resize"] == 24
    for split in ("train", "validation"):
        for record in read_split(out, split):
            image = tf.io.decode_jpeg(record["image/encoded"][0], channels=3)
            assert image.shape == (24, 24, 3)
            assert (record["image/height"][0], record["image/width"][0]) == (24, 24)
    # The stored pixels are the bilinear resize of the original, up to JPEG's loss.
    # (A smooth image: JPEG's loss on the noise of the other fixtures would hide the check.)
    y, x = np.mgrid[0:40, 0:64]
    smooth = np.stack([y * 6, x * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    data = tf.io.encode_jpeg(smooth, quality=100).numpy()
    encoded, height, width, _ = convert.prepare_image(data, resize=24)
    assert (height, width) == (24, 24)
    want = tf.image.resize(tf.io.decode_jpeg(data, channels=3), [24, 24]).numpy()
    got = tf.io.decode_jpeg(encoded, channels=3).numpy().astype(np.float32)
    assert np.abs(got - want).mean() < 2
    # Another size is another plan: the shards are rewritten, not reused.
    again = convert.convert(str(tmp_path / "in"), str(out), resize=32, **options)
    assert again["splits"]["train"]["plan_digest"] != manifest["splits"]["train"]["plan_digest"]
    record = read_split(out, "train")[0]
    assert tf.io.decode_jpeg(record["image/encoded"][0]).shape[:2] == (32, 32)
