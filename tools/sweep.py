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

This file is the command line; the code is in `tools/sweeps/`: `protocols` (what a sweep
runs), `planning` (which runs, in which order), `runner` (running and resuming), `report`
(tables, CSV, logs) and `plots`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/sweeps, run as a script

# The pieces, in tools/sweeps/; the names tests and users reach through this module.
from sweeps.planning import (  # noqa: E402
    cell_lrs,
    cell_runs,
    cells,
    launch_order,
    next_to_best,
    scaling_runs,
)
from sweeps.plots import base_rate  # noqa: E402
from sweeps.protocols import (  # noqa: E402
    MODEL_FLAGS,
    PROTOCOLS,
    REPO_ROOT,
    RUN_ENVIRONMENT,
    Protocol,
    Run,
)
from sweeps.report import percent, write_report  # noqa: E402
from sweeps.runner import collect, prepare_data, sweep, train_py  # noqa: E402

__all__ = [
    "MODEL_FLAGS",
    "PROTOCOLS",
    "RUN_ENVIRONMENT",
    "Protocol",
    "Run",
    "base_rate",
    "cell_lrs",
    "cell_runs",
    "cells",
    "collect",
    "launch_order",
    "next_to_best",
    "percent",
    "prepare_data",
    "scaling_runs",
    "sweep",
    "train_py",
    "write_report",
]

FLAGS = flags.FLAGS

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
                top1 = "" if record is None else f" {percent(record['top1'])}"
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
