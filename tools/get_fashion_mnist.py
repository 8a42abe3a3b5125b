#!/usr/bin/env python3
"""Prepare Fashion-MNIST as a tensorflow-datasets dataset, offline where apt can help.

    .venv/bin/python tools/get_fashion_mnist.py [--data_dir data/tfds] [--cache_dir data/cache]

Writes the standard prepared `fashion_mnist` dataset (train 60,000 / test 10,000 images,
28x28 grayscale, 10 classes) under `--data_dir`, the same files `tfds.load("fashion_mnist")`
writes, so train.py reads it with `--dataset=tfds:fashion_mnist --data_dir=<data_dir>`.

Where the images come from, in order:

1. Debian's `dataset-fashion-mnist` package, from the machine's package mirror (no internet
   needed beyond it): `apt-get download` into `--cache_dir` (no root), `dpkg-deb -x` to
   unpack the original idx files. If apt's package lists lack it and we are root, one
   `apt-get update` is tried. Debian recompressed the idx files (different gzip headers), so
   tensorflow-datasets' download checksums cannot match; the content is checked instead:
   the idx headers must give the published counts and shape.
2. tensorflow-datasets' own download (needs internet access to the Zalando mirror).

When neither works the script says what to do and exits with status 1. A second run with
the dataset already prepared does nothing.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import os
import shutil
import struct
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PACKAGE = "dataset-fashion-mnist"
NAME = "fashion_mnist"
# idx file -> (magic, dimensions) of the original release.
FILES = {
    "train-images-idx3-ubyte": (2051, (60000, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (60000,)),
    "t10k-images-idx3-ubyte": (2051, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (10000,)),
}


def _run(command: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def fetch_debian_package(cache_dir: str) -> str:
    """Download and unpack the Debian package; returns the folder holding the idx .gz files.

    Raises:
        RuntimeError: apt is unavailable or the package cannot be downloaded.
    """
    found = glob.glob(os.path.join(cache_dir, "unpacked", "**", "train-images-idx3-ubyte.gz"))
    if found:
        return os.path.dirname(found[0])
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError("apt-get / dpkg-deb not found (not a Debian-based system)")
    os.makedirs(cache_dir, exist_ok=True)
    debs = glob.glob(os.path.join(cache_dir, f"{PACKAGE}_*.deb"))
    if not debs:
        result = _run(["apt-get", "download", PACKAGE], cwd=cache_dir)
        if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            # Fresh containers often ship without package lists.
            print(f"apt-get download failed ({result.stderr.strip()}); running apt-get update")
            _run(["apt-get", "update"])
            result = _run(["apt-get", "download", PACKAGE], cwd=cache_dir)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get download {PACKAGE} failed: {result.stderr.strip()}")
        debs = glob.glob(os.path.join(cache_dir, f"{PACKAGE}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {PACKAGE} left no .deb in {cache_dir}")
    unpacked = os.path.join(cache_dir, "unpacked")
    result = _run(["dpkg-deb", "-x", sorted(debs)[-1], unpacked])
    if result.returncode != 0:
        raise RuntimeError(f"dpkg-deb -x failed: {result.stderr.strip()}")
    found = glob.glob(os.path.join(unpacked, "**", "train-images-idx3-ubyte.gz"), recursive=True)
    if not found:
        raise RuntimeError(f"{PACKAGE} holds no train-images-idx3-ubyte.gz")
    return os.path.dirname(found[0])


def decompress_and_check(gz_dir: str, out_dir: str) -> dict[str, str]:
    """Decompress the four idx files into `out_dir`, checking their headers.

    Returns:
        `{file name: path of the decompressed file}`.

    Raises:
        RuntimeError: A file is missing or its header is not the published one.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, (magic, dims) in FILES.items():
        source = os.path.join(gz_dir, name + ".gz")
        target = os.path.join(out_dir, name)
        if not os.path.exists(target):
            if not os.path.exists(source):
                raise RuntimeError(f"{source} is missing")
            with gzip.open(source, "rb") as f_in, open(target + ".tmp", "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
            os.replace(target + ".tmp", target)
        with open(target, "rb") as f:
            header = struct.unpack(f">{1 + len(dims)}I", f.read(4 * (1 + len(dims))))
        size = os.path.getsize(target)
        expected_size = 4 * (1 + len(dims)) + _product(dims)
        if header != (magic, *dims) or size != expected_size:
            raise RuntimeError(
                f"{target}: header {header}, {size} bytes; expected {(magic, *dims)}, "
                f"{expected_size} bytes"
            )
        paths[name] = target
    return paths


def _product(values) -> int:
    result = 1
    for v in values:
        result *= v
    return result


def prepare_from_files(data_dir: str, paths: dict[str, str]) -> None:
    """Write the prepared tfds dataset from local idx files (tfds' own example generator)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification import mnist

    with tfds.core.registered.skip_registration():

        class LocalFashionMNIST(mnist.FashionMNIST):
            """tfds' Fashion-MNIST builder, reading given idx files instead of downloading."""

            name = NAME

            def _split_generators(self, dl_manager):
                del dl_manager  # nothing to download
                return [
                    tfds.core.SplitGenerator(
                        name=tfds.Split.TRAIN,
                        gen_kwargs=dict(
                            num_examples=60000,
                            data_path=paths["train-images-idx3-ubyte"],
                            label_path=paths["train-labels-idx1-ubyte"],
                        ),
                    ),
                    tfds.core.SplitGenerator(
                        name=tfds.Split.TEST,
                        gen_kwargs=dict(
                            num_examples=10000,
                            data_path=paths["t10k-images-idx3-ubyte"],
                            label_path=paths["t10k-labels-idx1-ubyte"],
                        ),
                    ),
                ]

    LocalFashionMNIST(data_dir=data_dir).download_and_prepare()


def prepare_by_download(data_dir: str) -> None:
    import tensorflow_datasets as tfds

    tfds.builder(NAME, data_dir=data_dir).download_and_prepare()


def is_prepared(data_dir: str) -> bool:
    import tensorflow_datasets as tfds

    return tfds.builder(NAME, data_dir=data_dir).is_prepared()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="data/tfds", help="tensorflow-datasets data_dir")
    parser.add_argument("--cache_dir", default="data/cache", help="where the .deb is kept")
    args = parser.parse_args()
    if is_prepared(args.data_dir):
        print(f"{NAME} is already prepared in {args.data_dir}")
        return 0
    errors = []
    try:
        gz_dir = fetch_debian_package(args.cache_dir)
        idx_dir = os.path.join(args.cache_dir, "idx")
        paths = decompress_and_check(gz_dir, idx_dir)
        prepare_from_files(args.data_dir, paths)
        shutil.rmtree(idx_dir, ignore_errors=True)  # 55 MB, and the .gz files stay cached
        print(f"{NAME} prepared in {args.data_dir} from Debian's {PACKAGE}")
        return 0
    except RuntimeError as error:
        errors.append(f"Debian package: {error}")
    try:
        prepare_by_download(args.data_dir)
        print(f"{NAME} prepared in {args.data_dir} by tensorflow-datasets' download")
        return 0
    except Exception as error:  # network errors come in many types; report whichever
        errors.append(f"tensorflow-datasets download: {type(error).__name__}: {error}")
    print(
        "Could not get Fashion-MNIST:\n  " + "\n  ".join(errors) + "\n"
        f"Either make apt able to fetch {PACKAGE} (sudo apt-get update; it is in Debian "
        "bookworm and Ubuntu 22.04+), or give this machine internet access for "
        f"tensorflow-datasets, or put the four original *-ubyte.gz files in "
        f"{os.path.join(args.cache_dir, 'unpacked')} and rerun.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
