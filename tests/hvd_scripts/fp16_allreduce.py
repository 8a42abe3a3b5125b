"""All-reduce the same gradients three ways under `horovodrun -np N`; save what each gave.

Usage: fp16_allreduce.py OUT_DIR

Every rank draws its own gradients (seeded by rank): per-element RMS 1e-7 (a conv kernel and
a dense kernel, the magnitudes that float16 flushes), RMS 1, RMS 3e4 (two of which overflow a
float16 sum) and zeros. They are averaged in float32 (the reference), with
`lars_tf.distributed`'s scaled float16 compression (eagerly and inside a `tf.function`, as the
train step runs it), and with Horovod's own float16 compression, a plain cast (what
`--fp16_allreduce` did before). Writes OUT_DIR/rank<r>.npz; tests/test_distributed.py
compares the norms.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from lars_tf import distributed  # noqa: E402

GRADIENTS = {  # name: (shape, per-element RMS)
    "small_conv": ((3, 3, 16, 32), 1e-7),
    "small_dense": ((256, 64), 1e-7),
    "unit": ((1000,), 1.0),
    "large": ((100,), 3e4),
    "zeros": ((10,), 0.0),
}


def main() -> None:
    out_dir = sys.argv[1]
    world = distributed.init()
    distributed.configure_threads(intra_op=1, inter_op=1)
    rank = distributed.rank()
    rng = np.random.default_rng(rank)
    grads = [
        tf.constant(rng.normal(0.0, rms, shape).astype(np.float32))
        for shape, rms in GRADIENTS.values()
    ]
    import horovod.tensorflow as hvd

    results = {
        "float32": distributed.allreduce_gradients(grads),
        "scaled_fp16": distributed.allreduce_gradients(grads, compression="fp16"),
        "scaled_fp16_traced": tf.function(
            lambda: distributed.allreduce_gradients(grads, compression="fp16")
        )(),
        "plain_fp16": hvd.grouped_allreduce(
            grads, op=hvd.Average, compression=hvd.Compression.fp16, name="plain_fp16"
        ),
    }
    np.savez(
        os.path.join(out_dir, f"rank{rank}.npz"),
        world=world,
        **{f"local/{n}": g.numpy() for n, g in zip(GRADIENTS, grads, strict=True)},
        **{
            f"{way}/{name}": value.numpy()
            for way, values in results.items()
            for name, value in zip(GRADIENTS, values, strict=True)
        },
    )


if __name__ == "__main__":
    main()
