"""What a sweep runs: the methods, models and protocols, and one run's train.py command."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_CIFAR = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
METHODS = ("sgd", "sgd_warmup", "lars", "nesterov")
METHOD_TITLES = {
    "sgd": "SGD (baseline)",
    "sgd_warmup": "SGD + linear scaling + warm-up",
    "lars": "LARS + warm-up + poly(2)",
    "nesterov": "Nesterov SGD + linear scaling + warm-up",
}
# train.py options of each method; "nesterov" is SGD + warm-up's recipe (rates, warm-up and
# schedule) with Nesterov momentum (Nado et al. 2021, "A Large Batch Optimizer Reality Check").
METHOD_FLAGS = {
    "sgd": ("--flagfile=flags/cifar10_sgd.cfg",),
    "sgd_warmup": ("--flagfile=flags/cifar10_sgd_warmup.cfg",),
    "lars": ("--flagfile=flags/cifar10_lars.cfg",),
    "nesterov": ("--flagfile=flags/cifar10_sgd_warmup.cfg", "--nesterov"),
}
# The methods whose rates scale linearly with the batch from the baseline's (`sgd_base_lrs`).
LINEAR_SCALING = ("sgd_warmup", "nesterov")
# The sweep's models: their train.py options by the name that labels their runs (CPU-friendly:
# ungrouped convolutions). "alexnet_bn_small_bn_all" is the AlexNet twin with a batch norm
# before fc6..fc8 too (`normalization="batch_norm_all"`, not in the paper): every layer but
# the classifier scale-invariant, as in ResNet-20.
_ALEXNET_SMALL = ("--model=alexnet_bn_small", "--groups=1", "--dropout=0")
MODEL_FLAGS = {
    "alexnet_bn_small": _ALEXNET_SMALL,
    "alexnet_bn_small_bn_all": (*_ALEXNET_SMALL, "--normalization=batch_norm_all"),
    "resnet20_cifar": ("--model=resnet20_cifar",),
    "resnet32_cifar": ("--model=resnet32_cifar",),
}
# The environment of every run: TensorFlow's oneDNN kernels on, also where a CPU's default
# leaves them off (AMD EPYC); measured 1.5-2x the images/s of the twin's train step at batch
# 128 on this machine's two cores (docs/results/README.md, the claim protocol). A value
# already set in the environment wins.
RUN_ENVIRONMENT = {"TF_ENABLE_ONEDNN_OPTS": "1"}
# train.py's exit status when the loss diverged (any other failure is not a result).
EXIT_DIVERGED = 3
# CIFAR-10's chance top-1 is 0.10: a run at most 2 points above it learned nothing, and
# ranks with the diverged ones when the sweep picks its next rates (its "best" is noise).
NO_LEARNING_TOP1 = 0.12


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What one sweep runs.

    Attributes:
        name: Names the run directories and the report files.
        models: `lars_tf.models` names, swept in this order.
        epochs: The fixed epoch budget of every cell.
        baseline_batch: Batch of the SGD baseline.
        batches: Large batches, each with SGD + warm-up and LARS.
        baseline_lrs: Learning rates of the baseline.
        sgd_base_lrs: Rates per `baseline_batch` images; at batch B the run uses
            `rate * B / baseline_batch` (linear scaling).
        lars_base_lrs: LARS global rates at batch 1024; at batch B the run uses
            `rate * sqrt(B / 1024)` (the paper's AlexNet-BN rates grow about so: 10 at 4K,
            14 at 8K, 23 at 16K).
        warmup_epochs: Warm-up of the large-batch runs (the baseline has none).
        seeds: Seeds per configuration.
        repeat_seeds: Further seeds for the best rate of each large-batch cell, once that
            best is bracketed, to measure the seed-to-seed spread of the comparison.
        recalibration_images: Images (rounded up to whole batches) from which the batch-norm
            statistics are re-estimated before the evaluation.
        longer: Train-longer runs (Table 5 of the paper): multiples of the epoch budget.
        bn_ablation: Whether to run LARS at the batch nearest 4096 once more, evaluated with
            the moving-average statistics instead of re-estimated ones.
        largest_batch_methods: Further methods (`METHODS`) at the largest batch only, swept on
            SGD + warm-up's rates.
        repeat_baseline: Whether the baseline's best rate is repeated with `repeat_seeds` too,
            so that each cell's gap to the baseline has a standard error. Every gap is then
            measured against the baseline's best, so its climb and repeats run before the
            large-batch repeats.
        settled: (method, batch) cells left at the runs they have: no further climb, no
            repeats (a cut to fit a budget). The report marks them "settled", lists their
            missing runs as "not run" and gives their one run's gap to the baseline, without
            an error; a cell settled at one rate is not bracketed (its rate sweep shows it).
        fill_grid: Whether the rates further than one step from each cell's best run too,
            after everything else; False: the sweep ends once every cell's best is bracketed
            and repeated and the train-longer runs are done.
    """

    name: str
    models: tuple[str, ...]
    epochs: float
    baseline_batch: int
    batches: tuple[int, ...]
    baseline_lrs: tuple[float, ...]
    sgd_base_lrs: tuple[float, ...]
    lars_base_lrs: tuple[float, ...]
    warmup_epochs: float
    seeds: tuple[int, ...] = (1,)
    repeat_seeds: tuple[int, ...] = ()
    recalibration_images: int = 8192
    longer: tuple[float, ...] = (1.25, 1.5, 2.0)
    bn_ablation: bool = True
    largest_batch_methods: tuple[str, ...] = ()
    repeat_baseline: bool = False
    fill_grid: bool = True
    settled: tuple[tuple[str, int], ...] = ()


PROTOCOLS = {
    p.name: p
    for p in (
        Protocol(
            name="quick",
            models=("alexnet_bn_small", "resnet20_cifar"),
            epochs=3,
            baseline_batch=128,
            batches=(1024, 2048, 4096, 8192),
            # The grid grew after the first passes, where the best rate sat at an edge: 0.01
            # for SGD (its best was the smallest rate at every batch), 20 and 40 for LARS
            # (its best was the largest at 1K-4K); in the third session 0.005 for SGD (the
            # AlexNet twin's best at 2K and the ResNet's at 8K were at 0.01); in the fifth
            # 0.002 for SGD (both models' best at 8K was at 0.005, the smallest) and 0.2 for the
            # baseline (the ResNet's best was 0.1, the largest).
            baseline_lrs=(0.01, 0.02, 0.05, 0.1, 0.2),
            sgd_base_lrs=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
            lars_base_lrs=(2.5, 5.0, 10.0, 20.0, 40.0),
            warmup_epochs=1,
            repeat_seeds=(2, 3),
        ),
        # Is LARS's gain over SGD on the AlexNet twin, absent on ResNet-20, the gain on the
        # layers that feed no batch norm? The same cells with those layers batch-normed too,
        # at the batch where the twin's gap was largest and at the largest.
        Protocol(
            name="quick_bn_all",
            models=("alexnet_bn_small_bn_all",),
            epochs=3,
            baseline_batch=128,
            batches=(1024, 8192),
            # The baseline's best was its smallest rate, 0.01, then 0.002: the grid was extended
            # downwards twice.
            baseline_lrs=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
            # Batch norm before fc6..fc8 makes the gradients ~300x larger at initialisation
            # (||w|| / ||g|| 0.1-1.1 instead of 8-270); SGD's best sat at the grid's smallest
            # rate three times (at 8K), so the grid was extended downwards three times.
            sgd_base_lrs=(
                *(0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001),
                *(0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
            ),
            lars_base_lrs=(2.5, 5.0, 10.0, 20.0, 40.0),
            warmup_epochs=1,
            repeat_seeds=(2, 3),
            longer=(),
            bn_ablation=False,
        ),
        # The paper's claim itself (issue 20): at the same number of epochs, a budget at which
        # the baseline is near its plateau, does LARS at large batch reach the small-batch
        # baseline where SGD + linear scaling + warm-up falls behind? And does a tuned
        # Nesterov momentum at the largest batch match LARS (Nado et al. 2021)? The AlexNet
        # twin only; the climb brackets each cell's best, then three seeds everywhere, the
        # baseline included, so every gap to the baseline has a standard error. No far rates:
        # they would not fit the 12-hour budget (docs/results/README.md).
        Protocol(
            name="claim",
            models=("alexnet_bn_small",),
            epochs=15,
            baseline_batch=128,
            batches=(1024, 2048, 4096),
            baseline_lrs=(0.005, 0.01, 0.02, 0.05, 0.1),
            sgd_base_lrs=(0.0025, 0.005, 0.01, 0.02, 0.05, 0.1),
            lars_base_lrs=(5.0, 10.0, 20.0, 40.0, 80.0),
            warmup_epochs=2,
            repeat_seeds=(2, 3),
            longer=(1.5,),
            bn_ablation=False,
            largest_batch_methods=("nesterov",),
            repeat_baseline=True,
            fill_grid=False,
            # Cut in the tenth session: the runs took longer than planned (docs/results/
            # README.md), and the cells at 2K and 4K, the baseline and train longer fill
            # what is left of the 12 hours. 1K keeps its seed-1 climb. Cut again in the
            # twelfth: about 1.7 of the 12 hours were left for about 3.5 hours of runs; the
            # seeds at 4K (the largest batch, where the methods part) and 1.5x stay, 2K keeps
            # its bracketed seed-1 climb, and 2x is dropped.
            settled=(("sgd_warmup", 1024), ("lars", 1024), ("sgd_warmup", 2048), ("lars", 2048)),
        ),
        Protocol(
            name="full",
            models=("alexnet_bn_small", "resnet20_cifar"),
            epochs=20,
            baseline_batch=128,
            batches=(1024, 2048, 4096, 8192),
            baseline_lrs=(0.02, 0.05, 0.1, 0.2),
            sgd_base_lrs=(0.02, 0.05, 0.1, 0.2),
            lars_base_lrs=(2.5, 5.0, 10.0, 20.0),
            warmup_epochs=2,
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One `train.py` process. `part` is "scaling", "longer", "repeat" or "bn_ablation"; `lr` is the
    peak rate used; `recalibrate` whether the batch-norm statistics are re-estimated before
    the evaluation (else: the moving averages of training, momentum 0.9)."""

    part: str
    model: str
    method: str
    batch: int
    lr: float
    epochs: float
    warmup_epochs: float
    seed: int
    recalibrate: bool = True

    @property
    def name(self) -> str:
        return (
            f"{self.model}_{self.method}_b{self.batch}_lr{self.lr:g}_e{self.epochs:g}"
            f"_s{self.seed}" + ("" if self.recalibrate else "_movingstats")
        )

    def train_args(self, protocol: Protocol, model_dir: Path) -> list[str]:
        """Arguments of `train.py` for this run."""
        recalibration = max(1, math.ceil(protocol.recalibration_images / self.batch))
        if not self.recalibrate:
            recalibration = 0
        return [
            *METHOD_FLAGS[self.method],
            *MODEL_FLAGS.get(self.model, (f"--model={self.model}",)),
            f"--global_batch_size={self.batch}",
            f"--learning_rate={self.lr:g}",
            f"--epochs={self.epochs:g}",
            f"--warmup_epochs={self.warmup_epochs:g}",
            f"--seed={self.seed}",
            f"--bn_recalibration_batches={recalibration}",
            f"--model_dir={model_dir}",
        ]
