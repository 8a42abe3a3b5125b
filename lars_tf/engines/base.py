"""The interface every engine implements, with the single-process behaviour as its default.

An engine is what makes one training run out of several workers. The trainer asks it, and
only it, for:

- the world: `processes` (each reads its own shard of the input), `rank` (this process),
  `replicas` (the data-parallel copies the gradient is averaged over: processes x devices
  per process for the in-process engines);
- `scope()`, under which the model and optimizer are built and compiled;
- `fit_input`: this worker's dataset as `model.fit` must be given it;
- `prepare_optimizer`: gradients averaged once per optimizer update;
- `restore`, `broadcast` and `run_on_root`: rank 0's restored state on every process;
- the cross-process collectives of the stop decision, the metrics and the evaluation:
  `allreduce_max`, `allreduce_sum`, `average_logs`, `average_model_state`,
  `replica_mismatches`;
- `checkpointer`: the checkpoint format its backend can write;
- `check`: the options it cannot run, refused before any work.

Within one process an engine that spreads replicas over devices (a `MirroredStrategy`,
JAX's `DataParallel`) averages gradients and keeps the replicas equal itself, so every
cross-process collective is the identity here.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


class WorkerFailure(RuntimeError):
    """Another worker failed in a step that every worker waits for (`Engine.run_on_root`)."""


def run_on_root(
    function: Callable[[], Any],
    what: str,
    *,
    rank: int,
    broadcast_object: Callable[[Any], Any],
    barrier: Callable[[], Any],
) -> Any:
    """`function()`, run on rank 0 only: its result, or its failure, on every worker.

    For what only one worker can do, e.g. rank 0 reading a checkpoint in a model directory
    that need not be shared while the others wait for the result in a broadcast. A plain
    broadcast of the result would leave them waiting there, with no word of why, until the
    launcher kills them when the root raises; here every worker receives the outcome, prints
    the reason to stderr, and raises once all of them have printed it.

    Args:
        function: Called without arguments on rank 0; its result must be picklable.
        what: The step, for the message: "rank 0 failed to <what>: <error>".
        rank: This worker's rank.
        broadcast_object: Rank 0's picklable argument, returned on every worker (the
            engine's collective; every worker calls it).
        barrier: A collective every worker calls once it has printed the failure.

    Returns:
        `function()`'s result, on every worker.

    Raises:
        Exception: On rank 0, whatever `function` raised.
        WorkerFailure: On the other workers, naming rank 0's error.
    """
    failure = None
    outcome = None
    if rank == 0:
        try:
            result = function()
            pickle.dumps(result)  # an unpicklable result would fail inside the broadcast
            outcome = ("ok", result)
        # BaseException: a KeyboardInterrupt or SystemExit on the root must not leave the
        # others in the broadcast either; every worker hears of it, then all raise.
        except BaseException as error:
            failure = error
            outcome = ("failed", f"{type(error).__name__}: {error}")
    status, value = broadcast_object(outcome)
    if status == "ok":
        return value
    message = f"rank 0 failed to {what}: {value}"
    print(f"lars_tf rank {rank}: {message}", file=sys.stderr, flush=True)
    barrier()
    if failure is not None:
        raise failure
    raise WorkerFailure(message)


class Engine:
    """One process, one replica: every collective is the identity."""

    name = "single"

    @property
    def processes(self) -> int:
        return 1

    @property
    def rank(self) -> int:
        return 0

    @property
    def replicas(self) -> int:
        return self.processes

    def is_rank0(self) -> bool:
        """The writer predicate: checkpoints, logs and progress come from rank 0 only."""
        return self.rank == 0

    def describe(self) -> str:
        """One line for the run's banner."""
        return f"{self.name}: {self.processes} process(es), {self.replicas} replica(s)"

    def process_seed(self, seed: int) -> int:
        """This process's Keras seed: `seed + rank`, so that dropout differs across workers
        (the weights are made equal by the broadcast after the restore). Under tf.distribute
        the strategy makes the seed generators' states equal anyway, and the engine's
        `broadcast` sets them apart per replica."""
        return seed + self.rank

    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def configure(self, threads_per_worker: int = 0) -> None:
        """Set thread counts and devices, before the first operation runs."""

    def check(
        self,
        *,
        global_batch_size: int,
        accumulation_steps: int,
        fp16_allreduce: bool,
        xla: bool,
        bn_recalibration: bool,
        dtype: str = "float32",
    ) -> None:
        """Raise ValueError, naming the flag, for what this engine cannot run.

        The batch must split evenly over the replicas of one process (the per-process batch
        is checked by `lars_tf.plan`).
        """
        local = self.replicas // self.processes
        per_process = global_batch_size // (self.processes * accumulation_steps)
        if local > 1 and per_process % local:
            raise ValueError(
                f"--global_batch_size={global_batch_size}: each process's micro-batch of "
                f"{per_process} does not split over its {local} devices; make the global batch "
                f"a multiple of {self.replicas * accumulation_steps}"
            )
        if fp16_allreduce:
            raise ValueError(
                f"--fp16_allreduce is Horovod's compression; --engine={self.name} has no "
                "float16 all-reduce: run without it"
            )

    def fit_input(self, model: Any, dataset: Any) -> Any:
        """This worker's training `dataset` (its shard, at the per-worker micro-batch), as
        `model.fit` must receive it; builds what `fit` would otherwise build from a batch."""
        from lars_tf import keras_internals  # imports Keras, which launch-time code avoids

        keras_internals.build_for_fit(model, dataset.element_spec)
        return dataset

    def prepare_optimizer(self, optimizer: Any, compression: str | None = None) -> Any:
        """Make `optimizer` average its gradients across processes once per update."""
        return optimizer

    def broadcast(self, model: Any, optimizer: Any) -> None:
        """Give every process rank 0's weights and optimizer state."""

    def run_on_root(self, function: Callable[[], Any], what: str) -> Any:
        """`function()` on rank 0, its result (or its failure) on every process, through the
        engine's `_broadcast_object` and `allreduce_max` (module-level `run_on_root`)."""
        if self.processes == 1:
            return function()
        return run_on_root(
            function,
            what,
            rank=self.rank,
            broadcast_object=self._broadcast_object,
            barrier=lambda: self.allreduce_max(0.0),
        )

    def _broadcast_object(self, value: Any) -> Any:
        """Rank 0's picklable `value`, on every process: what `run_on_root` needs of an
        engine of several processes (or it overrides `run_on_root`)."""
        raise NotImplementedError(f"{type(self).__name__} broadcasts no objects")

    def restore(self, checkpointer: Any, model: Any, optimizer: Any) -> int:
        """Restore `checkpointer`'s latest checkpoint on rank 0 and give every process its
        state; returns the images it had consumed (0 without one), or raises rank 0's
        failure on every process."""
        images = self.run_on_root(checkpointer.restore_latest, "restore the latest checkpoint")
        self.broadcast(model, optimizer)
        return images

    def allreduce_max(self, value: float, name: str = "lars_tf_max") -> float:
        return float(value)

    def allreduce_sum(self, values: Any, name: str = "lars_tf_sum") -> np.ndarray:
        return np.asarray(values, np.float64)

    def average_logs(self, logs: Mapping[str, Any], name: str = "lars_tf_logs") -> dict:
        return dict(logs)

    def average_model_state(self, model: Any) -> None:
        """Average the batch-norm moving statistics across processes."""

    def replica_mismatches(self, variables: Sequence[Any]) -> list[str]:
        """Variables whose value differs between processes, by path."""
        return []

    def checkpointer(self, directory: str, model: Any, optimizer: Any, max_to_keep: int):
        """A `lars_tf.checkpoint` checkpointer for this backend (rank 0 writes)."""
        from lars_tf import checkpoint  # imports TensorFlow, which launch-time code avoids

        return checkpoint.Checkpointer(
            directory, model, optimizer, max_to_keep=max_to_keep, is_writer=self.is_rank0()
        )
