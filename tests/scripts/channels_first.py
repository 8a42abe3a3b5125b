"""Build a channels_first ResNet-20 and compare it with the channels_last one, or print why not.

Run as a subprocess: oneDNN is chosen by TF_ENABLE_ONEDNN_OPTS when TensorFlow is imported,
so each setting needs its own process. Exit status 0 and "SAME <max abs diff>" when the two
formats compute the same logits; 3 and "REFUSED <message>" when building is refused.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

from lars_tf import models  # noqa: E402

MEAN, STD = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)

options = dict(num_classes=10, normalize_input=(MEAN, STD), stage_blocks=(1, 1, 1))
last = models.build("resnet20_cifar", **options)
try:
    first = models.build("resnet20_cifar", data_format="channels_first", **options)
except ValueError as error:
    print("REFUSED", error, flush=True)
    raise SystemExit(3) from None
first.set_weights(last.get_weights())
pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
# Plain predict: no XLA, so the NCHW graph runs on TensorFlow's own (or oneDNN's) kernels.
difference = np.max(
    np.abs(
        first.predict(np.transpose(pixels, (0, 3, 1, 2)), verbose=0)
        - last.predict(pixels, verbose=0)
    )
)
print("SAME", difference, flush=True)
raise SystemExit(0 if difference < 1e-4 else 1)
