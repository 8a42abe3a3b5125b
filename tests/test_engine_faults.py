"""Faults under each engine's two replicas: kill -9, SIGTERM and a NaN, in one job's life.

Two replicas of one run, as each engine spreads a job: two processes under `horovodrun`, two
devices of one process and two workers of a `MultiWorkerMirroredStrategy` (`TF_CONFIG`) under
`tf_distribute`, two processes of one job under `jax`. (More of Horovod's, a rank
killed and resumed on other worker counts among them: tests/test_reliability.py.) Every run
is a real `train.py` process; every fault a real signal.

One test per engine walks a job through the faults in turn, so that each launch (about 90 s
for two JAX processes on these two cores) serves several checks: the job is killed with
kill -9, rerun and stopped by a SIGTERM, rerun to its end (the uninterrupted run's weights),
then continued at a rate that diverges (a NaN keeps the last good checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from checkpoint_files import checkpoint_values
from engine_runs import (
    HOROVOD_ENV,
    HOROVODRUN_2,
    REPO,
    TIMEOUT,
    TINY,
    array_checkpoint,
    assert_close,
    environment,
    jax_job,
    run,
    run_jax_processes,
    run_processes,
    tf_config_job,
)
from jpeg_fixtures import jpeg_bytes

LAUNCHES = [
    pytest.param("horovod_processes", marks=pytest.mark.horovod),
    "tf_distribute",
    "tf_distribute_workers",
    "jax_processes",
]
CHECKPOINT_SUFFIX = {
    "horovod_processes": ".index",
    "tf_distribute": ".index",
    "tf_distribute_workers": ".index",
    "jax_processes": ".npz",
}
# The train.py processes of a job: every one must exit with the job's status.
PROCESSES = {
    "horovod_processes": 2,
    "tf_distribute": 1,
    "tf_distribute_workers": 2,
    "jax_processes": 2,
}


def run_launch(launch: str, argv: list[str], check: bool = True) -> list:
    """train.py with `argv` under `launch`, to its end: each process's result, rank 0 first
    (under horovodrun, one: horovodrun's, with every rank's output)."""
    if launch == "jax_processes":
        return run_jax_processes(*argv, check=check)
    if launch == "horovod_processes":
        return [run(*argv, check=check, launcher=HOROVODRUN_2, **HOROVOD_ENV)]
    if launch == "tf_distribute_workers":
        return run_processes(*argv, engine="tf_distribute", check=check)
    return [run("--engine=tf_distribute", "--cpu_devices=2", *argv, check=check)]


def exit_codes(launch: str, codes: list[int], text: str) -> list[int]:
    """Each process's exit status, from `codes` (the launched processes' own).

    Under horovodrun (whose own status is 1 when a rank failed) the job's status is that of
    the first rank to exit non-zero, which horovodrun names in its output `text`; it then
    terminates the others with a SIGTERM (train.py's ranks wait for each other before they
    exit, so none is cut short): every other status it reports ("Process 1 exit with status
    code 143.") must be the same, or 143 from that termination.
    """
    if launch != "horovod_processes" or codes == [0]:
        return codes
    first = re.search(r"Process name: \d+\nExit code: (-?\d+)", text)
    assert first is not None, text[-3000:]
    status = int(first.group(1))
    reported = re.findall(r"^Process \d+ exit with status code (-?\d+)\.", text, re.M)
    assert status in {int(c) for c in reported} <= {status, 128 + signal.SIGTERM}, text[-3000:]
    return [status] * PROCESSES[launch]


def horovod_ranks(model_dir: Path) -> dict[int, int]:
    """{rank: pid} of the train.py processes of the horovodrun job writing `model_dir`."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = dict(
                line.split(b"=", 1)
                for line in (entry / "environ").read_bytes().split(b"\0")
                if b"=" in line
            )
            # The rank's python itself, not the `sh -c env ... python train.py` that starts it.
            ours = f"--model_dir={model_dir}".encode() in argv and b"python" in argv[0]
            rank = environ.get(b"HOROVOD_RANK")  # none under the other engines
            if ours and rank is not None and len(argv) > 1 and argv[1].endswith(b"train.py"):
                ranks[int(rank)] = int(entry.name)
    return ranks


def start_launch(launch: str, argv: list[str], log: Path) -> list[subprocess.Popen]:
    """train.py with `argv` under `launch`, started: process `rank` writes `log`.rank (a file,
    not a pipe: nobody reads while it runs); under horovodrun, horovodrun writes `log`.0."""
    train = [sys.executable, str(REPO / "train.py")]
    if launch == "jax_processes":
        commands = [([*train, "--engine=jax", *argv], job) for job in jax_job(2)]
    elif launch == "horovod_processes":
        commands = [([*HOROVODRUN_2, *train, *argv], HOROVOD_ENV)]
    elif launch == "tf_distribute_workers":
        commands = [([*train, "--engine=tf_distribute", *argv], job) for job in tf_config_job(2)]
    else:
        commands = [([*train, "--engine=tf_distribute", "--cpu_devices=2", *argv], {})]
    children = []
    for rank, (command, job) in enumerate(commands):
        with open(f"{log}.{rank}", "w") as out:
            children.append(
                subprocess.Popen(
                    command, env=environment(**job), stdout=out, stderr=subprocess.STDOUT
                )
            )
    return children


def output(log: Path, rank: int = 0) -> str:
    return Path(f"{log}.{rank}").read_text()


def wait_until(condition, children: list[subprocess.Popen], log: Path, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        for rank, child in enumerate(children):
            assert child.poll() is None, (
                f"rank {rank} ended before {what}:\n{output(log, rank)[-3000:]}"
            )
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.01)


def kill(children: list[subprocess.Popen], model_dir: Path) -> None:
    """kill -9 of every process of the job: under horovodrun its ranks too (after it, so
    that it cannot see a rank die and exit on its own first)."""
    ranks = horovod_ranks(model_dir)
    for child in children:
        child.kill()
    for pid in ranks.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def last_process(launch: str, children: list[subprocess.Popen], model_dir: Path) -> int:
    """The pid of the job's last process: the last rank under horovodrun."""
    if launch == "horovod_processes":
        return horovod_ranks(model_dir)[1]
    return children[-1].pid


def progress_update(log: Path) -> int:
    """The last update rank 0's progress lines name (`--progress_every_steps=1`); 0 if none."""
    # horovodrun prefixes each line with the rank's stream: "[0]<stdout>:update 3/24 ...".
    updates = re.findall(r"^(?:\[0\]<stdout>:)?update (\d+)/", output(log), flags=re.MULTILINE)
    return int(updates[-1]) if updates else 0


def checkpoint_steps(model_dir: Path, launch: str) -> list[int]:
    """The updates of the checkpoints in `model_dir`, in either engine's format."""
    suffix = CHECKPOINT_SUFFIX[launch]
    return sorted(
        int(p.name[5 : -len(suffix)]) for p in (model_dir / "checkpoints").glob(f"ckpt-*{suffix}")
    )


def latest_step(model_dir: Path, launch: str) -> int:
    """The update of the latest checkpoint the index names (written after the files, so a
    checkpoint it names is complete), in either engine's format; 0 before the first."""
    folder = model_dir / "checkpoints"
    if launch == "jax_processes":
        index = folder / "checkpoint.json"
        if not index.exists():
            return 0
        return int(json.loads(index.read_text())["checkpoints"][-1][5:-4])
    latest = tf.train.latest_checkpoint(str(folder)) if folder.exists() else None
    return 0 if latest is None else int(latest.rsplit("-", 1)[1])


def indexed_steps(model_dir: Path, launch: str) -> list[int]:
    """The updates of the checkpoints the index names (not files a kill left unindexed)."""
    folder = model_dir / "checkpoints"
    if launch == "jax_processes":
        names = json.loads((folder / "checkpoint.json").read_text())["checkpoints"]
        return sorted(int(name[5:-4]) for name in names)
    state = tf.train.get_checkpoint_state(str(folder))
    return sorted(int(path.rsplit("-", 1)[1]) for path in state.all_model_checkpoint_paths)


def stored_values(model_dir: Path, launch: str) -> dict[str, np.ndarray]:
    """The latest checkpoint's values, with its images consumed under "images_seen"."""
    if launch == "jax_processes":
        return array_checkpoint(model_dir)
    values = checkpoint_values(model_dir)
    return {**values, "images_seen": values["images_seen/.ATTRIBUTES/VARIABLE_VALUE"]}


@pytest.mark.slow
@pytest.mark.parametrize("launch", LAUNCHES)
def test_kill_9_sigterm_and_nan_keep_the_run_exact(tmp_path, launch):
    # Random crops and flips, dropout, a shuffled order (8 updates of 8 images per epoch):
    # after each restart every one must be the uninterrupted run's, wherever in an epoch
    # the job stopped.
    epoch = 8
    root = tmp_path / "data"
    for label in "ab":
        (root / "train" / label).mkdir(parents=True)
        for i in range(epoch * 8 // 2):
            path = root / "train" / label / f"{i}.JPEG"
            path.write_bytes(jpeg_bytes(36, 36, seed=ord(label) * 100 + i))
    (root / "validation").symlink_to(root / "train")
    common = [
        *TINY,
        "--dataset=folder",
        f"--data_dir={root}",
        "--preprocessing=cifar",
        "--deterministic",
        "--log_every_steps=5",  # the per-layer statistics, written by rank 0
        "--progress_every_steps=1",
        "--num_classes=2",
    ]
    # 3 epochs: room for the SIGTERM to land inside epoch 1 or 2, whenever the kill came.
    steps = 3 * epoch
    reference, job = tmp_path / "reference", tmp_path / "job"
    run_launch(launch, [*common, f"--train_steps={steps}", f"--model_dir={reference}"])
    argv = [*common, f"--train_steps={steps}", f"--model_dir={job}"]

    # kill -9 of every process, as a scheduler ends a job, once the index names an odd
    # update in epoch 1 (a checkpoint every update): the rerun skips into an epoch and its
    # first `fit` starts at a later epoch than the uninterrupted run's (Keras on JAX once
    # read its input before training there).
    log = tmp_path / "killed.log"
    children = start_launch(launch, [*argv, "--checkpoint_every_steps=1"], log)

    def odd_checkpoint() -> bool:
        step = latest_step(job, launch)
        return step > epoch and step % 2 == 1

    try:
        wait_until(odd_checkpoint, children, log, "an odd checkpoint in epoch 1")
    finally:
        kill(children, job)
    codes = [child.wait(timeout=TIMEOUT) for child in children]
    assert codes == [-signal.SIGKILL] * len(children)
    deadline = time.monotonic() + 30
    while horovod_ranks(job) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not horovod_ranks(job), "ranks outlived the kill"
    killed_at = latest_step(job, launch)
    assert epoch < killed_at < 2 * epoch, "the kill came late: the rerun must resume in epoch 1"

    # The rerun resumes there, with checkpoints at epoch ends only. A SIGTERM to its last
    # process only once rank 0 printed epoch 1's last update: the guard stops every process at
    # the same batch in epoch 2 (the epoch end's save, pipeline and `fit` give the signal time
    # to land), and the checkpoint of that mid-epoch update can only be the stop's own (143).
    log = tmp_path / "stopped.log"
    children = start_launch(launch, [*argv, "--checkpoint_every_steps=0"], log)
    try:
        wait_until(lambda: progress_update(log) >= 2 * epoch, children, log, "epoch 1's end")
        os.kill(last_process(launch, children, job), signal.SIGTERM)
        codes = [child.wait(timeout=TIMEOUT) for child in children]
    finally:
        kill(children, job)
    text = output(log)
    codes = exit_codes(launch, codes, text)
    assert codes == [143] * PROCESSES[launch], text[-3000:] + output(log, len(children) - 1)[-3000:]
    assert f"Resuming from {job}/checkpoints/ckpt-{killed_at}" in text
    stopped_at = int(text.split("SIGTERM: stopped at step ")[1].split(";")[0])
    assert f"checkpoint {job}/checkpoints/ckpt-{stopped_at}" in text
    assert killed_at < stopped_at == latest_step(job, launch) < steps
    assert stopped_at % epoch, "the SIGTERM landed at an epoch end: no proof of its own save"
    saved = [s for s in indexed_steps(job, launch) if s > killed_at]
    assert [s for s in saved if s % epoch] == [stopped_at], saved

    # The second rerun ends with the uninterrupted run's weights.
    proc = run_launch(launch, argv)[0]
    assert f"Resuming from {job}/checkpoints/ckpt-{stopped_at}" in proc.stdout
    assert json.loads((job / "results.json").read_text())["step"] == steps
    if launch != "tf_distribute":
        assert "identical on all 2 workers" in proc.stdout
    assert list((job / "tensorboard" / "layers").glob("events.out.tfevents.*"))
    actual, expected = stored_values(job, launch), stored_values(reference, launch)
    # As test_reliability's Horovod run: LARS's statistics (ratios of float32 norms) get ten
    # times the weights' rtol.
    statistics = {k for k in expected if "_statistics" in k}
    assert_close(
        {k: v for k, v in actual.items() if k not in statistics},
        {k: v for k, v in expected.items() if k not in statistics},
        rtol=1e-6,
        atol=1e-9,
    )
    for key in statistics:
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-5, atol=1e-9, err_msg=key)

    # Continued at a rate that diverges: every process stops (exit 3); the checkpoint of the
    # failed step (its weights gave the bad loss) is deleted, the one before it kept, intact.
    diverging = [
        *common,
        f"--train_steps={steps + 4}",
        "--learning_rate=1e25",
        "--checkpoint_every_steps=1",
    ]
    procs = run_launch(launch, [*diverging, f"--model_dir={job}"], check=False)
    proc = procs[0]
    codes = exit_codes(launch, [p.returncode for p in procs], proc.stdout + proc.stderr)
    assert codes == [3] * PROCESSES[launch], proc.stdout[-3000:] + proc.stderr
    failed = int(proc.stdout.split("became NaN or Inf at step ")[1].split(".")[0])
    kept = checkpoint_steps(job, launch)
    assert steps <= kept[-1] < failed and failed not in kept
    assert f"The last good checkpoint, {job}/checkpoints/ckpt-{kept[-1]}" in proc.stdout
    values = stored_values(job, launch)
    assert int(values["images_seen"]) == kept[-1] * 8
    assert all(np.isfinite(v).all() for v in values.values() if v.dtype.kind == "f")
