"""Checkpoints: what a run saves, in which format, and when.

- `Checkpointer`: model + optimizer + random state + data position in a
  `tf.train.CheckpointManager` (the TensorFlow engines); `ArrayCheckpointer`: the same state
  as NumPy archives, for backends whose variables TensorFlow cannot track (JAX). Both write on
  rank 0 only, never save non-finite weights, keep the last K, and can drop the checkpoints
  from a step on (those whose weights gave a NaN loss).
- `CheckpointCallback`: saves every N optimizer updates, at epoch ends and when training
  stops, never inside a gradient accumulation and never after a NaN/Inf loss.

A checkpoint records images consumed, not batches: the data position survives a change of
the worker count.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lars_tf import keras_internals
from lars_tf.engines.base import Engine
from lars_tf.guard import RunGuard

CHECKPOINT_SUBDIR = "checkpoints"


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:500]


def _valid_max_to_keep(max_to_keep: Any) -> int:
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
        raise ValueError(f"`max_to_keep` must be an int >= 1. Received: {max_to_keep!r}")
    return max_to_keep


def _not_this_model(path: str, detail: str) -> ValueError:
    return ValueError(
        f"checkpoint {path} does not match this model and optimizer: it was written by another "
        "configuration (train.py: another --model or model option, --optimizer, "
        "--normalize_on_device, or an older lars_tf). Resume with the flags that wrote it "
        f"(flags.txt beside it), or start in a new model directory. {detail}"
    )


def _is_float(variable: Any) -> bool:
    return keras.backend.standardize_dtype(variable.dtype).startswith(("float", "bfloat"))


def all_finite(variables: Sequence[Any]) -> bool:
    """Whether every float variable holds finite values only (on any Keras backend)."""
    checks = [keras.ops.all(keras.ops.isfinite(v)) for v in variables if _is_float(v)]
    return bool(keras.ops.all(keras.ops.stack(checks))) if checks else True


class Checkpointer:
    """Model, optimizer, random state and training images consumed, as TF checkpoints.

    `tf.train.CheckpointManager` makes a save atomic: the checkpoint files are written first,
    then the small `checkpoint` index is replaced in one rename, so a crash while writing
    leaves the index naming the previous, complete checkpoint. Only the last `max_to_keep`
    are kept. Only the writer (rank 0) touches the directory; after `restore_latest` the
    caller broadcasts the state to the other workers. The state of the model's random layers
    (dropout's seed generators, which Keras leaves out of the model's checkpoint) is saved
    too, so that a resumed run draws the masks an uninterrupted one would (on the other
    workers through the engine's `broadcast`).

    Args:
        directory: Where the checkpoints go (created on the first save).
        model: The model (its weights and batch-norm statistics are saved).
        optimizer: The optimizer, built (its slots, step counter and loss scale are saved).
        max_to_keep: Checkpoints kept.
        is_writer: Whether this process saves and restores.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        max_to_keep: int = 5,
        is_writer: bool = True,
    ):
        self.directory = os.fspath(directory)
        self.max_to_keep = _valid_max_to_keep(max_to_keep)
        self.model = model
        self.is_writer = is_writer
        # Images, not batches: the data position survives a change of the worker count.
        self._images = tf.Variable(0, dtype=tf.int64, trainable=False, name="images_seen")
        state = dict(model=model, optimizer=optimizer, images_seen=self._images)
        random_state = keras_internals.random_states(model)
        if random_state:
            state["random_state"] = random_state
        self._checkpoint = tf.train.Checkpoint(**state)
        self._manager = None
        if is_writer:
            self._manager = tf.train.CheckpointManager(
                self._checkpoint, self.directory, max_to_keep=max_to_keep
            )

    @property
    def checkpoint(self) -> tf.train.Checkpoint:
        """The `tf.train.Checkpoint` of everything saved (read-only use: an engine checks it)."""
        return self._checkpoint

    @property
    def latest(self) -> str | None:
        """Path prefix of the newest checkpoint (None without one, or on non-writers)."""
        return self._manager.latest_checkpoint if self._manager is not None else None

    def restore_latest(self) -> int:
        """Restore the newest checkpoint, if any, on the writer.

        Returns:
            The training images consumed (all workers together) when it was saved; 0 without a
            checkpoint or on non-writers.

        Raises:
            ValueError: The checkpoint was written by another model or optimizer, or its
                files cannot be read; the message names it and what to do.
        """
        if self.is_writer:
            _refuse_other_format(self.directory, ArrayCheckpointer.INDEX, "the JAX engine")
        path = self.latest
        if path is None:
            return 0
        # Every saved model and optimizer variable must find its counterpart, of its shape: a
        # checkpoint of another model or optimizer configuration is an error, not a partial
        # restore.
        try:
            self._checkpoint.restore(path).assert_existing_objects_matched()
        except (AssertionError, ValueError) as error:
            raise _not_this_model(path, f"TensorFlow says: {_first_line(error)}") from None
        except Exception as error:  # TF reports damaged files in many forms (IndexError too)
            raise ValueError(
                f"checkpoint {path} cannot be read: its files are damaged or incomplete. To "
                f"resume from an earlier checkpoint, delete {path}.* and its lines in "
                f"{os.path.join(self.directory, 'checkpoint')}; or start in a new model "
                f"directory. TensorFlow says: {type(error).__name__}: {_first_line(error)}"
            ) from None
        return int(self._images.numpy())

    def save(self, images_seen: int, step: int) -> str | None:
        """Save (writer only), unless the weights are not finite.

        Args:
            images_seen: Training images consumed so far, all workers together.
            step: The optimizer step, which numbers the checkpoint.

        Returns:
            The path written, or None when nothing was written.

        Raises:
            FloatingPointError: The model holds NaN or Inf; the previous checkpoint is kept.
        """
        if not self.is_writer:
            return None
        if not all_finite(self.model.weights):
            raise FloatingPointError(
                f"model weights are not finite at step {step}: not checkpointing; the last "
                f"good checkpoint is {self.latest}"
            )
        self._images.assign(images_seen)
        return self._manager.save(checkpoint_number=step)

    def discard_from(self, step: int) -> list[str]:
        """Delete the checkpoints of `step` and later (writer only), e.g. ones whose weights
        turned out to give a NaN/Inf loss; the newest earlier one becomes the latest.

        The `checkpoint` index is rewritten (atomically) before any file is deleted, so a
        crash in between leaves stray files, never an index naming a deleted checkpoint.

        Returns:
            The path prefixes deleted.
        """
        if not self.is_writer:
            return []
        state = tf.train.get_checkpoint_state(self.directory)
        if state is None:
            return []
        paths = list(state.all_model_checkpoint_paths)
        times = list(state.all_model_checkpoint_timestamps) or [0.0] * len(paths)
        dropped = [p for p in paths if int(p.rsplit("-", 1)[1]) >= step]
        if not dropped:
            return []
        kept = [(p, t) for p, t in zip(paths, times, strict=True) if p not in dropped]
        if kept:
            # Relative names, as CheckpointManager writes them (the directory may move).
            names = [os.path.basename(p) for p, _ in kept]
            # CheckpointManager cannot drop a checkpoint; this (TF1-era) function rewrites its
            # index. Its deprecation notice, which points to CheckpointManager, is silenced.
            logger = tf.get_logger()
            level = logger.level
            logger.setLevel("ERROR")
            try:
                tf.compat.v1.train.update_checkpoint_state(
                    self.directory,
                    names[-1],
                    all_model_checkpoint_paths=names,
                    all_model_checkpoint_timestamps=[t for _, t in kept],
                    last_preserved_timestamp=state.last_preserved_timestamp,
                )
            finally:
                logger.setLevel(level)
        else:
            tf.io.gfile.remove(os.path.join(self.directory, "checkpoint"))
        for path in dropped:
            for name in tf.io.gfile.glob(f"{path}.*"):
                tf.io.gfile.remove(name)
        # A new manager reads the rewritten index (the old one still lists the deleted ones).
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, self.directory, max_to_keep=self.max_to_keep
        )
        return dropped


class ArrayCheckpointer:
    """`Checkpointer`'s state and contract as NumPy archives, on any Keras backend.

    For backends whose variables `tf.train.Checkpoint` cannot track (JAX). Each checkpoint is
    one `ckpt-<step>.npz` of every model variable (weights, batch-norm statistics, the random
    layers' seed state) and optimizer variable, keyed by position and path, plus the images
    consumed. Saves are atomic as `CheckpointManager`'s are: the archive is written under a
    temporary name and renamed, then the index `checkpoint.json` (the kept names, oldest
    first) is replaced in one rename, so a crash leaves the index naming complete files.
    Arguments as `Checkpointer`'s.
    """

    INDEX = "checkpoint.json"

    def __init__(
        self,
        directory: str | os.PathLike,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        max_to_keep: int = 5,
        is_writer: bool = True,
    ):
        self.directory = os.fspath(directory)
        self.max_to_keep = _valid_max_to_keep(max_to_keep)
        self.model = model
        self.optimizer = optimizer
        self.is_writer = is_writer

    def _variables(self) -> list[tuple[str, Any]]:
        variables = list(self.model.variables) + list(self.optimizer.variables)
        return [(f"{i:05d}:{v.path}", v) for i, v in enumerate(variables)]

    def _index(self) -> list[str]:
        path = os.path.join(self.directory, self.INDEX)
        if not tf.io.gfile.exists(path):
            return []
        with tf.io.gfile.GFile(path) as f:
            return list(json.load(f)["checkpoints"])

    def _write_index(self, names: list[str]) -> None:
        path = os.path.join(self.directory, self.INDEX)
        if not names:
            if tf.io.gfile.exists(path):
                tf.io.gfile.remove(path)
            return
        with tf.io.gfile.GFile(path + ".tmp", "w") as f:
            json.dump({"checkpoints": names}, f)
        tf.io.gfile.rename(path + ".tmp", path, overwrite=True)

    @property
    def latest(self) -> str | None:
        """Path of the newest checkpoint (None without one, or on non-writers)."""
        if not self.is_writer:
            return None
        names = self._index()
        return os.path.join(self.directory, names[-1]) if names else None

    def restore_latest(self) -> int:
        """As `Checkpointer.restore_latest`: the images consumed, 0 without a checkpoint."""
        images, values = self.read_latest()
        self.assign(values)
        return images

    def assign(self, values: list[np.ndarray] | None) -> None:
        """Give the model and optimizer `values` (of `read_latest`; None: leave them)."""
        if values is not None:
            for value, (_, variable) in zip(values, self._variables(), strict=True):
                variable.assign(value)

    def read_latest(self) -> tuple[int, list[np.ndarray] | None]:
        """The latest checkpoint's images consumed and its values in the order of the model's
        and optimizer's variables, checked against them but not assigned; (0, None) without
        a checkpoint (and on non-writers).

        Under a JAX distribution of several processes an assignment is collective (JAX
        checks that every process places the same value), so rank 0 reads and the values
        are assigned on every process (`lars_tf.engines.jax_engine.JaxEngine.restore`).
        """
        if self.is_writer:
            _refuse_other_format(self.directory, "checkpoint", "a TensorFlow engine")
        path = self.latest
        if path is None:
            return 0, None
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                stored = dict(np.load(io.BytesIO(f.read())))
        except Exception as error:  # a truncated or damaged archive, in any of numpy's forms
            raise ValueError(
                f"checkpoint {path} cannot be read: its file is damaged or incomplete. To "
                f"resume from an earlier checkpoint, delete it and its name in "
                f"{os.path.join(self.directory, self.INDEX)}; or start in a new model "
                f"directory. NumPy says: {type(error).__name__}: {_first_line(error)}"
            ) from None
        images = stored.pop("images_seen", None)
        variables = self._variables()
        # Matched by position and shape: Keras' automatic names (dense_1, ...) depend on what
        # else the process built, the order of a model's variables does not.
        saved = [(key, stored[key]) for key in sorted(stored)]
        shapes = [(key.split(":", 1)[0], tuple(value.shape)) for key, value in saved]
        wanted = [(key.split(":", 1)[0], tuple(v.shape)) for key, v in variables]
        if images is None or shapes != wanted:
            differing = [
                (name, shape, here)
                for (name, shape), (_, here) in zip(
                    [(k, tuple(v.shape)) for k, v in saved],
                    [(k, tuple(v.shape)) for k, v in variables],
                    strict=False,
                )
                if shape != here
            ][:3]
            raise _not_this_model(
                path,
                f"{len(saved)} arrays saved, {len(variables)} variables here; first differences "
                f"(saved name, saved shape, shape here): {differing}",
            )
        return int(images), [value for _, value in saved]

    def save(self, images_seen: int, step: int) -> str | None:
        """As `Checkpointer.save`."""
        if not self.is_writer:
            return None
        if not all_finite(self.model.weights):
            raise FloatingPointError(
                f"model weights are not finite at step {step}: not checkpointing; the last "
                f"good checkpoint is {self.latest}"
            )
        tf.io.gfile.makedirs(self.directory)
        name = f"ckpt-{step}.npz"
        path = os.path.join(self.directory, name)
        arrays = {key: keras.ops.convert_to_numpy(v) for key, v in self._variables()}
        buffer = io.BytesIO()
        np.savez(buffer, images_seen=np.int64(images_seen), **arrays)
        with tf.io.gfile.GFile(path + ".tmp", "wb") as f:
            f.write(buffer.getvalue())
        tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
        names = [n for n in self._index() if n != name] + [name]
        dropped, names = names[: -self.max_to_keep], names[-self.max_to_keep :]
        self._write_index(names)
        for old in dropped:
            _remove(os.path.join(self.directory, old))
        return path

    def discard_from(self, step: int) -> list[str]:
        """As `Checkpointer.discard_from`: the index is rewritten before any file goes."""
        if not self.is_writer:
            return []
        names = self._index()
        dropped = [n for n in names if int(n[len("ckpt-") : -len(".npz")]) >= step]
        if not dropped:
            return []
        self._write_index([n for n in names if n not in dropped])
        paths = [os.path.join(self.directory, n) for n in dropped]
        for path in paths:
            _remove(path)
        return paths


def _refuse_other_format(directory: str, index: str, engine: str) -> None:
    """A model directory holds one checkpoint format: resuming across them would silently
    start from zero and overwrite the run."""
    if tf.io.gfile.exists(os.path.join(directory, index)):
        raise ValueError(
            f"{directory} holds checkpoints of {engine} ({index}): a run resumes on the engine "
            "that wrote its checkpoints; rerun with that --engine, or use a new model directory"
        )


def _remove(path: str) -> None:
    if tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)


class CheckpointCallback(keras.callbacks.Callback):
    """Checkpoint every N optimizer steps, at each epoch end and when training stops.

    Every worker runs it (the batch-norm statistics are averaged across workers first, a
    collective), the writer saves. Nothing is saved once `guard` saw a NaN/Inf loss, and the
    checkpoint of that step is deleted: its weights are the ones that gave the bad loss, so
    resuming from it would fail at once. Weights found non-finite at a save stop the run the
    same way (`guard.stop_reason == "nan"`). So the last good checkpoint is the latest.
    Saves happen on optimizer-step boundaries only (never inside a gradient accumulation).

    Args:
        checkpointer: Where to save.
        guard: The run's `RunGuard` (batch count and stop reason).
        images_per_batch: Images of one micro-batch over all workers.
        every_n_steps: Interval in optimizer steps; 0 saves at epoch ends and at the end only.
        engine: The run's engine (averages the batch-norm statistics); None: one process.
    """

    def __init__(
        self,
        checkpointer: Checkpointer | ArrayCheckpointer,
        guard: RunGuard,
        images_per_batch: int,
        every_n_steps: int = 0,
        engine: Engine | None = None,
    ):
        super().__init__()
        self.engine = engine or Engine()
        self.checkpointer = checkpointer
        self.guard = guard
        self.images_per_batch = images_per_batch
        self.every_n_steps = every_n_steps
        self._saved_at = guard.batches_seen
        self._nan_handled = False

    def _save(self) -> None:
        guard = self.guard
        if guard.stop_reason == "nan" or guard.batches_seen == self._saved_at:
            return
        if guard.batches_seen % guard.accumulation_steps:
            return  # mid-accumulation: the next boundary will save
        self.engine.average_model_state(self.model)
        # Every worker checks (the replicas are identical, so they all decide alike): an
        # update can make the weights non-finite while the loss that produced it was finite.
        if not all_finite(self.model.weights):
            # The loss of this update was finite, so its input (the checkpoint before) is
            # good; the state of update `step` is the first bad one, and is not saved.
            self._nan_handled = True
            guard.diverged(guard.step)
            return
        self.checkpointer.save(guard.batches_seen * self.images_per_batch, guard.step)
        self._saved_at = guard.batches_seen

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.guard.stop_reason == "nan" and not self._nan_handled:
            # The bad loss was computed with the weights saved as checkpoint `failed_step`
            # (the guard runs first, so the loss is the newest news).
            self.checkpointer.discard_from(self.guard.failed_step)
            self._nan_handled = True
        step = self.guard.step
        at_boundary = self.guard.batches_seen % self.guard.accumulation_steps == 0
        if self.every_n_steps and at_boundary and step % self.every_n_steps == 0:
            self._save()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._save()

    def on_train_end(self, logs: dict | None = None) -> None:
        self._save()
