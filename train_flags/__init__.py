"""Command-line flags of `train.py`, one module per concern, with their validators.

- `train_flags.model`: the architecture and its options; builds the model.
- `train_flags.data`: the input source, splits, preprocessing; builds the input.
- `train_flags.schedule`: the run's length, the batch and its split, the learning-rate
  schedule; makes the `lars_tf.plan.RunPlan` and the schedule.
- `train_flags.optimizer`: LARS (or SGD) and its variants; builds the optimizer.
- `train_flags.run`: the system (dtype, XLA, seeds, all-reduce) and the run (model directory,
  checkpoints, evaluation, logs); checks the engine, gives the `TrainerOptions`.

Each module's `define(fv)` defines its flags (TF Model Garden style) with their bounds
(absl's `lower_bound` where one fits, else a validator naming the flag and the values
allowed) and the checks of its flag combinations. Validators run when the flags are parsed,
before any data is read or file written. Checks that need the world size (the batch split) or
the dataset's size (warm-up against `--train_steps`) are in the getters, which `train.py`
calls before it builds anything. Flags are never modified: derived values come from getters.
The engine flags (`--engine`, `--cpu_devices`, `--num_workers`) are train.py's own: it reads
them before Keras is imported, and these modules import Keras.

Recipes are flag files: `python train.py --flagfile=flags/alexnet_bn_lars_b8k.cfg`.
"""

from __future__ import annotations

from absl import flags

from train_flags import data, model, optimizer, run, schedule
from train_flags.data import build_input, dataset_source
from train_flags.model import build_model, model_options
from train_flags.optimizer import build_optimizer
from train_flags.run import check_engine, trainer_options
from train_flags.schedule import (
    build_schedule,
    learning_rate,
    per_worker_batch,
    run_plan,
    training_steps,
    warmup_steps,
)

FLAGS = flags.FLAGS
MODULES = (model, data, schedule, optimizer, run)

__all__ = [
    "FLAGS",
    "build_input",
    "build_model",
    "build_optimizer",
    "build_schedule",
    "check_engine",
    "dataset_source",
    "define_all",
    "learning_rate",
    "model_options",
    "per_worker_batch",
    "run_plan",
    "trainer_options",
    "training_steps",
    "warmup_steps",
]


def define_all(fv: flags.FlagValues = FLAGS) -> None:
    """Defines every flag of `train.py` but the engine flags in `fv`, with the validators."""
    for module in MODULES:
        module.define(fv)
