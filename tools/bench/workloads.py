"""The sizes each mode measures: `full` (`make bench`), `quick` (development), `smoke` (tests).

Only `full` measures what the issue asks for; `quick` keeps the real models with fewer
repeats, and `smoke` runs every code path on tiny models in seconds (its numbers mean
nothing).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainCase:
    """One model's training step: `model` at `image_size` px, `batch` images per step.

    `role` names the paper model it stands for in the scaling table ("alexnet" or
    "resnet50"); `reference_image_size` is the resolution that table assumes (its compute
    per image is scaled by the pixel ratio).
    """

    model: str
    image_size: int
    batch: int
    role: str
    reference_image_size: int
    num_classes: int = 1000
    options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Workload:
    """Everything a mode measures; see the module docstring."""

    name: str
    update_model: str
    update_options: dict
    update_repeats: int
    update_warmup: int
    train_cases: tuple[TrainCase, ...]
    train_rounds: int
    accumulation_steps: int
    pipeline_batch: int
    pipeline_batches: int
    pipeline_warmup_batches: int
    pipeline_rounds: int
    pipeline_image_sizes: dict[str, int]
    allreduce_model: str
    allreduce_repeats: int
    step_model: str
    step_image_size: int
    step_batch: int
    step_rounds: int
    onednn_cases: tuple[TrainCase, ...]
    onednn_rounds: int
    onednn_steps: int
    convert_workers: int | None = None


FULL = Workload(
    name="full",
    update_model="resnet50",
    update_options={},
    update_repeats=21,
    update_warmup=3,
    train_cases=(
        TrainCase("alexnet_bn", 227, 8, "alexnet", 227),
        TrainCase("resnet50", 128, 8, "resnet50", 224),
    ),
    train_rounds=6,
    accumulation_steps=4,
    pipeline_batch=32,
    # Long enough for tf.data's AUTOTUNE to settle: with 4 untimed and 16 timed batches the
    # same pipeline measured anywhere from 0.46 to 0.78 of the limit from one sample to the next.
    pipeline_batches=32,
    pipeline_warmup_batches=30,
    pipeline_rounds=5,
    # The paper's AlexNet crop for its resize-then-crop; ResNet-50's for the Inception crop.
    pipeline_image_sizes={"paper": 227, "inception": 224},
    allreduce_model="resnet50",
    allreduce_repeats=10,
    step_model="resnet50",
    step_image_size=128,
    step_batch=8,
    step_rounds=4,
    # The sweep's models as tools/sweep.py trains them; the twin at the batch of the report in
    # issue 17, ResNet-20 (about 10 s per step at 512 on 2 busy cores) at 128.
    onednn_cases=(
        TrainCase("alexnet_bn_small", 32, 512, "alexnet", 227, 10, {"groups": 1, "dropout": 0.0}),
        TrainCase("resnet20_cifar", 32, 128, "resnet50", 224, 10),
    ),
    onednn_rounds=5,
    onednn_steps=2,
)

QUICK = dataclasses.replace(
    FULL,
    name="quick",
    update_repeats=7,
    update_warmup=2,
    train_cases=(
        TrainCase("alexnet_bn", 227, 2, "alexnet", 227),
        TrainCase("resnet50", 64, 4, "resnet50", 224),
    ),
    train_rounds=2,
    pipeline_batch=16,
    pipeline_batches=8,
    pipeline_warmup_batches=2,
    pipeline_rounds=2,
    allreduce_repeats=3,
    step_model="resnet20_cifar",
    step_image_size=32,
    step_batch=16,
    step_rounds=2,
    onednn_cases=(
        TrainCase("alexnet_bn_small", 32, 128, "alexnet", 227, 10, {"groups": 1, "dropout": 0.0}),
        TrainCase("resnet20_cifar", 32, 128, "resnet50", 224, 10),
    ),
    onednn_rounds=3,
    onednn_steps=1,
)

_RESNET8 = {"stage_blocks": (1, 1, 1)}

SMOKE = Workload(
    name="smoke",
    # ResNet-8 (one block per stage): the fewest layers that still exercise every path.
    update_model="resnet20_cifar",
    update_options=_RESNET8,
    update_repeats=3,
    update_warmup=1,
    train_cases=(
        TrainCase("alexnet_bn_small", 32, 4, "alexnet", 227, num_classes=10),
        TrainCase("resnet20_cifar", 32, 4, "resnet50", 224, num_classes=10, options=_RESNET8),
    ),
    train_rounds=1,
    accumulation_steps=2,
    pipeline_batch=4,
    pipeline_batches=2,
    pipeline_warmup_batches=1,
    pipeline_rounds=1,
    pipeline_image_sizes={"paper": 32, "inception": 32},
    allreduce_model="resnet20_cifar",
    allreduce_repeats=2,
    step_model="resnet20_cifar",
    step_image_size=32,
    step_batch=4,
    step_rounds=1,
    onednn_cases=(TrainCase("resnet20_cifar", 32, 4, "resnet50", 224, 10, options=_RESNET8),),
    onednn_rounds=1,
    onednn_steps=1,
    # Worker processes would each start TensorFlow: slower than converting a few images.
    convert_workers=1,
)

WORKLOADS = {w.name: w for w in (FULL, QUICK, SMOKE)}
