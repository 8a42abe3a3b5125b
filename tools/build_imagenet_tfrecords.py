#!/usr/bin/env python
"""Converts ILSVRC-2012 to sharded TFRecords in the standard ImageNet schema.

    tools/build_imagenet_tfrecords.py --input DIR --output DIR \\
        [--train_shards 1024] [--validation_shards 128] [--labels_file FILE]

`--input` holds either the distribution files (`ILSVRC2012_img_train.tar`,
`ILSVRC2012_img_val.tar`, `imagenet_2012_validation_synset_labels.txt`), read without
extracting them, or their extracted folders (`train/<synset>/*.JPEG`, a flat `val/`).
Labels are the index of the synset in the sorted list of the 1,000 ILSVRC-2012 synsets
(stored 1-based in `image/class/label`); a validation image's synset is looked up by the
number in its file name. Output: `train-00000-of-01024` ... `validation-00127-of-00128`
and `manifest.json` with the exact example count of every shard. Rerunning resumes:
complete shards are kept, and a finished conversion is not redone.
See `lars_tf/data/convert.py` for the details.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "Folder with the ILSVRC-2012 tars or their extracted folders.")
flags.DEFINE_string("output", None, "Folder for the TFRecord shards and manifest.json.")
flags.DEFINE_integer("train_shards", 1024, "Number of train shards.", lower_bound=1)
flags.DEFINE_integer("validation_shards", 128, "Number of validation shards.", lower_bound=1)
flags.DEFINE_string(
    "labels_file",
    None,
    "Official validation label list (line i: synset of ILSVRC2012_val_<i>.JPEG); default "
    "<input>/imagenet_2012_validation_synset_labels.txt.",
)
flags.DEFINE_integer(
    "num_workers", None, "Worker processes (default: one per CPU core).", lower_bound=1
)
flags.DEFINE_bool("progress", True, "Show a progress bar per split.")
flags.DEFINE_integer(
    "resize",
    None,
    "Store every image resized to RESIZE x RESIZE (aspect not kept), the paper's Caffe format "
    "(256): for --preprocessing=paper only, which then skips its own resize (about half its "
    "CPU time). Default: keep the original JPEGs, usable by every preprocessing mode.",
    lower_bound=1,
)
flags.mark_flags_as_required(["input", "output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from lars_tf.data import convert  # after flag parsing: --help stays fast

    manifest = convert.convert(
        FLAGS.input,
        FLAGS.output,
        train_shards=FLAGS.train_shards,
        resize=FLAGS.resize,
        validation_shards=FLAGS.validation_shards,
        labels_file=FLAGS.labels_file,
        num_workers=FLAGS.num_workers,
        progress=FLAGS.progress,
    )
    summary = {
        split: {key: len(entry[key]) for key in ("shards", "reencoded", "skipped")}
        | {"num_examples": entry["num_examples"]}
        for split, entry in manifest["splits"].items()
    }
    logging.info("done: %s", json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
