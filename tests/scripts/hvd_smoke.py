"""Run under `horovodrun -np 2`: allreduce a tensor and broadcast a Keras 3 model's variables.

Each rank writes what it saw to `<out_dir>/rank<r>.npz`; tests/test_horovod.py compares them.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import horovod.tensorflow as hvd  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

hvd.init()
rank, size = hvd.rank(), hvd.size()
out_dir = sys.argv[1]

averaged = hvd.allreduce(tf.constant([1.0, 2.0]) * (rank + 1), op=hvd.Average, name="avg")
summed = hvd.allreduce(tf.constant([1.0, 2.0]) * (rank + 1), op=hvd.Sum, name="sum")

# Different initial weights on each rank, as after independent initialisation.
keras.utils.set_random_seed(1234 + rank)
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
before = [v.numpy() for v in model.variables]
# Keras 3 variables are not tf.Variables: broadcast the backing value, assign the result back.
for v in model.variables:
    v.assign(hvd.broadcast(v.value, root_rank=0, name=v.path.replace("/", "_")))
after = [v.numpy() for v in model.variables]

np.savez(
    os.path.join(out_dir, f"rank{rank}.npz"),
    size=size,
    averaged=averaged.numpy(),
    summed=summed.numpy(),
    **{f"before_{i}": a for i, a in enumerate(before)},
    **{f"after_{i}": a for i, a in enumerate(after)},
)
