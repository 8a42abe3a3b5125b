"""Part 6's worker: one training step setting, timed on demand from its parent over a pipe.

    TF_ENABLE_ONEDNN_OPTS=1 python tools/bench/onednn_worker.py --model resnet20_cifar ...

oneDNN is chosen once, when TensorFlow is imported, so each setting is its own process. The
worker builds and warms up the model, prints one `READY <json>` line (the oneDNN state
TensorFlow reports), then for every line `<steps>` on stdin runs that many
`Model.train_on_batch` steps and prints the seconds per step; it exits on `quit` or EOF.
Between requests it blocks on stdin, so the two workers never compute at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# tools/ on the path, so that `bench` imports as a package when this file runs as a script.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="lars_tf.models name")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--options", default="{}", help="model options, JSON")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from bench import environment

    environment.configure_threads(args.threads)
    import keras
    import numpy as np
    import tensorflow as tf

    from bench.optimizer_update import HYPER
    from lars_tf import models
    from lars_tf.optimizer import LARS

    keras.utils.set_random_seed(0)
    model = models.build(
        args.model,
        num_classes=args.num_classes,
        input_shape=(args.image_size, args.image_size, 3),
        **json.loads(args.options),
    )
    # As train.py trains: LARS with its update compiled, Keras' (uncompiled) CPU step.
    model.compile(
        optimizer=LARS(
            HYPER["learning_rate"],
            momentum=HYPER["momentum"],
            weight_decay=HYPER["weight_decay"],
            trust_coefficient=HYPER["trust_coefficient"],
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    shape = (args.batch, args.image_size, args.image_size, 3)
    images = tf.constant(rng.standard_normal(shape), tf.float32)
    labels = tf.constant(rng.integers(0, args.num_classes, args.batch), tf.int32)
    for _ in range(args.warmup):
        model.train_on_batch(images, labels)
    print("READY " + json.dumps(environment.onednn_state()), flush=True)
    for line in sys.stdin:
        request = line.strip()
        if request == "quit":
            break
        steps = int(request)
        began = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(images, labels)
        print(f"{(time.perf_counter() - began) / steps:.9f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
