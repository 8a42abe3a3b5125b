"""`RunGuard`: the one object that knows whether, and why, a run stops.

Counts the micro-batches, ends the run at its length, and stops every worker at the same
batch on a NaN/Inf loss or a SIGTERM (one scalar all-reduce per batch): a worker that stopped
alone would leave the others waiting in the next gradient all-reduce.
"""

from __future__ import annotations

import math
import signal

import keras

from lars_tf.engines.base import Engine


class RunGuard(keras.callbacks.Callback):
    """Counts batches, ends the run at its length, stops all workers on NaN/Inf or SIGTERM.

    The stop decision is one scalar all-reduce (maximum) per batch, so every worker stops
    after the same batch: a worker that stopped alone would leave the others waiting in the
    next gradient all-reduce. After `fit` returns, `stop_reason` says why it stopped early
    ("nan", "sigterm", or None), and `failed_step` the first bad state seen: the weights
    after that many updates gave a NaN/Inf loss, or were found non-finite at a save (weights
    are checked at saves only, so a statistic that does not touch the loss, such as a moving
    variance, may have turned bad at an earlier update). The checkpoints from `failed_step`
    on are discarded; every kept one precedes it.

    It is the one owner of the stop state: other callbacks end the run through `stop` and
    `diverged`, never by writing its attributes.

    Args:
        total_batches: Micro-batches each worker trains for over the whole run.
        start_batches: Micro-batches already consumed (when resuming).
        accumulation_steps: Micro-batches per optimizer step.
        engine: The run's `lars_tf.engines` engine, for the one all-reduce; None: one process.
    """

    def __init__(
        self,
        total_batches: int,
        start_batches: int = 0,
        accumulation_steps: int = 1,
        engine: Engine | None = None,
    ):
        super().__init__()
        self.engine = engine or Engine()
        self.total_batches = total_batches
        self.batches_seen = start_batches
        self.accumulation_steps = accumulation_steps
        self.stop_reason: str | None = None
        self.failed_step: int | None = None
        self._sigterm = False
        self._previous_handler = None

    def install_signal_handler(self) -> None:
        """Turn SIGTERM into a clean stop (checkpoint, then exit) instead of an abrupt kill."""

        def handler(signum, frame):
            del signum, frame
            self._sigterm = True

        self._previous_handler = signal.signal(signal.SIGTERM, handler)

    def restore_signal_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def stop(self, reason: str) -> None:
        """End the run after this batch for `reason` (e.g. "target": an evaluation reached
        the target accuracy); every worker calls it at the same batch."""
        self.stop_reason = reason
        self.model.stop_training = True

    def diverged(self, failed_step: int) -> None:
        """End the run as diverged at `failed_step`, e.g. when the weights after update
        `failed_step` (whose loss was finite) were found non-finite."""
        self.failed_step = failed_step
        self.stop("nan")

    @property
    def step(self) -> int:
        """Optimizer steps completed, from the batches consumed."""
        return self.batches_seen // self.accumulation_steps

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.batches_seen += 1
        loss = (logs or {}).get("loss")
        bad_loss = loss is not None and not math.isfinite(float(loss))
        code = self.engine.allreduce_max(2.0 * bad_loss + 1.0 * self._sigterm, "lars_tf_guard")
        at_boundary = self.batches_seen % self.accumulation_steps == 0
        if code >= 2.0:
            self.stop_reason = "nan"
            # Keras' loss is the epoch's running mean: it turns non-finite at the first bad
            # batch, computed with the weights after the updates before it.
            self.failed_step = (self.batches_seen - 1) // self.accumulation_steps
            self.model.stop_training = True
        elif self.batches_seen >= self.total_batches:
            self.model.stop_training = True  # done, SIGTERM or not
        elif code >= 1.0 and at_boundary:
            # Inside an accumulation the step is half done: finish it, so the checkpoint
            # written on the way out is at a whole step.
            self.stop_reason = "sigterm"
            self.model.stop_training = True

    @property
    def finished(self) -> bool:
        return self.batches_seen >= self.total_batches and self.stop_reason is None
