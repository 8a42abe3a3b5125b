#!/usr/bin/env python
"""The LARS paper's claims in small, on CIFAR-10: one resumable command, then its report.

    nohup nice -n 19 .venv/bin/python tools/sweep.py > data/sweep.log 2>&1 &
    .venv/bin/python tools/sweep.py --protocol=full      # both models, longer budget
    .venv/bin/python tools/sweep.py --list               # the runs and their state
    .venv/bin/python tools/sweep.py --report_only        # tables and plots of what ran

Each run is one `train.py` process (flag files `flags/cifar10_{sgd,sgd_warmup,lars}.cfg`;
Nesterov: `cifar10_sgd_warmup.cfg` with `--nesterov`; plus the run's model, batch, learning
rate, epochs, warm-up and seed) in its own directory under `--runs_dir`. A run is finished
when its `results.json` exists, or when `train.py` exited 3 (the loss diverged: recorded, not
retried); finished runs are never redone, and an interrupted run resumes from its checkpoint
when the sweep is started again.

Order, so that partial results are useful early: the middle learning rate of every cell
(method x batch) first; then the untried neighbours of each cell's best rate so far,
recomputed after every run; once a cell's best is bracketed, that rate again with the
`repeat_seeds`; the "train longer" runs once the largest batch's LARS best is bracketed
(they need that rate); then the rest of the grid. After every run the report is
rewritten in `--results_dir`: `cifar10_<protocol>.md` (the LR sweep, the best accuracy per
cell with its rate, the train-longer table, what is still missing), `cifar10_<protocol>_*.png`
(top-1 against batch, learning rate and epochs), a summary `cifar10_<protocol>_runs.csv`, and
each run's per-epoch `training_log.csv` under `logs/<protocol>/`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from absl import app, flags

REPO_ROOT = Path(__file__).resolve().parents[1]
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

FLAGS = flags.FLAGS


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
            so that each cell's gap to the baseline has a standard error.
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
            longer=(1.5, 2.0),
            bn_ablation=False,
            largest_batch_methods=("nesterov",),
            repeat_baseline=True,
            fill_grid=False,
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


def cell_lrs(protocol: Protocol, method: str, batch: int) -> list[float]:
    """The learning rates swept in one cell (peak rates, scaling applied)."""
    if method == "sgd":
        return list(protocol.baseline_lrs)
    if method in LINEAR_SCALING:
        return [round(r * batch / protocol.baseline_batch, 6) for r in protocol.sgd_base_lrs]
    return [float(f"{r * math.sqrt(batch / 1024):.3g}") for r in protocol.lars_base_lrs]


def cells(protocol: Protocol, model: str) -> list[tuple[str, int]]:
    """(method, batch) of every cell of one model: the baseline, then each large batch (the
    `largest_batch_methods` at the largest only)."""
    result = [("sgd", protocol.baseline_batch)]
    for batch in protocol.batches:
        extra = protocol.largest_batch_methods if batch == max(protocol.batches) else ()
        result += [(method, batch) for method in ("sgd_warmup", "lars", *extra)]
    return result


def scaling_runs(protocol: Protocol) -> list[Run]:
    """The batch-scaling runs in launch order (see `_scaling_groups`)."""
    runs = []
    for model in protocol.models:
        first, rest, baseline_rest = _scaling_groups(protocol, model)
        runs += first + rest + baseline_rest
    return runs


def _scaling_groups(protocol: Protocol, model: str) -> tuple[list[Run], list[Run], list[Run]]:
    """The batch-scaling runs of one model in three groups, each in launch order.

    First the middle rate of every cell: the baseline, then the largest batch down (the cells
    the paper is about), with the batch-norm ablation (LARS at the batch nearest 4096, its
    middle rate, evaluated with the moving-average statistics) right after its twin; then the
    other rates in the same order, the baseline's last (the slowest runs: small batches use
    a CPU least well).
    """
    ablation_batch = min(protocol.batches, key=lambda b: abs(b - 4096))
    first, rest, baseline_rest = [], [], []
    for seed in protocol.seeds:
        baseline, *large = cells(protocol, model)
        for method, batch in [baseline, *sorted(large, key=lambda c: -c[1])]:
            lrs = cell_lrs(protocol, method, batch)
            middle = len(lrs) // 2
            warmup = 0.0 if method == "sgd" else protocol.warmup_epochs
            for index, lr in enumerate(lrs):
                run = Run("scaling", model, method, batch, lr, protocol.epochs, warmup, seed)
                if index != middle:
                    (baseline_rest if method == "sgd" else rest).append(run)
                    continue
                first.append(run)
                ablate = (method, batch, seed) == ("lars", ablation_batch, protocol.seeds[0])
                if ablate and protocol.bn_ablation:
                    ablation = dataclasses.replace(run, part="bn_ablation", recalibrate=False)
                    first.append(ablation)
    return first, rest, baseline_rest


def launch_order(protocol: Protocol, records: dict[str, dict]) -> list[Run]:
    """Every run known so far in launch order, one model after the other (a model's results
    are complete before the next one starts): the middle rates of all its cells, the untried
    neighbours of each large-batch cell's best rate so far (`next_to_best`), the repeats of
    bracketed best rates with other seeds (`repeat_runs`: the LARS - SGD comparison rests on
    them), the train-longer runs (as soon as the largest batch's LARS best is bracketed: they
    are planned from it), the baseline's neighbours, the other rates (far from every best,
    they only fill in the sweep), the baseline's last (those runs are the slowest).

    The order is recomputed after every run, so the neighbours step climb towards each cell's
    best rate: a sweep stopped early has bracketed the best of as many cells as it could,
    rather than filled the grid in a fixed order.
    """
    order = []
    longer = longer_runs(protocol, records)
    repeats = repeat_runs(protocol, records)
    for model in protocol.models:
        first, rest, baseline_rest = _scaling_groups(protocol, model)
        large_climb, baseline_climb = [], []
        for run in next_to_best(protocol, model, records):
            is_baseline = run.batch == protocol.baseline_batch
            (baseline_climb if is_baseline else large_climb).append(run)
        order += first + large_climb + [r for r in repeats if r.model == model]
        order += [r for r in longer if r.model == model] + baseline_climb
        if protocol.fill_grid:
            order += rest + baseline_rest
    unique = {}
    for run in order:
        unique.setdefault(run.name, run)
    return list(unique.values())


def next_to_best(protocol: Protocol, model: str, records: dict[str, dict]) -> list[Run]:
    """Untried rates next to the best finished rate of each cell that has one (`climb`),
    largest batch first, the baseline last."""
    runs = []
    baseline, *large = cells(protocol, model)
    for method, batch in [*sorted(large, key=lambda c: -c[1]), baseline]:
        for seed in protocol.seeds:
            runs += climb(cell_runs(protocol, model, method, batch, seed), records)[1]
    return runs


def climb(cell: list[Run], records: dict[str, dict]) -> tuple[Run | None, list[Run]]:
    """One cell's best finished run (None while none learned) and the untried rates to run
    next: both neighbours of the best. In a cell where every finished run failed (diverged,
    or learned nothing: top-1 <= NO_LEARNING_TOP1, where the "best" would be noise) the next
    rate is the one below the smallest tried. `cell` is sorted by rate. The best is
    bracketed when nothing is left to run next."""
    tried = [i for i, r in enumerate(cell) if r.name in records]
    learned = [i for i in tried if not _failed(records[cell[i].name])]
    if learned:
        best = max(learned, key=lambda i: records[cell[i].name]["top1"])
        candidates = (best - 1, best + 1)
    elif tried:
        best, candidates = None, (min(tried) - 1,)
    else:
        best, candidates = None, ()
    untried = [cell[i] for i in candidates if 0 <= i < len(cell) and i not in tried]
    return (cell[best] if best is not None else None), untried


def _failed(record: dict) -> bool:
    return record["top1"] is None or record["top1"] <= NO_LEARNING_TOP1


def cell_runs(protocol: Protocol, model: str, method: str, batch: int, seed: int) -> list[Run]:
    """The batch-scaling runs of one cell and seed, by rate."""
    return sorted(
        (
            r
            for r in scaling_runs(protocol)
            if r.part == "scaling"
            and (r.model, r.method, r.batch, r.seed) == (model, method, batch, seed)
        ),
        key=lambda r: r.lr,
    )


def repeat_runs(protocol: Protocol, records: dict[str, dict]) -> list[Run]:
    """The best rate of each large-batch cell again with `repeat_seeds`, once that best is
    bracketed (`climb` has nothing left to try in the cell: both neighbouring rates ran, or
    it sits at the grid's edge), largest batch first, the baseline last (with
    `repeat_baseline`). The rest of the grid, further from the
    best, runs after the repeats; should one of those runs beat the best, its rate is
    repeated too. Cells where every run failed get none."""
    runs = []
    for model in protocol.models:
        baseline, *large = cells(protocol, model)
        repeated = sorted(large, key=lambda c: -c[1]) + [baseline] * protocol.repeat_baseline
        for method, batch in repeated:
            best, untried = climb(
                cell_runs(protocol, model, method, batch, protocol.seeds[0]), records
            )
            if best is None or untried:
                continue
            runs += [
                dataclasses.replace(best, part="repeat", seed=s) for s in protocol.repeat_seeds
            ]
    return runs


def longer_runs(protocol: Protocol, records: dict[str, dict]) -> list[Run]:
    """Train-longer runs (LARS, largest batch, best rate of the 1x cell), once that cell's best
    is bracketed (see `repeat_runs`); none before."""
    runs = []
    batch = max(protocol.batches)
    for model in protocol.models:
        for seed in protocol.seeds:
            best, untried = climb(cell_runs(protocol, model, "lars", batch, seed), records)
            if best is None or untried:
                continue
            for factor in protocol.longer:
                epochs = protocol.epochs * factor
                warmup = protocol.warmup_epochs
                runs.append(Run("longer", model, "lars", batch, best.lr, epochs, warmup, seed))
    return runs


# Running.


def prepare_data(data_dir: Path) -> None:
    """Extract CIFAR-10 from the shared tarball into `data_dir` unless it is there."""
    if (data_dir / "train").is_dir() and (data_dir / "test").is_dir():
        return
    if not SHARED_CIFAR.is_file():
        raise FileNotFoundError(f"no CIFAR-10 at {data_dir} and no tarball at {SHARED_CIFAR}")
    data_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(SHARED_CIFAR) as tar:
        tar.extractall(data_dir, filter="data")


def read_record(run: Run, model_dir: Path) -> dict | None:
    """The outcome of a finished run, or None when it has not finished."""
    status_file = model_dir / "sweep_status.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {}
    record = {**dataclasses.asdict(run), "name": run.name, "wall_s": status.get("wall_s")}
    results = model_dir / "results.json"
    if results.exists():
        values = json.loads(results.read_text())
        return {
            **record,
            "status": "done",
            **{k: values.get(k) for k in ("top1", "top5", "loss", "step")},
        }
    if status.get("returncode") == EXIT_DIVERGED:
        return {
            **record,
            "status": "diverged",
            "top1": None,
            "top5": None,
            "loss": None,
            "step": None,
        }
    return None


def train_py(run: Run, protocol: Protocol, model_dir: Path, data_dir: Path) -> int:
    """Runs `train.py` for `run`; returns its exit status. Output goes to `train.log`."""
    args = run.train_args(protocol, model_dir) + [f"--data_dir={data_dir}"]
    model_dir.mkdir(parents=True, exist_ok=True)
    with open(model_dir / "train.log", "a") as log:
        return subprocess.call(
            [sys.executable, str(REPO_ROOT / "train.py"), *args],
            cwd=REPO_ROOT,
            env={**RUN_ENVIRONMENT, **os.environ},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def sweep(
    protocol: Protocol,
    runs_dir: Path,
    results_dir: Path,
    execute: Callable[[Run, Path], int],
    max_runs: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Runs what is not finished, rewriting the report after each run.

    Args:
        protocol: The sweep.
        runs_dir: Parent of the run directories (`<runs_dir>/<protocol>/<run name>`).
        results_dir: Where the report goes.
        execute: Runs one configuration in a directory, returns the exit status.
        max_runs: Stop after launching this many runs (None: all).
        log: Progress lines.

    Returns:
        The records of every finished run, by run name.
    """
    base = runs_dir / protocol.name
    records = collect(protocol, base, results_dir)
    write_report(protocol, records, base, results_dir)
    launched = 0
    while max_runs is None or launched < max_runs:
        pending = [r for r in launch_order(protocol, records) if r.name not in records]
        if not pending:
            break
        run = pending[0]
        model_dir = base / run.name
        log(f"[{time.strftime('%H:%M:%S')}] {run.name}: starting ({len(pending)} pending)")
        start = time.time()
        code = execute(run, model_dir)
        wall = time.time() - start
        model_dir.mkdir(parents=True, exist_ok=True)
        previous = model_dir / "sweep_status.json"
        spent = json.loads(previous.read_text()).get("wall_s", 0.0) if previous.exists() else 0.0
        previous.write_text(json.dumps({"returncode": code, "wall_s": spent + wall}))
        launched += 1
        record = read_record(run, model_dir)
        if record is None:
            # Crashed or killed: not a result. Stop, so that a broken setup does not burn
            # through the whole grid; rerunning resumes this run from its checkpoint.
            log(f"{run.name}: train.py exited {code} without results; see {model_dir}/train.log")
            write_report(protocol, records, base, results_dir)
            raise SystemExit(f"run {run.name} failed (exit status {code})")
        records[run.name] = record
        top1 = "diverged" if record["top1"] is None else f"top-1 {100 * record['top1']:.2f}%"
        log(f"[{time.strftime('%H:%M:%S')}] {run.name}: {top1} in {wall:.0f} s")
        write_report(protocol, records, base, results_dir)
    return records


def known_runs(protocol: Protocol) -> list[Run]:
    """Every run the protocol can ever launch: each scaling run, and the repeats and
    train-longer runs of every rate (not only of today's best: after the grid grows, a
    cell's best is not bracketed until its new neighbour ran, and its earlier repeats must
    still count as done)."""
    runs = []
    for run in scaling_runs(protocol):
        runs.append(run)
        if run.part == "scaling":
            runs += [dataclasses.replace(run, part="repeat", seed=s) for s in protocol.repeat_seeds]
        if run.part == "scaling" and run.method == "lars" and run.batch == max(protocol.batches):
            runs += [
                dataclasses.replace(run, part="longer", epochs=protocol.epochs * factor)
                for factor in protocol.longer
            ]
    return runs


def collect(protocol: Protocol, base: Path, results_dir: Path | None = None) -> dict[str, dict]:
    """Records of the finished runs: those found under `base`, and, with `results_dir`,
    those in the report's `_runs.csv` whose run directory is gone.

    The CSV is what a session commits; the run directories are not (checkpoints are too
    large), so a fresh checkout resumes a sweep from the CSV instead of running its
    finished runs again. A run on disk wins over its row.
    """
    reported = _reported_records(protocol, results_dir) if results_dir is not None else {}
    records = {}
    for run in known_runs(protocol):
        record = read_record(run, base / run.name) or reported.get(run.name)
        if record is not None:
            records[run.name] = record
    return records


def _reported_records(protocol: Protocol, results_dir: Path) -> dict[str, dict]:
    """The finished runs listed in `cifar10_<protocol>_runs.csv`, as `read_record` gives
    them (the run's own fields from the protocol, the outcome from the row)."""
    path = results_dir / f"cifar10_{protocol.name}_runs.csv"
    if not path.exists():
        return {}
    runs = {run.name: run for run in known_runs(protocol)}
    records = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            run = runs.get(row["name"])
            if run is None or row["status"] not in ("done", "diverged"):
                continue  # a run of an older grid, or not a result
            records[run.name] = {
                **dataclasses.asdict(run),
                "name": run.name,
                "status": row["status"],
                **{
                    k: float(row[k]) if row[k] else None for k in ("wall_s", "top1", "top5", "loss")
                },
                "step": int(row["step"]) if row["step"] else None,
            }
    return records


# Report.


def _percent(value: float | None) -> str:
    return "diverged" if value is None else f"{100 * value:.2f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _by_config(records: dict[str, dict]) -> dict[tuple, dict]:
    return {
        (r["part"], r["model"], r["method"], r["batch"], r["lr"], r["epochs"], r["seed"]): r
        for r in records.values()
    }


def best_per_cell(protocol: Protocol, records: dict[str, dict]) -> list[dict]:
    """For every (model, method, batch): the best finished run over rates and seeds."""
    rows = []
    for model in protocol.models:
        for method, batch in cells(protocol, model):
            planned = [
                r
                for seed in protocol.seeds
                for r in cell_runs(protocol, model, method, batch, seed)
            ]
            done = [records[r.name] for r in planned if r.name in records]
            scored = [d for d in done if d["top1"] is not None]
            best = max(scored, key=lambda d: d["top1"]) if scored else None
            rows.append(
                dict(
                    model=model,
                    method=method,
                    batch=batch,
                    best=best,
                    done=len(done),
                    planned=len(planned),
                    diverged=len(done) - len(scored),
                )
            )
    return rows


def write_report(
    protocol: Protocol, records: dict[str, dict], base: Path, results_dir: Path
) -> Path:
    """Writes the Markdown tables, the CSV summary, the per-run logs and the plots."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"cifar10_{protocol.name}"
    logs_dir = results_dir / "logs" / protocol.name
    for name in records:
        source = base / name / "training_log.csv"
        if source.exists():
            logs_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, logs_dir / f"{name}.csv")
    fields = [
        "name", "part", "model", "method", "batch", "lr", "epochs", "warmup_epochs", "seed",
        "recalibrate", "status", "top1", "top5", "loss", "step", "wall_s",
    ]  # fmt: skip
    with open(results_dir / f"{stem}_runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for record in sorted(records.values(), key=lambda r: (r["part"], r["model"], r["name"])):
            writer.writerow(record)

    planned = [r for r in scaling_runs(protocol) if r.part == "scaling"]
    longer_planned = len(protocol.models) * len(protocol.seeds) * len(protocol.longer)
    finished = sum(r["part"] == "scaling" for r in records.values())
    # Those at today's best rate: runs at an earlier best stay on disk and in the CSV.
    finished_longer = sum(r.name in records for r in longer_runs(protocol, records))
    if protocol.fill_grid:
        counts = f"{finished} of {len(planned)} batch-scaling runs"
        complete = finished == len(planned) and finished_longer == longer_planned
    else:
        counts = (
            f"{finished} batch-scaling runs (the climb to each cell's best rate, of a grid of "
            f"{len(planned)})"
        )
        complete = all(r.name in records for r in launch_order(protocol, records))
    if protocol.longer:
        counts += f" and {finished_longer} of {longer_planned} train-longer runs"
    lines = [
        f"# CIFAR-10 batch scaling, protocol `{protocol.name}` (generated by tools/sweep.py)",
        "",
        f"Runs finished: {counts}"
        + ("." if complete else " (**partial**: cells marked `not run` have no measurement yet)."),
        "",
        f"Models {', '.join(protocol.models)}; {protocol.epochs:g} epochs per run; baseline "
        f"batch {protocol.baseline_batch}; warm-up {protocol.warmup_epochs:g} epoch(s) for "
        f"batches {', '.join(str(b) for b in protocol.batches)}; seeds "
        f"{', '.join(str(s) for s in protocol.seeds)}; batch-norm statistics re-estimated from "
        f"~{protocol.recalibration_images} training images before evaluation. Top-1 in % on "
        "the 10,000 test images, one evaluation at the end of each run.",
        "",
        "## Best top-1 per cell (and the learning rate that gave it)",
        "",
    ]
    best_rows = best_per_cell(protocol, records)
    lines += _table(
        ["model", "method", "batch", "best top-1", "LR", "runs done / planned"],
        (
            [
                b["model"],
                METHOD_TITLES[b["method"]],
                b["batch"],
                "not run" if not b["done"] else _percent(b["best"]["top1"] if b["best"] else None),
                f"{b['best']['lr']:g}" if b["best"] else "-",
                f"{b['done']} / {b['planned']}"
                + (f" ({b['diverged']} diverged)" if b["diverged"] else ""),
            ]
            for b in best_rows
        ),
    )
    lines += ["", "## Learning-rate sweep (top-1 per rate)", ""]
    for model in protocol.models:
        for method, batch in cells(protocol, model):
            entries = []
            for run in cell_runs(protocol, model, method, batch, protocol.seeds[0]):
                record = records.get(run.name)
                entries.append(
                    f"LR {run.lr:g}: " + ("not run" if record is None else _percent(record["top1"]))
                )
            lines.append(
                f"- {model}, {METHOD_TITLES[method]}, batch {batch}: " + "; ".join(entries)
            )
    stats = seed_stats(protocol, records, best_rows)
    if protocol.repeat_baseline:
        lines += _baseline_gap_section(protocol, records, stats)
    if protocol.repeat_seeds:
        lines += _seed_section(protocol, stats)
    if protocol.longer:
        lines += _longer_section(protocol, records, best_rows)
    if protocol.bn_ablation:
        lines += _bn_ablation_section(protocol, records)
    plots = plot(protocol, records, best_rows, results_dir, stem, stats)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += [
        "",
        f"Raw per-epoch logs: `logs/{protocol.name}/<run>.csv` (train.py's CSV log); every "
        f"run's outcome: `{stem}_runs.csv`.",
        "",
    ]
    page = results_dir / f"{stem}.md"
    page.write_text("\n".join(lines))
    return page


def _longer_section(
    protocol: Protocol, records: dict[str, dict], best_rows: list[dict]
) -> list[str]:
    """The train-longer table: per model, the largest batch's LARS best and its longer runs."""
    lines = ["", "## Train longer (LARS, largest batch, best LR of the fixed budget)", ""]
    batch = max(protocol.batches)
    # The runs planned at today's best rate; those at an earlier best stay in the CSV only.
    first_seed = [r for r in longer_runs(protocol, records) if r.seed == protocol.seeds[0]]
    planned = {(r.model, r.epochs): r for r in first_seed}
    longer_rows = []
    for model in protocol.models:
        base_cell = next(
            b for b in best_rows if (b["model"], b["method"], b["batch"]) == (model, "lars", batch)
        )
        row = [
            model,
            batch,
            "not run" if base_cell["best"] is None else _percent(base_cell["best"]["top1"]),
        ]
        for factor in protocol.longer:
            run = planned.get((model, protocol.epochs * factor))
            done = run is not None and run.name in records
            row.append(_percent(records[run.name]["top1"]) if done else "not run")
        longer_rows.append(row)
    return lines + _table(
        [
            "model",
            "batch",
            *[f"{protocol.epochs * f:g} epochs ({f:g}x)" for f in (1.0, *protocol.longer)],
        ],
        longer_rows,
    )


def _bn_ablation_section(protocol: Protocol, records: dict[str, dict]) -> list[str]:
    """The batch-norm statistics table: re-estimated against moving averages."""
    lines = [
        "",
        "## Batch-norm statistics at evaluation: re-estimated vs moving averages",
        "",
        "The same configuration evaluated with statistics re-estimated from training batches "
        "(every other run here) and with the moving averages of training (momentum 0.9):",
        "",
    ]
    ablation_rows = []
    for run in (r for r in scaling_runs(protocol) if r.part == "bn_ablation"):
        twin = dataclasses.replace(run, part="scaling", recalibrate=True)
        ablation_rows.append(
            [
                run.model,
                METHOD_TITLES[run.method],
                run.batch,
                f"{run.lr:g}",
                _percent(records[twin.name]["top1"]) if twin.name in records else "not run",
                _percent(records[run.name]["top1"]) if run.name in records else "not run",
            ]
        )
    return lines + _table(
        ["model", "method", "batch", "LR", "top-1, re-estimated", "top-1, moving averages"],
        ablation_rows,
    )


def seed_stats(
    protocol: Protocol, records: dict[str, dict], best_rows: list[dict]
) -> dict[tuple[str, str, int], dict]:
    """Per (model, method, batch) with a best rate: that rate's top-1 at every seed (the
    sweep's seed, then `repeat_seeds`; "not run" where missing, None where diverged) and, once
    two or more seeds finished and none diverged, their mean and sample standard deviation
    in % (else None)."""
    seeds = (protocol.seeds[0], *protocol.repeat_seeds)
    stats = {}
    for cell in best_rows:
        if cell["best"] is None:
            continue
        best = Run(**{f.name: cell["best"][f.name] for f in dataclasses.fields(Run)})
        values = []
        for seed in seeds:
            part = "scaling" if seed == seeds[0] else "repeat"
            run = dataclasses.replace(best, part=part, seed=seed)
            values.append(records[run.name]["top1"] if run.name in records else "not run")
        done = [v for v in values if v != "not run"]
        mean = sd = None
        if len(done) > 1 and None not in done:
            mean, sd = 100 * statistics.mean(done), 100 * statistics.stdev(done)
        stats[cell["model"], cell["method"], cell["batch"]] = dict(
            lr=best.lr, values=values, n=len(done), mean=mean, sd=sd, step=cell["best"]["step"]
        )
    return stats


def _per_seed(values: list) -> str:
    return " / ".join(v if v == "not run" else _percent(v) for v in values)


def _difference(a: dict, b: dict) -> str:
    """a's mean minus b's ± the standard error of a difference of two independent means."""
    error = math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])
    return f"{a['mean'] - b['mean']:+.2f} ± {error:.2f}"


def _seed_section(protocol: Protocol, stats: dict[tuple[str, str, int], dict]) -> list[str]:
    """The repeats table: per model and large batch, each method's best rate over all seeds."""
    lines = [
        "",
        "## Seeds: each large-batch cell's best rate repeated",
        "",
        f"The best rate of each cell (seed {protocol.seeds[0]}, the sweep above) run again with "
        f"seeds {', '.join(str(s) for s in protocol.repeat_seeds)}. Top-1 per seed, mean and "
        "sample standard deviation; the last column is LARS's mean minus SGD's, with the "
        "standard error of that difference, sqrt(sd_LARS² / n + sd_SGD² / n): a difference of "
        "less than about two standard errors cannot be told from seed-to-seed noise.",
        "",
    ]
    rows = []
    for model in protocol.models:
        for batch in protocol.batches:
            row = [model, batch]
            for method in ("sgd_warmup", "lars"):
                cell = stats.get((model, method, batch))
                if cell is None:
                    row += ["-", "not run", "-"]
                    continue
                mean = "-" if cell["mean"] is None else f"{cell['mean']:.2f} ± {cell['sd']:.2f}"
                row += [f"{cell['lr']:g}", _per_seed(cell["values"]), mean]
            lars, sgd = stats.get((model, "lars", batch)), stats.get((model, "sgd_warmup", batch))
            measured = lars and sgd and lars["mean"] is not None and sgd["mean"] is not None
            row.append(_difference(lars, sgd) if measured else "-")
            rows.append(row)
    headers = ["model", "batch"]
    for title in ("SGD + warm-up", "LARS"):
        headers += [f"{title}: LR", f"{title}: top-1 per seed", f"{title}: mean ± sd"]
    return lines + _table([*headers, "LARS - SGD ± standard error"], rows)


def _baseline_gap_section(
    protocol: Protocol, records: dict[str, dict], stats: dict[tuple[str, str, int], dict]
) -> list[str]:
    """The claim's table: every cell's best rate over all seeds against the baseline's."""
    lines = [
        "",
        "## Against the small-batch baseline: each cell's best rate over all seeds",
        "",
        f"Every cell's best rate (seed {protocol.seeds[0]}) run again with seeds "
        f"{', '.join(str(s) for s in protocol.repeat_seeds)}, the baseline's too. Top-1 per "
        "seed, mean and sample standard deviation, and the cell's mean minus the baseline's "
        f"(batch {protocol.baseline_batch}) with the standard error of that difference, "
        "sqrt(sd² / n + sd_base² / n_base): the paper's claim is a gap of about zero at the "
        "same number of epochs.",
        "",
    ]
    rows = []
    for model in protocol.models:
        baseline = stats.get((model, "sgd", protocol.baseline_batch))
        for method, batch in cells(protocol, model):
            cell = stats.get((model, method, batch))
            row = [model, METHOD_TITLES[method], batch]
            if cell is None:
                rows.append(row + ["-", "-", "not run", "-", "-"])
                continue
            measured = cell["mean"] is not None and baseline and baseline["mean"] is not None
            gap = _difference(cell, baseline) if measured and method != "sgd" else "-"
            mean = "-" if cell["mean"] is None else f"{cell['mean']:.2f} ± {cell['sd']:.2f}"
            updates = "-" if cell["step"] is None else f"{cell['step']:,}"
            rows.append(row + [updates, f"{cell['lr']:g}", _per_seed(cell["values"]), mean, gap])
    headers = ["model", "method", "batch", "updates", "LR", "top-1 per seed", "mean ± sd"]
    return lines + _table([*headers, "gap to baseline ± standard error"], rows)


def plot(
    protocol: Protocol,
    records: dict[str, dict],
    best_rows: list[dict],
    results_dir: Path,
    stem: str,
    stats: dict[tuple[str, str, int], dict] | None = None,
) -> list[Path]:
    """Top-1 against batch per method and model, against the learning rate per cell, against
    the epoch budget. With `stats` (`seed_stats`) and `repeat_baseline`, the batch plot shows
    the mean over seeds with error bars. Returns the files written (none without
    measurements)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figures = [
        ("accuracy_vs_batch", _plot_vs_batch(plt, protocol, best_rows, stats)),
        ("accuracy_vs_lr", _plot_vs_lr(plt, protocol, records)),
        ("accuracy_vs_epochs", _plot_vs_epochs(plt, protocol, records, best_rows)),
    ]
    written = []
    for name, figure in figures:
        if figure is None:
            continue
        figure.tight_layout()
        path = results_dir / f"{stem}_{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def _plot_vs_batch(plt, protocol: Protocol, best_rows: list[dict], stats=None):
    """Best top-1 (seed 1) per cell; with `stats` and `repeat_baseline`, the mean over the
    seeds with ± 1 sd error bars where two or more seeds finished (else seed 1, no bar)."""
    measured = [b for b in best_rows if b["best"] is not None]
    if not measured:
        return None
    seeded = bool(stats) and protocol.repeat_baseline
    figure, axes = plt.subplots(
        1, len(protocol.models), figsize=(5 * len(protocol.models), 4), squeeze=False
    )
    markers = {"sgd_warmup": "s", "lars": "o", "nesterov": "^"}
    for axis, model in zip(axes[0], protocol.models, strict=True):
        point = {}
        for b in measured:
            if b["model"] != model:
                continue
            cell = stats.get((model, b["method"], b["batch"])) if seeded else None
            if cell is not None and cell["mean"] is not None:
                point[b["method"], b["batch"]] = (cell["mean"], cell["sd"])
            else:
                point[b["method"], b["batch"]] = (100 * b["best"]["top1"], 0.0)
        for method in ("sgd_warmup", "lars", *protocol.largest_batch_methods):
            xs = sorted(batch for m, batch in point if m == method)
            if xs:
                axis.errorbar(
                    xs,
                    [point[method, x][0] for x in xs],
                    yerr=[point[method, x][1] for x in xs] if seeded else None,
                    marker=markers.get(method, "D"),
                    capsize=3,
                    label=METHOD_TITLES[method],
                )
        baseline = point.get(("sgd", protocol.baseline_batch))
        if baseline:
            axis.axhline(
                baseline[0],
                color="gray",
                linestyle="--",
                label=f"SGD, batch {protocol.baseline_batch}",
            )
            if seeded and baseline[1]:
                axis.axhspan(
                    baseline[0] - baseline[1], baseline[0] + baseline[1], color="gray", alpha=0.2
                )
        axis.set_xscale("log", base=2)
        axis.set_xlabel("batch size")
        axis.set_ylabel(
            "test top-1 (%), best LR: mean ± sd over seeds" if seeded else "test top-1 (%), best LR"
        )
        axis.set_title(f"{model}, {protocol.epochs:g} epochs")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # a model with no finished run yet has none
            axis.legend(fontsize=8)
    return figure


def base_rate(protocol: Protocol, method: str, batch: int, lr: float) -> float:
    """The grid's rate before scaling: per `baseline_batch` images for SGD, at batch 1024
    for LARS (see `Protocol`), so that every batch of a method shares one axis."""
    if method == "lars":
        return lr / math.sqrt(batch / 1024)
    if method in LINEAR_SCALING:
        return lr * protocol.baseline_batch / batch
    return lr


def _plot_vs_lr(plt, protocol: Protocol, records: dict[str, dict]):
    """One panel per model and method: top-1 against the base rate, a line per batch;
    diverged runs drawn as crosses on the x axis."""
    scaling = [r for r in records.values() if r["part"] == "scaling"]
    if not scaling:
        return None
    panels = [("sgd_warmup", "SGD + linear scaling + warm-up (batch 128: baseline)"), ("lars", "")]
    panels += [(method, "") for method in protocol.largest_batch_methods]
    figure, axes = plt.subplots(
        len(protocol.models),
        len(panels),
        figsize=(5 * len(panels), 3.6 * len(protocol.models)),
        squeeze=False,
        sharey=True,
    )
    batches = [protocol.baseline_batch, *protocol.batches]
    palette = plt.get_cmap("viridis")
    colors = {b: palette(i / max(1, len(batches) - 1)) for i, b in enumerate(batches)}
    for row, model in zip(axes, protocol.models, strict=True):
        for axis, (method, title) in zip(row, panels, strict=True):
            methods = ("sgd", method) if method == "sgd_warmup" else (method,)
            for batch in batches:
                runs = sorted(
                    (
                        r
                        for r in scaling
                        if r["model"] == model and r["method"] in methods and r["batch"] == batch
                    ),
                    key=lambda r: r["lr"],
                )
                done = [r for r in runs if r["top1"] is not None]
                x = [base_rate(protocol, r["method"], batch, r["lr"]) for r in done]
                if done:
                    axis.plot(
                        x,
                        [100 * r["top1"] for r in done],
                        marker="o",
                        color=colors[batch],
                        label=f"batch {batch}",
                    )
                diverged = [
                    base_rate(protocol, r["method"], batch, r["lr"])
                    for r in runs
                    if r["top1"] is None
                ]
                if diverged:
                    axis.plot(diverged, [0] * len(diverged), "x", color=colors[batch], ms=9)
            axis.set_xscale("log")
            grid = protocol.lars_base_lrs if method == "lars" else protocol.sgd_base_lrs
            if method == "sgd_warmup":
                grid = sorted({*grid, *protocol.baseline_lrs})
            axis.set_xticks(grid, labels=[f"{r:g}" for r in grid])
            axis.minorticks_off()
            axis.set_xlim(min(grid) / 1.25, max(grid) * 1.25)
            axis.set_xlabel(
                "rate at batch 1024 (LR / sqrt(batch / 1024))"
                if method == "lars"
                else "rate per 128 images (LR x 128 / batch)"
            )
            axis.set_ylabel("test top-1 (%)")
            axis.set_title(f"{model}: {title or METHOD_TITLES[method]}", fontsize=9)
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7, title="x on the axis: diverged", title_fontsize=7)
    return figure


def _plot_vs_epochs(plt, protocol: Protocol, records: dict[str, dict], best_rows: list[dict]):
    # The runs at today's best rate; those at an earlier best stay in the CSV only.
    longer = [
        r
        for r in longer_runs(protocol, records)
        if r.name in records and records[r.name]["top1"] is not None
    ]
    if not longer:
        return None
    measured = [b for b in best_rows if b["best"] is not None]
    figure, axis = plt.subplots(figsize=(5, 4))
    batch = max(protocol.batches)
    for model in protocol.models:
        cell = next(
            (
                b
                for b in measured
                if (b["model"], b["method"], b["batch"]) == (model, "lars", batch)
            ),
            None,
        )
        if cell is None:
            continue
        points = [(r.epochs, 100 * records[r.name]["top1"]) for r in longer if r.model == model]
        points.append((protocol.epochs, 100 * cell["best"]["top1"]))
        axis.plot(*zip(*sorted(points), strict=True), marker="o", label=model)
        baseline = next((b for b in measured if (b["model"], b["method"]) == (model, "sgd")), None)
        if baseline is not None:
            axis.axhline(
                100 * baseline["best"]["top1"],
                color="gray",
                linestyle="--",
                label=f"{model}: SGD, batch {protocol.baseline_batch}, {protocol.epochs:g} epochs",
            )
    axis.set_xlabel("epochs")
    axis.set_ylabel("test top-1 (%)")
    axis.set_title(f"LARS, batch {batch}: longer training")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure


# Command line.

flags.DEFINE_enum("protocol", "quick", sorted(PROTOCOLS), "Which sweep (see PROTOCOLS).")
flags.DEFINE_string("runs_dir", str(REPO_ROOT / "runs" / "sweep"), "Parent of run directories.")
flags.DEFINE_string("results_dir", str(REPO_ROOT / "docs" / "results"), "Report directory.")
flags.DEFINE_string("data_dir", str(REPO_ROOT / "data" / "cifar10"), "CIFAR-10 JPEG folders.")
flags.DEFINE_integer("max_runs", None, "Stop after launching this many runs.", lower_bound=1)
flags.DEFINE_bool("list", False, "List the runs with their state and exit.")
flags.DEFINE_bool("report_only", False, "Rewrite the report from finished runs and exit.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    protocol = PROTOCOLS[FLAGS.protocol]
    runs_dir, results_dir = Path(FLAGS.runs_dir), Path(FLAGS.results_dir)
    base = runs_dir / protocol.name
    if FLAGS.list or FLAGS.report_only:
        records = collect(protocol, base, results_dir)
        if FLAGS.list:
            for run in launch_order(protocol, records):
                record = records.get(run.name)
                state = "pending" if record is None else record["status"]
                top1 = "" if record is None else f" {_percent(record['top1'])}"
                print(f"{run.name}: {state}{top1}")
        if FLAGS.report_only:
            print(write_report(protocol, records, base, results_dir))
        return
    data_dir = Path(FLAGS.data_dir)
    prepare_data(data_dir)
    sweep(
        protocol,
        runs_dir,
        results_dir,
        lambda run, model_dir: train_py(run, protocol, model_dir, data_dir),
        max_runs=FLAGS.max_runs,
        log=lambda line: print(line, flush=True),
    )


if __name__ == "__main__":
    app.run(main)
