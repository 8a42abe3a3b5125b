"""Reading what train.py wrote to a model directory's checkpoints (shared by the tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf


def checkpoint_values(model_dir: Path, step: int | None = None) -> dict[str, np.ndarray]:
    """Every value of the latest checkpoint, or of the one of update `step` (reading them all
    proves it loads)."""
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    assert latest, f"no checkpoint in {model_dir}"
    if step is not None:
        latest = str(model_dir / "checkpoints" / f"ckpt-{step}")
    reader = tf.train.load_checkpoint(latest)
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")
    }
