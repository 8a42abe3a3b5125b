"""Running a sweep: one train.py process per run, its outcome read back, resumable from the
run directories or, where those are gone, from the committed `_runs.csv`."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from sweeps.planning import known_runs, launch_order
from sweeps.protocols import (
    EXIT_DIVERGED,
    REPO_ROOT,
    RUN_ENVIRONMENT,
    SHARED_CIFAR,
    Protocol,
    Run,
)
from sweeps.report import write_report


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
    them (the run's own fields from the protocol, the outcome from the row).

    A row counts only when every field of its run matches the protocol's run of that name
    (a name does not encode e.g. the warm-up). The other rows, of an older grid, would be
    dropped when the report is rewritten: they are kept in `cifar10_<protocol>_runs_other.csv`.
    """
    path = results_dir / f"cifar10_{protocol.name}_runs.csv"
    if not path.exists():
        return {}
    runs = {run.name: run for run in known_runs(protocol)}
    records, others = {}, []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        for row in reader:
            run = runs.get(row["name"])
            if run is None or not _row_is_run(row, run):
                others.append(row)
                continue
            if row["status"] not in ("done", "diverged"):
                continue  # not a result
            records[run.name] = {
                **dataclasses.asdict(run),
                "name": run.name,
                "status": row["status"],
                **{
                    k: float(row[k]) if row[k] else None for k in ("wall_s", "top1", "top5", "loss")
                },
                "step": int(row["step"]) if row["step"] else None,
            }
    if others:
        _keep_rows(results_dir / f"cifar10_{protocol.name}_runs_other.csv", fields, others)
    return records


def _row_is_run(row: dict, run: Run) -> bool:
    for field in dataclasses.fields(run):
        value, text = getattr(run, field.name), row.get(field.name, "")
        if isinstance(value, bool):
            same = text == str(value)
        elif isinstance(value, int | float):
            try:
                same = float(text) == float(value)
            except ValueError:
                same = False
        else:
            same = text == str(value)
        if not same:
            return False
    return True


def _keep_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Add `rows` to the CSV at `path`, once each (by every field)."""
    kept = []
    if path.exists():
        with open(path, newline="") as f:
            kept = list(csv.DictReader(f))
    seen = {tuple(sorted(r.items())) for r in kept}
    kept += [r for r in rows if tuple(sorted(r.items())) not in seen]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
