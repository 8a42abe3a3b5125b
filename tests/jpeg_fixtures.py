"""Real JPEG bytes and ILSVRC-2012-shaped file trees, generated in a test's tmp dir."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

# Beside the repository: ../shared/data (read-only, may be absent).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MINI_ILSVRC = SHARED_DATA / "mini-ilsvrc2012"
LABELS_NAME = "imagenet_2012_validation_synset_labels.txt"


def random_pixels(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth random uint8 pixels: a coarse random grid, bilinearly upsampled, so that JPEG
    keeps them close (a few levels) and every image of another seed is clearly different."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(height // 8 + 2, width // 8 + 2, channels))
    image = tf.image.resize(coarse, [height, width], method="bilinear").numpy()
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def jpeg_bytes(height: int, width: int, channels: int = 3, seed: int = 0) -> bytes:
    """A real JPEG (encoded by TensorFlow) of random pixels."""
    return tf.io.encode_jpeg(random_pixels(height, width, channels, seed), quality=95).numpy()


def png_bytes(height: int, width: int, seed: int = 0) -> bytes:
    """A real RGB PNG, as the one ImageNet training image that is a PNG named .JPEG."""
    return tf.io.encode_png(random_pixels(height, width, 3, seed)).numpy()


def cmyk_jpeg_bytes(height: int, width: int, seed: int = 0) -> bytes | None:
    """A CMYK JPEG (ImageNet holds 22), or None when PIL is not installed."""
    try:
        from PIL import Image
    except ImportError:
        return None
    buffer = io.BytesIO()
    Image.fromarray(random_pixels(height, width, 3, seed)).convert("CMYK").save(buffer, "JPEG")
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            _add(archive, name, data)
    return buffer.getvalue()


def write_ilsvrc(
    root: Path,
    train: dict[str, Sequence[bytes]],
    validation: dict[int, tuple[str, bytes]],
    *,
    as_tars: bool = True,
) -> Path:
    """Writes an ILSVRC-2012 distribution in small: tars, or the extracted folders.

    Args:
        root: folder to write into (created).
        train: synset -> image bytes, written as `<synset>_<i>.JPEG`.
        validation: image number -> (synset, bytes), as `ILSVRC2012_val_<8 digits>.JPEG`.
        as_tars: the original tars (tar of per-synset tars, flat val tar) or folders
            `train/<synset>/` and a flat `val/`.

    Returns:
        The path of the validation label list written (line i: synset of image i).
    """
    root.mkdir(parents=True, exist_ok=True)
    train_members = {
        synset: [(f"{synset}_{i}.JPEG", data) for i, data in enumerate(images)]
        for synset, images in train.items()
    }
    # Reversed, so that a reader which labels by position instead of by number fails.
    val_members = [
        (f"ILSVRC2012_val_{n:08d}.JPEG", data)
        for n, (_, data) in sorted(validation.items(), reverse=True)
    ]
    if as_tars:
        with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
            for synset, members in train_members.items():
                _add(outer, f"{synset}.tar", _tar_bytes(members))
        with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as archive:
            for name, data in val_members:
                _add(archive, name, data)
    else:
        for synset, members in train_members.items():
            (root / "train" / synset).mkdir(parents=True)
            for name, data in members:
                (root / "train" / synset / name).write_bytes(data)
        (root / "val").mkdir()
        for name, data in val_members:
            (root / "val" / name).write_bytes(data)
    # The official list has 50,000 lines; lines of images not written get a filler synset.
    count = max(validation, default=0)
    lines = [validation.get(n, ("n01440764", b""))[0] for n in range(1, count + 1)]
    labels = root / LABELS_NAME
    labels.write_text("".join(f"{line}\n" for line in lines))
    return labels


def write_class_folders(
    root: Path, split: str, images: dict[str, Sequence[bytes]], suffix=".jpg"
) -> list[Path]:
    """Writes `root/<split>/<class>/<i><suffix>`; returns the paths in class order."""
    paths = []
    for name, datas in sorted(images.items()):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(datas):
            path = folder / f"{i:04d}{suffix}"
            path.write_bytes(data)
            paths.append(path)
    return paths


def official_labels(path: Path) -> list[str]:
    """The lines of a validation label list."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def tfds_builder(class_name: str, num_classes: int, splits: dict[str, tuple[int, int, int, int]]):
    """A tensorflow-datasets builder class of generated JPEGs, to prepare offline in a test.

    Args:
        class_name: CamelCase class name; tfds registers the dataset as its snake_case form.
        num_classes: Classes of the `label` feature.
        splits: `{split: (seed_offset, count, height, width)}`; example i has label i.

    Returns:
        The builder class; `cls(data_dir=...).download_and_prepare()` writes the dataset.
    """
    import tensorflow_datasets as tfds

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=num_classes),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(*spec) for name, spec in splits.items()}

    def _generate_examples(self, offset, count, height, width):
        for i in range(count):
            yield i, {"image": random_pixels(height, width, 3, seed=offset + i), "label": i}

    namespace = {
        "__doc__": "Generated JPEGs, prepared offline.",
        "VERSION": tfds.core.Version("1.0.0"),
        "_info": _info,
        "_split_generators": _split_generators,
        "_generate_examples": _generate_examples,
    }
    return type(class_name, (tfds.core.GeneratorBasedBuilder,), namespace)
