"""lars_tf: Layer-wise Adaptive Rate Scaling for Keras 3, with Horovod training."""

__version__ = "0.1.0"
