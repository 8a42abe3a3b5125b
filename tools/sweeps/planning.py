"""Which runs a protocol has, and in which order they launch: the climb to each cell's best
rate, the repeats with more seeds, the train-longer runs."""

from __future__ import annotations

import dataclasses
import math

from sweeps.protocols import LINEAR_SCALING, NO_LEARNING_TOP1, Protocol, Run


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
    they only fill in the sweep), the baseline's last (those runs are the slowest). With
    `repeat_baseline` the baseline's climb and repeats come right after the large-batch
    climbs instead: every gap is measured against the baseline's best. `settled` cells
    neither climb nor repeat.

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
        model_repeats = [r for r in repeats if r.model == model]
        baseline_repeats = [r for r in model_repeats if r.batch == protocol.baseline_batch]
        if protocol.repeat_baseline:  # every gap is measured against the baseline's best
            order += first + large_climb + baseline_climb + baseline_repeats + model_repeats
            order += [r for r in longer if r.model == model]
        else:
            order += first + large_climb + model_repeats
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
        if (method, batch) in protocol.settled:
            continue
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
            if (method, batch) in protocol.settled:
                continue
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
