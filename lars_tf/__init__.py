"""lars_tf: Layer-wise Adaptive Rate Scaling for Keras 3, with Horovod training.

The library: `LARS` (the optimizer), `lars_tf.schedules`, `lars_tf.callbacks`, `lars_tf.models`,
`lars_tf.data` and `lars_tf.distributed` (the Keras 3 layer over `horovod.tensorflow`).
"""

from lars_tf.optimizer import LARS

__all__ = ["LARS"]
__version__ = "0.1.0"
