"""Flags of the input (`lars_tf.data`): source, splits, preprocessing; builds the input."""

from __future__ import annotations

import os
from typing import Any

from absl import flags

from lars_tf import data, models
from lars_tf.trainer import RunInput
from train_flags import _checks, schedule
from train_flags._checks import floats

FLAGS = flags.FLAGS


def _source_named(value: str) -> bool:
    if value.startswith("tfds:"):
        return len(value) > len("tfds:")
    return value in data.SOURCES


def _data_dir_exists(f: dict) -> bool:
    if f["synthetic"] or f["dataset"] == "synthetic" or not f["data_dir"]:
        return True
    # tensorflow-datasets may create its data_dir; every other source reads an existing one.
    return f["dataset"].startswith("tfds:") or os.path.isdir(f["data_dir"])


def define(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string(
        "dataset",
        "tfrecord",
        "Input source: 'tfrecord' (ImageNet TFRecord shards train-*/validation-* in "
        "--data_dir), 'folder' (JPEG class folders), 'tfds:<name>' (a prepared "
        "tensorflow-datasets dataset in --data_dir) or 'synthetic'.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "data_dir", None, "Directory of the dataset (unused for synthetic).", flag_values=fv
    )
    flags.DEFINE_bool(
        "synthetic",
        False,
        "Train on synthetic images (overrides --dataset): a benchmark or smoke mode, which "
        "evaluates nothing unless --eval_steps is given (then that many batches).",
        flag_values=fv,
    )
    flags.DEFINE_string("train_split", "train", "Split to train on.", flag_values=fv)
    flags.DEFINE_string(
        "eval_split",
        "validation",
        "Split to evaluate on ('validation' falls back to 'test').",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "preprocessing",
        "paper",
        data.MODES,
        "Augmentation (lars_tf.data.preprocessing).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "image_size",
        None,
        "Input side in pixels; default: the model's.",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "resize_size",
        None,
        "Side images are resized to before cropping, in pixels.",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_integer("channels", 3, "Image channels: 3 (RGB) or 1 (grayscale).", flag_values=fv)
    flags.DEFINE_list(
        "mean",
        ["123.68", "116.78", "103.94"],
        "Per-channel mean subtracted, on the 0..255 scale (empty: none).",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "std", [], "Per-channel standard deviation divided by (empty: none).", flag_values=fv
    )
    flags.DEFINE_integer(
        "shuffle_buffer",
        10_000,
        "Examples held for shuffling, per worker.",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "normalize_on_device",
        True,
        "The input pipeline delivers uint8 images and the model's first layer subtracts "
        "--mean and divides by --std on the accelerator (a quarter of the bytes per batch, "
        "no float work on the CPU); --nonormalize_on_device does it in tf.data.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "synthetic_examples",
        None,
        "Examples per synthetic epoch (default: ImageNet's).",
        lower_bound=1,
        flag_values=fv,
    )
    forms = ", ".join(data.SOURCES)
    _checks.single(fv, "dataset", _source_named, f"--dataset must be one of {forms}")
    _checks.single(fv, "channels", lambda v: v in (1, 3), "--channels must be 1 or 3")
    _checks.number_list(fv, "mean", "std")
    _checks.single(
        fv, "std", lambda v: not _checks.numbers(v) or all(float(x) > 0 for x in v),
        "--std must be > 0",
    )  # fmt: skip
    _checks.multi(
        fv,
        ["dataset", "synthetic", "data_dir"],
        lambda f: f["synthetic"] or f["dataset"] == "synthetic" or bool(f["data_dir"]),
        "--data_dir is required unless --dataset=synthetic or --synthetic",
    )
    _checks.multi(
        fv,
        ["dataset", "synthetic", "data_dir"],
        _data_dir_exists,
        "--data_dir does not exist (or is not a directory)",
    )
    _checks.multi(
        fv,
        ["channels", "mean", "std"],
        lambda f: all(len(f[k]) in (0, 1, f["channels"]) for k in ("mean", "std")),
        "--mean and --std need 1 or --channels values each",
    )


def dataset_source(flag_values: flags.FlagValues = FLAGS) -> str:
    """The `lars_tf.data` source name: `--dataset`, or "synthetic" under `--synthetic`."""
    return "synthetic" if flag_values.synthetic else flag_values.dataset


def build_input(
    num_workers: int, rank: int, flag_values: flags.FlagValues = FLAGS
) -> tuple[data.InputSpec, RunInput]:
    """This worker's training spec (the first epoch's) and the `lars_tf.trainer.RunInput`.

    Batches of `train_flags.per_worker_batch`, images of `--image_size` (else the model's
    default size). `corrupt_count()` of the input is the number of undecodable training
    images skipped so far, over every pipeline its `dataset_for_epoch` built.

    Raises:
        flags.ValidationError: The batch does not divide among the workers.
    """
    f = flag_values
    batch = schedule.per_worker_batch(num_workers, f)
    image_size = f.image_size or models.default_image_size(f.model)
    source = dataset_source(f)
    common = dict(
        data_dir=f.data_dir,
        image_size=image_size,
        preprocessing=f.preprocessing,
        num_shards=num_workers,
        shard_index=rank,
        deterministic=f.deterministic,
        dtype=f.dtype,
        num_classes=f.num_classes,
        resize_size=f.resize_size,
        channels=f.channels,
        mean=floats(f.mean),
        std=floats(f.std),
        normalize=not f.normalize_on_device,
    )
    if source == "synthetic" and f.synthetic_examples:
        common["num_examples"] = f.synthetic_examples

    def train_spec(epoch: int) -> data.InputSpec:
        # A resumed run rebuilds the input at its epoch; offset the seed so that epoch's
        # order is not the first epoch's again.
        return data.build_dataset(
            source,
            split=f.train_split,
            batch_size=batch,
            is_training=True,
            seed=f.seed + epoch,
            shuffle_buffer=f.shuffle_buffer,
            **common,
        )

    first = train_spec(0)
    built = [first]

    def dataset_for_epoch(epoch: int) -> Any:
        if epoch == 0:
            return first.dataset
        built.append(train_spec(epoch))
        return built[-1].dataset

    evaluation = data.build_dataset(
        source,
        split=f.eval_split,
        batch_size=f.eval_batch_size or batch,
        is_training=False,
        seed=f.seed,
        **common,
    )
    return first, RunInput(
        dataset_for_epoch,
        evaluation.dataset,
        corrupt_count=lambda: sum(s.corrupt_count() for s in built),
    )
