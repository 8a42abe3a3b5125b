"""Command-line flags of `train.py`, one module per concern, with their validators.

- `train_flags.model`: the architecture and its options; builds the model.
- `train_flags.data`: the input source, splits, preprocessing; builds the input.
- `train_flags.schedule`: the run's length, the batch and its split, the learning-rate
  schedule; makes the `lars_tf.plan.RunPlan` and the schedule.
- `train_flags.optimizer`: LARS (or SGD) and its variants; builds the optimizer.
- `train_flags.run`: the system (dtype, XLA, seeds, all-reduce) and the run (model directory,
  checkpoints, evaluation, logs); checks the engine, gives the `TrainerOptions`.
- `train_flags.engine`: `--engine`, `--cpu_devices`, `--num_workers`, which `train.py` reads
  before Keras is imported (they choose its backend).

Each module's `define(fv)` defines its flags (TF Model Garden style) with their bounds
(absl's `lower_bound` where one fits, else a validator naming the flag and the values
allowed) and the checks of its flag combinations. Validators run when the flags are parsed,
before any data is read or file written. Checks that need the world size (the batch split) or
the dataset's size (warm-up against `--train_steps`) are in the getters, which `train.py`
calls before it builds anything. Flags are never modified: derived values come from getters.
All but `train_flags.engine` import Keras, so this package loads them on first use (PEP 562):
`import train_flags.engine` must not import Keras before the backend is chosen.

Recipes are flag files: `python train.py --flagfile=flags/alexnet_bn_lars_b8k.cfg`.
"""

from __future__ import annotations

import importlib

from absl import flags

FLAGS = flags.FLAGS
# The modules whose `define` makes the flags of `define_all`, in --help's order.
MODULES = ("model", "data", "schedule", "optimizer", "run")
# Each name below is the attribute of the module it maps to.
_EXPORTS = {
    "build_input": "data",
    "dataset_source": "data",
    "build_model": "model",
    "model_options": "model",
    "build_optimizer": "optimizer",
    "check_engine": "run",
    "configure_process": "run",
    "trainer_options": "run",
    "build_schedule": "schedule",
    "learning_rate": "schedule",
    "per_worker_batch": "schedule",
    "run_plan": "schedule",
    "training_steps": "schedule",
    "warmup_steps": "schedule",
}

__all__ = ["FLAGS", "define_all", *_EXPORTS]


def __getattr__(name: str):
    if name in MODULES:
        return importlib.import_module(f"train_flags.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"train_flags.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'train_flags' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *MODULES, *_EXPORTS])


def define_all(fv: flags.FlagValues = FLAGS) -> None:
    """Defines every flag of `train.py` but the engine flags in `fv`, with the validators."""
    for name in MODULES:
        importlib.import_module(f"train_flags.{name}").define(fv)
