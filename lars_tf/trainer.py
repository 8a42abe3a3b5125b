"""`Trainer`: one training run, flag-free, on any engine.

Given an engine, a `RunPlan`, builders for the model and the optimizer, the input and a model
directory, `Trainer.run` builds, restores the latest checkpoint, trains with `model.fit`,
evaluates and checkpoints, and returns an `Outcome`. It owns the callback order:

1. `RunGuard` first: a NaN/Inf step must be known before anything saves it;
2. `ThroughputCallback` before whatever evaluates or saves at epoch end (it stops its clock);
3. `LearningRateLogger`, then `EpochLogAverage`, so every later callback sees the job's means;
4. batch-norm re-estimation, then evaluation, then the checkpoint, at the epochs that evaluate:
   the saved model is the evaluated one;
5. the writers of rank 0: per-layer statistics, TensorBoard, CSV, progress lines.

Resuming: a checkpoint records the images consumed. Rerunning continues at that update with
the restored optimizer (so the step counter, momentum and schedule continue exactly). The data
position is restored to the epoch: the input is rebuilt for the epoch in progress (with the
seed offset by the epoch, so orders differ between epochs) and the rest of that epoch is drawn
from its start, so examples of a partly done epoch may be seen twice and others not at all in
that one epoch. With `exact_resume` (train.py's `--deterministic`) every data epoch is its own
input pipeline and the batches already consumed of a partly done epoch are read again and
dropped, so a deterministic run interrupted anywhere and resumed ends with the weights of an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import gc
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf
from absl import logging

from lars_tf import batchnorm, callbacks, progress
from lars_tf.checkpoint import CHECKPOINT_SUBDIR, CheckpointCallback
from lars_tf.engines.base import Engine
from lars_tf.evaluation import EvaluationCallback, evaluate, result_line
from lars_tf.guard import RunGuard
from lars_tf.plan import RunPlan


@dataclasses.dataclass(frozen=True)
class Segment:
    """One `model.fit` call: Keras epochs `[initial_epoch, epochs)` of `steps_per_epoch`."""

    initial_epoch: int
    epochs: int
    steps_per_epoch: int
    data_epoch: int


def plan_segments(
    start_batches: int, total_batches: int, batches_per_epoch: int, one_per_epoch: bool = False
) -> list[Segment]:
    """Split the rest of a run into `fit` calls whose epochs line up with data epochs.

    A run resumed mid-epoch first finishes that epoch (a shorter Keras epoch of the same
    number), then runs whole epochs; the last epoch may be cut short by `RunGuard`.

    Args:
        start_batches: Micro-batches already consumed per worker.
        total_batches: Micro-batches of the whole run per worker.
        batches_per_epoch: Micro-batches per epoch per worker.
        one_per_epoch: One segment per data epoch instead of one for all the whole epochs.

    Returns:
        The segments to run, possibly none.
    """
    if start_batches >= total_batches:
        return []
    epoch, offset = divmod(start_batches, batches_per_epoch)
    last_epoch = math.ceil(total_batches / batches_per_epoch)
    segments = []
    if offset:
        segments.append(Segment(epoch, epoch + 1, batches_per_epoch - offset, epoch))
        epoch += 1
    if one_per_epoch:
        segments += [Segment(e, e + 1, batches_per_epoch, e) for e in range(epoch, last_epoch)]
    elif epoch < last_epoch:
        segments.append(Segment(epoch, last_epoch, batches_per_epoch, epoch))
    return segments


def fit(
    model: keras.Model,
    dataset_for_epoch: Callable[[int], tf.data.Dataset],
    *,
    guard: RunGuard,
    batches_per_epoch: int,
    callbacks: Sequence[keras.callbacks.Callback],
    verbose: int | str = "auto",
    exact_resume: bool = False,
    engine: Engine | None = None,
) -> list[keras.callbacks.History]:
    """Train from `guard.batches_seen` to `guard.total_batches` with `model.fit`.

    Args:
        model: The compiled model.
        dataset_for_epoch: Builds this worker's endless training dataset starting at the given
            data epoch (called once per `fit` call; use the epoch to vary the shuffle seed).
        guard: The run's `RunGuard`; it must also be in `callbacks`, before the checkpoint
            callback.
        batches_per_epoch: Micro-batches per epoch per worker.
        callbacks: Callbacks for every `fit` call.
        verbose: Keras' `verbose` (0 on workers other than rank 0).
        exact_resume: Make the batches of each step independent of interruptions: one `fit`
            call per data epoch, each on `dataset_for_epoch(epoch)` (an uninterrupted run
            also starts every epoch from a fresh pipeline, as a resumed one must), and a
            partly done epoch skips the batches it consumed before the interruption (they
            are read and decoded again, once, on resume). With a deterministic pipeline and
            deterministic ops, a resumed run then ends with the weights of an uninterrupted
            one.
        engine: Gives each dataset to `fit` (`Engine.fit_input`); default one process.

    Returns:
        The `History` of each `fit` call, in order.
    """
    engine = engine or Engine()
    histories = []
    segments = plan_segments(
        guard.batches_seen, guard.total_batches, batches_per_epoch, one_per_epoch=exact_resume
    )
    for segment in segments:
        dataset = dataset_for_epoch(segment.data_epoch)
        consumed = batches_per_epoch - segment.steps_per_epoch
        if exact_resume and consumed:
            dataset = dataset.skip(consumed)
        dataset = engine.fit_input(model, dataset)
        history = model.fit(
            dataset,
            initial_epoch=segment.initial_epoch,
            epochs=segment.epochs,
            steps_per_epoch=segment.steps_per_epoch,
            callbacks=list(callbacks),
            verbose=verbose,
            shuffle=False,  # the input pipeline shuffles
        )
        if keras.distribution.distribution() is not None:
            # Under a distribution (the jax engine's DataParallel) Keras' JAX epoch iterator
            # keeps each call's tf.data iterator in a reference cycle: one pipeline per epoch
            # (buffers, threads) alive until a full collection, and two JAX processes hung 20
            # to 40 s at exit in their destructors. Collected here: 0.5 to 1.5 s a call
            # (measured). Without a distribution nothing piles up, so no collection.
            gc.collect()
        histories.append(history)
        if guard.stop_reason is not None:
            break
    return histories


class Outcome(enum.Enum):
    """How a run ended."""

    DONE = "done"  # the planned length, or the target accuracy, was reached
    DIVERGED = "diverged"  # NaN/Inf loss or weights; the last good checkpoint is kept
    PREEMPTED = "preempted"  # SIGTERM; a checkpoint was written first
    INCONSISTENT = "inconsistent"  # the workers' replicas differ after training


@dataclasses.dataclass(frozen=True)
class RunInput:
    """What a run reads.

    Attributes:
        dataset_for_epoch: This worker's endless training dataset from the given data epoch
            (the epoch varies the shuffle seed).
        eval_dataset: This worker's finite evaluation dataset.
        corrupt_count: Undecodable training images skipped so far.
    """

    dataset_for_epoch: Callable[[int], tf.data.Dataset]
    eval_dataset: tf.data.Dataset
    corrupt_count: Callable[[], int] = lambda: 0


@dataclasses.dataclass(frozen=True)
class TrainerOptions:
    """How a run evaluates, checkpoints and reports (lengths are in the `RunPlan`).

    Attributes:
        evaluates: Whether the run evaluates at all (a synthetic benchmark need not).
        eval_every_epochs: Evaluation interval in epochs; 0: at the end only.
        eval_steps: Batches per evaluation; None: the whole split.
        target_top1: Stop at the first evaluation whose top-1 reaches it; None: never.
        bn_recalibration_batches: Re-estimate batch-norm statistics from this many training
            batches before each evaluation; 0: off.
        layer_statistics_every_updates: Interval of the per-layer trust-ratio logs; 0: off.
        keep_checkpoints: Checkpoints kept.
        exact_resume: See the module docstring.
        compression: Gradient compression of the engine's all-reduce ("fp16" or None).
        jit_compile: `compile(jit_compile=...)`.
        terminal: Whether stdout is a terminal (Keras' progress bar) or a log (progress lines).
        init_weights: A Keras `.weights.h5` file of the model to start from (any backend's);
            a checkpoint restored later replaces it.
    """

    evaluates: bool = True
    eval_every_epochs: int = 1
    eval_steps: int | None = None
    target_top1: float | None = None
    bn_recalibration_batches: int = 0
    layer_statistics_every_updates: int = 0
    keep_checkpoints: int = 5
    exact_resume: bool = False
    compression: str | None = None
    jit_compile: bool | str = "auto"
    terminal: bool = False
    init_weights: str | None = None


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What `Trainer.run` returns.

    Attributes:
        outcome: How the run ended.
        step: The last update (for DIVERGED, the update whose loss or weights were bad).
        evaluation: The last evaluation's results, or None.
        target_reached: See `EvaluationCallback.target_reached`.
        target_top1: The run's target, or None.
        checkpoint: The latest checkpoint kept, or None.
        differing: For INCONSISTENT, the variables whose replicas differ.
    """

    outcome: Outcome
    step: int
    evaluation: dict | None = None
    target_reached: dict | None = None
    target_top1: float | None = None
    checkpoint: str | None = None
    differing: tuple[str, ...] = ()

    def summary(self) -> str:
        """The lines that end the run's log."""
        if self.outcome is Outcome.DIVERGED:
            kept = (
                f"The last good checkpoint, {self.checkpoint}, was kept."
                if self.checkpoint
                else "No checkpoint was written before it."
            )
            return (
                "Training stopped: the loss or the weights became NaN or Inf at step "
                f"{self.step}. {kept}"
            )
        if self.outcome is Outcome.PREEMPTED:
            return f"SIGTERM: stopped at step {self.step}; checkpoint {self.checkpoint}."
        if self.outcome is Outcome.INCONSISTENT:
            differing = ", ".join(self.differing)
            return f"ERROR: the workers' replicas differ after training in: {differing}"
        if self.evaluation is None:
            return f"Trained {self.step} steps on synthetic data; not evaluated (--eval_steps)."
        lines = []
        if self.target_top1 is not None:
            reached, target = self.target_reached, f"Target top-1 {100 * self.target_top1:.2f}%"
            lines.append(
                f"{target} reached at epoch {reached['epoch']}, update {reached['update']}."
                if reached
                else f"{target} not reached."
            )
        lines.append(result_line(self.step, self.evaluation))
        return "\n".join(lines)


class Trainer:
    """One run on one engine; see the module docstring.

    Args:
        engine: The `lars_tf.engines` engine (configured and checked).
        plan: The run's lengths.
        build_model: Returns the (uncompiled) model; called under the engine's scope.
        build_optimizer: Returns the optimizer for `plan`; called under the engine's scope.
        loss: The loss, from logits.
        data: The input.
        model_dir: Checkpoints, TensorBoard events, CSV log, plan and results.
        options: See `TrainerOptions`.
        report: Prints a line on rank 0.
    """

    def __init__(
        self,
        *,
        engine: Engine,
        plan: RunPlan,
        build_model: Callable[[], keras.Model],
        build_optimizer: Callable[[RunPlan], keras.optimizers.Optimizer],
        loss: Any,
        data: RunInput,
        model_dir: str,
        options: TrainerOptions = TrainerOptions(),
        report: Callable[[str], None] | None = None,
    ):
        self.engine = engine
        self.plan = plan
        self.data = data
        self.model_dir = model_dir
        self.options = options
        self._print = report or (lambda line: print(line, flush=True))
        with engine.scope():
            self.model = build_model()
            if options.init_weights:
                self.model.load_weights(options.init_weights)
            num_classes = self.model.output_shape[-1]
            self.model.compile(
                optimizer=build_optimizer(plan),
                loss=loss,
                metrics=[
                    keras.metrics.SparseCategoricalAccuracy(name="top1"),
                    keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
                ],
                jit_compile=options.jit_compile,
            )
            # Average gradients once per update; then create the optimizer's slots so that
            # rank 0's weights and state (fresh, or restored) can be sent to every worker.
            self.optimizer = engine.prepare_optimizer(
                self.model.optimizer, compression=options.compression
            )
            self.optimizer.build(self.model.trainable_variables)
        self.checkpointer = engine.checkpointer(
            os.path.join(model_dir, CHECKPOINT_SUBDIR),
            self.model,
            self.optimizer,
            max_to_keep=options.keep_checkpoints,
        )
        self.start_update = 0
        self.restored_images = 0
        self._restored = False

    def report(self, line: str) -> None:
        if self.engine.is_rank0():
            self._print(line)

    def write_description(self, flagfile: str, **extra: Any) -> None:
        """On rank 0: the command's flags (`flags.txt`, reloadable with --flagfile) and the
        plan, the engine, its replicas and `extra` (`plan.json`) into the model directory,
        both also as TensorBoard text."""
        if not self.engine.is_rank0():
            return
        tf.io.gfile.makedirs(self.model_dir)
        engine = self.engine
        description = {
            **self.plan.as_dict(),
            "engine": engine.name,
            "replicas": engine.replicas,
            **extra,
        }
        plan = json.dumps(description, indent=2)
        for name, text in (("flags.txt", flagfile), ("plan.json", plan)):
            with tf.io.gfile.GFile(os.path.join(self.model_dir, name), "w") as f:
                f.write(text)
        writer = tf.summary.create_file_writer(os.path.join(self.model_dir, "tensorboard", "train"))
        with writer.as_default(step=0):
            tf.summary.text("flags", "```\n" + flagfile + "\n```")
            tf.summary.text("plan", "```\n" + plan + "\n```")
        writer.close()

    def start_line(self, model_name: str, train_examples: int, peak_lr: float) -> str:
        """The line that opens the run's log: the batch split, the lengths, the engine."""
        plan = self.plan
        return (
            f"{model_name} on {train_examples} images, {plan.workers} worker(s) x "
            f"{plan.per_worker_batch_size} x {plan.accumulation_steps} accumulation = global "
            f"batch {plan.global_batch_size}; {plan.total_updates} steps "
            f"({plan.updates_per_epoch}/epoch), warm-up {plan.warmup_updates}, peak LR "
            f"{peak_lr:g}; engine {self.engine.describe()}"
        )

    def restore(self) -> int:
        """Restore the latest checkpoint on rank 0 and broadcast it; returns its update.

        Rank 0 reads it (the model directory need not be shared); every worker gets the
        images it had consumed, or the reason it could not be read, and then raises it.
        """
        self.restored_images = self.engine.restore(self.checkpointer, self.model, self.optimizer)
        self.start_update = self.plan.updates_from_images(self.restored_images)
        self._restored = True
        return self.start_update

    def evaluate(self, recalibration_batches: int = 0) -> dict:
        """Evaluate the model as it is (after an optional batch-norm re-estimation)."""
        if recalibration_batches:
            batchnorm.recalibrate(self.model, self.data.dataset_for_epoch(0), recalibration_batches)
        return evaluate(self.model, self.data.eval_dataset, self.options.eval_steps, self.engine)

    def _callbacks(self, guard: RunGuard) -> tuple[list, EvaluationCallback | None]:
        plan, options, engine = self.plan, self.options, self.engine
        evaluation = None
        if options.evaluates:
            evaluation = EvaluationCallback(
                self.data.eval_dataset,
                guard,
                options.eval_every_epochs,
                options.eval_steps,
                target_top1=options.target_top1,
                engine=engine,
            )
        recalibration = []
        if options.bn_recalibration_batches:
            recalibration.append(
                batchnorm.BatchNormRecalibration(
                    self.data.dataset_for_epoch(0),
                    options.bn_recalibration_batches,
                    options.eval_every_epochs,
                    guard,
                )
            )
        run_callbacks = [
            guard,
            progress.ThroughputCallback(plan.images_per_micro_batch),
            callbacks.LearningRateLogger(),
            progress.EpochLogAverage(engine.average_logs),
            *recalibration,
            *([evaluation] if evaluation else []),
            CheckpointCallback(
                self.checkpointer,
                guard,
                plan.images_per_micro_batch,
                plan.checkpoint_every_updates,
                engine=engine,
            ),
        ]
        if options.layer_statistics_every_updates:
            run_callbacks.append(
                callbacks.LayerStatisticsLogger(
                    os.path.join(self.model_dir, "tensorboard", "layers"),
                    every_n_steps=options.layer_statistics_every_updates,
                    should_write=engine.is_rank0,
                )
            )
        if engine.is_rank0():
            run_callbacks += [
                keras.callbacks.TensorBoard(
                    os.path.join(self.model_dir, "tensorboard"), write_graph=False
                ),
                keras.callbacks.CSVLogger(
                    os.path.join(self.model_dir, "training_log.csv"), append=True
                ),
            ]
            if not options.terminal and plan.progress_every_updates:
                # The rate is read from the logs LearningRateLogger wrote for this batch: on
                # JAX the optimizer's variables hold stale values while `fit` runs.
                run_callbacks.append(
                    progress.ProgressLogger(
                        total_updates=plan.total_updates,
                        start_update=self.start_update,
                        updates_per_epoch=plan.updates_per_epoch,
                        images_per_update=plan.global_batch_size,
                        every_n_updates=plan.progress_every_updates,
                        accumulation_steps=plan.accumulation_steps,
                        print_fn=self.report,
                    )
                )
        return run_callbacks, evaluation

    def run(self) -> RunResult:
        """Train from the latest checkpoint (restored first, unless `restore` ran) to the
        plan's end."""
        if not self._restored:
            self.restore()
        plan = self.plan
        guard = RunGuard(
            plan.micro_batches(plan.total_updates),
            plan.micro_batches(self.start_update),
            plan.accumulation_steps,
            engine=self.engine,
        )
        run_callbacks, evaluation = self._callbacks(guard)
        guard.install_signal_handler()
        try:
            fit(
                self.model,
                self.data.dataset_for_epoch,
                guard=guard,
                batches_per_epoch=plan.micro_batches(plan.updates_per_epoch),
                callbacks=run_callbacks,
                verbose=(1 if self.options.terminal else 2) if self.engine.is_rank0() else 0,
                exact_resume=self.options.exact_resume,
                engine=self.engine,
            )
        finally:
            guard.restore_signal_handler()
        if self.data.corrupt_count():
            logging.warning("%d corrupt training images were skipped.", self.data.corrupt_count())
        ended = functools.partial(
            RunResult, target_top1=self.options.target_top1, checkpoint=self.checkpointer.latest
        )
        if guard.stop_reason == "nan":
            return ended(Outcome.DIVERGED, guard.failed_step)
        if guard.stop_reason == "sigterm":
            return ended(Outcome.PREEMPTED, guard.step)
        differing = self.engine.replica_mismatches(self.model.weights + self.optimizer.variables)
        if differing:
            return ended(Outcome.INCONSISTENT, guard.step, differing=tuple(differing))
        if self.engine.processes > 1:
            self.report(
                f"Model and optimizer state are identical on all {self.engine.processes} workers."
            )
        if evaluation is None:
            self.write_results({"step": guard.step})
            return ended(Outcome.DONE, guard.step)
        results = evaluation.last_results
        if results is None or evaluation.last_step != guard.step:
            results = self.evaluate()
        summary = {"step": guard.step, **results}
        if self.options.target_top1 is not None:
            summary["target_accuracy"] = self.options.target_top1
            summary["target_reached"] = evaluation.target_reached
        self.write_results(summary)
        return ended(Outcome.DONE, guard.step, results, evaluation.target_reached)

    def wait_for_all(self) -> None:
        """Return once every process got here (with one process, at once).

        Call it last: under horovodrun a rank that exits has the others terminated within
        seconds, so rank 0 must not be left writing the stop's checkpoint or its summary.
        """
        if self.engine.processes > 1:
            self.engine.allreduce_max(0.0, name="lars_tf_exit")

    def write_results(self, summary: dict) -> None:
        if self.engine.is_rank0():
            with tf.io.gfile.GFile(os.path.join(self.model_dir, "results.json"), "w") as f:
                json.dump(summary, f, indent=2)
