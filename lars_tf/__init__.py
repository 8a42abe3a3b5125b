"""lars_tf: Layer-wise Adaptive Rate Scaling for Keras 3, with Horovod, tf.distribute or JAX.

The library: `LARS` (the optimizer), `lars_tf.schedules`, `lars_tf.callbacks`, `lars_tf.models`,
`lars_tf.data`, `lars_tf.trainer` and `lars_tf.engines` (Horovod, tf.distribute, JAX).
"""

__all__ = ["LARS"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `lars_tf.engines.launch` must be importable before Keras, whose backend is read
    # once at its import and which train.py chooses from --engine.
    if name == "LARS":
        from lars_tf.optimizer import LARS

        return LARS
    raise AttributeError(f"module 'lars_tf' has no attribute {name!r}")
