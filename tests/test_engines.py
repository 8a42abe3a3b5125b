"""The engines (lars_tf.engines) under train.py: launches refused, replicas equal to one device.

Every run is a real `train.py` process. "Two replicas at B/2 equal one device at B" is checked
on checkpoints: the engines that keep one replica per device with its own batch-norm
statistics (tf_distribute, Horovod) are compared on a model without batch norm and dropout,
where the update is the same sum of gradients; JAX's DataParallel computes the global batch
in one XLA program, so its batch norm sees the whole batch and it is compared with it.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from checkpoint_files import checkpoint_values
from jpeg_fixtures import jpeg_bytes

from lars_tf.engines import launch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # train_flags lives at the top level, beside train.py
import train_flags  # noqa: E402

TIMEOUT = 300
TINY = [
    "--model=alexnet_bn_small",
    "--width_multiplier=0.125",
    "--groups=1",
    "--image_size=32",
    "--log_every_steps=0",
    "--global_batch_size=8",
    "--eval_every_epochs=0",
    "--progress_every_steps=0",
]
SYNTHETIC = ["--synthetic", "--synthetic_examples=32", "--num_classes=10"]
# No batch norm and no dropout: per-replica statistics and masks would differ by design.
PLAIN = ["--normalization=none", "--dropout=0"]
# Float32 sums of 2 half batches against one whole batch, over 3 LARS updates.
TOLERANCE = dict(rtol=1e-5, atol=2e-6)
# The same run on TensorFlow and on JAX (XLA), from the same initial weights.
ACROSS_BACKENDS = dict(rtol=1e-4, atol=1e-5)


def environment(**extra: str) -> dict[str, str]:
    # train.py sets KERAS_BACKEND from --engine; the suite's own setting must not leak in.
    kept = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    return {**kept, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1", **extra}


def run(*argv: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *argv],
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def array_entries(model_dir: Path) -> list[tuple[str, np.ndarray]]:
    """The latest `ArrayCheckpointer` archive of a JAX run: (path, value), model variables
    first, in the model's order, then the optimizer's."""
    folder = model_dir / "checkpoints"
    name = json.loads((folder / "checkpoint.json").read_text())["checkpoints"][-1]
    with np.load(io.BytesIO((folder / name).read_bytes())) as stored:
        keys = sorted(k for k in stored.files if ":" in k)
        return [("images_seen", stored["images_seen"])] + [
            (key.split(":", 1)[1], stored[key]) for key in keys
        ]


def array_checkpoint(model_dir: Path) -> dict[str, np.ndarray]:
    return dict(array_entries(model_dir))


def trainable_weights(values: dict[str, np.ndarray]) -> list[np.ndarray]:
    """A TensorFlow checkpoint's trainable weights, in the model's order."""
    found = []
    while (key := f"optimizer/_trainable_variables/{len(found)}/.ATTRIBUTES/VARIABLE_VALUE") in (
        values
    ):
        found.append(values[key])
    return found


def assert_close(actual: dict, expected: dict, extra: str = "", **tolerance) -> None:
    """Every float value of `expected` in `actual`; `actual` may add names containing `extra`
    (gradient accumulators)."""
    added = actual.keys() - expected.keys()
    assert expected.keys() <= actual.keys() and all(extra and extra in n for n in added), added
    compared = 0
    for name, value in expected.items():
        if value.dtype.kind != "f":
            continue
        np.testing.assert_allclose(actual[name], value, err_msg=name, **tolerance)
        compared += 1
    assert compared > 4  # the weights were really compared


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> list[str]:
    """Flags reading 16 distinct JPEGs of 2 classes in a fixed order, without augmentation:
    a batch of 8 is then exactly two micro-batches of 4."""
    root = tmp_path_factory.mktemp("jpegs")
    for split, count in (("train", 8), ("validation", 2)):
        for label in "ab":
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.JPEG").write_bytes(jpeg_bytes(36, 36, seed=ord(label) * 100 + i))
    return [
        "--dataset=folder",
        f"--data_dir={root}",
        "--preprocessing=eval",
        "--deterministic",
        "--shuffle_buffer=1",
    ]


# --- launch checks (no process) -----------------------------------------------------------


TF_CONFIG_2 = json.dumps(
    {"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 0}}
)


TF_CONFIG_1 = json.dumps(
    {"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 0}}
)

JAX_2 = {
    "KERAS_DISTRIBUTION_JOB_ADDRESSES": "localhost:1234",
    "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
    "KERAS_DISTRIBUTION_PROCESS_ID": "1",
}


@pytest.mark.parametrize(
    "engine, environ, expected, message",
    [
        ("mpi", {}, 0, "--engine='mpi' is not an engine; choose one of horovod, tf_distribute"),
        ("jax", {"KERAS_BACKEND": "tensorflow"}, 0, "KERAS_BACKEND=tensorflow but --engine=jax"),
        ("horovod", {"TF_CONFIG": TF_CONFIG_2}, 0, "run with --engine=tf_distribute"),
        ("horovod", {"KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}, 0, "launch with horovodrun"),
        ("tf_distribute", {"HOROVOD_SIZE": "2"}, 0, "run with --engine=horovod"),
        ("jax", {"OMPI_COMM_WORLD_SIZE": "2"}, 0, "run with --engine=horovod"),
        ("jax", {"PMI_SIZE": "4"}, 0, "one of 4 started by horovodrun/mpirun"),
        ("jax", {"TF_CONFIG": TF_CONFIG_2}, 0, "run with --engine=tf_distribute"),
        ("tf_distribute", {"KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}, 0, "run with --engine=jax"),
        ("jax", {"KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}, 0, "missing: KERAS_DISTRIBUTION_JOB"),
        ("jax", {**JAX_2, "KERAS_DISTRIBUTION_PROCESS_ID": "2"}, 0, "must be one of 0..1"),
        ("jax", {**JAX_2, "KERAS_DISTRIBUTION_NUM_PROCESSES": "two"}, 0, "is not a process count"),
        ("jax", JAX_2, 3, "--num_workers=3 but this --engine=jax launch has 2"),
        ("jax", {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "a:1,b:1"}, 0, "names several processes"),
        # keras-team/keras#20585: fit under MultiWorkerMirroredStrategy fails with Keras' own
        # SGD (tests/test_strategies.py asserts that failure); the engine refuses it.
        ("tf_distribute", {"TF_CONFIG": TF_CONFIG_2}, 0, "keras-team/keras#20585"),
        ("tf_distribute", {"TF_CONFIG": "{worker"}, 0, "TF_CONFIG is not a tf.distribute"),
        (
            "tf_distribute",
            {"TF_CONFIG": TF_CONFIG_2.replace('"index": 0', '"index": 2')},
            0,
            "is not one of the 2 workers its cluster names",
        ),
        ("tf_distribute", {"TF_CONFIG": TF_CONFIG_1}, 2, "--num_workers=2 but this"),
        ("horovod", {"HOROVOD_SIZE": "2", "HOROVOD_RANK": "0"}, 4, "has 2 worker process(es)"),
        ("horovod", {"PMI_SIZE": "3"}, 2, "launch has 3 worker process(es)"),
        ("horovod", {}, 2, "--num_workers=2 but this --engine=horovod launch has 1"),
    ],
)
def test_a_launch_that_does_not_fit_the_engine_is_refused(engine, environ, expected, message):
    with pytest.raises(launch.LaunchError) as raised:
        launch.check_launch(engine, dict(environ), expected_workers=expected)
    assert message in str(raised.value)


def test_an_engine_whose_backend_is_missing_names_the_install(monkeypatch):
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(launch.LaunchError, match="needs the jax package.*make install"):
        launch.check_launch("jax", {})


def test_fitting_launches_pass_and_prepare_the_backend():
    launch.check_launch("horovod", {"HOROVOD_SIZE": "2", "HOROVOD_RANK": "1"}, expected_workers=2)
    launch.check_launch("horovod", {"PMI_SIZE": "2"}, expected_workers=2)  # MPICH, Slurm
    # Managed platforms set a one-worker TF_CONFIG, or a malformed one; Horovod ignores it.
    launch.check_launch("horovod", {"TF_CONFIG": TF_CONFIG_1})
    launch.check_launch("horovod", {"TF_CONFIG": "{worker"})
    launch.check_launch("tf_distribute", {"TF_CONFIG": TF_CONFIG_1}, expected_workers=1)
    launch.check_launch("tf_distribute", {"PMI_SIZE": "1"})  # srun of one task
    if launch.importlib.util.find_spec("jax") is not None:
        launch.check_launch("jax", {"KERAS_BACKEND": "jax"})
        launch.check_launch("jax", JAX_2, expected_workers=2)
    # A malformed JAX count is not Horovod's business.
    launch.check_launch("horovod", {"KERAS_DISTRIBUTION_NUM_PROCESSES": "two"})
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    launch.prepare_environment("jax", cpu_devices=2, environ=environ)
    assert environ["KERAS_BACKEND"] == "jax" and environ["JAX_PLATFORMS"] == "cpu"
    assert environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"


# --- train.py refuses before any work -----------------------------------------------------


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--engine=jax"], {"KERAS_BACKEND": "torch"}, "KERAS_BACKEND=torch but --engine=jax"),
        (["--engine=tf_distribute"], {"TF_CONFIG": TF_CONFIG_2}, "keras-team/keras#20585"),
        (
            ["--engine=tf_distribute", "--cpu_devices=2", "--grad_accum_steps=2"],
            {},
            "Keras 3's gradient accumulation fails under MirroredStrategy",
        ),
        (["--engine=jax", "--fp16_allreduce"], {}, "--fp16_allreduce is Horovod's compression"),
        (["--cpu_devices=2"], {}, "--cpu_devices is for --engine=tf_distribute and jax"),
    ],
)
def test_train_py_refuses_a_bad_launch_before_any_work(tmp_path, argv, env, message):
    model_dir = tmp_path / "run"
    proc = run(
        *TINY, *SYNTHETIC, "--train_steps=1", *argv, f"--model_dir={model_dir}", check=False, **env
    )
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not model_dir.exists()


# --- equal to one device ------------------------------------------------------------------


def initial_weights(path: Path, argv: list[str]) -> Path:
    """The weights train.py's model of `argv` starts from, saved as a Keras .weights.h5."""
    fv = flags.FlagValues()
    train_flags.define_all(fv)
    fv(["train.py", *argv, "--model_dir=unused"])
    train_flags.build_model(10, (32, 32, 3), fv).save_weights(path)
    return path


@pytest.mark.slow
def test_the_three_engines_end_alike_and_resume_on_another_replica_count(tmp_path):
    common = [*TINY, *SYNTHETIC, *PLAIN, "--train_steps=3", "--checkpoint_every_steps=0"]
    init = initial_weights(tmp_path / "init.weights.h5", common)
    common.append(f"--init_weights={init}")
    horovod, mirrored, jax = tmp_path / "horovod", tmp_path / "mirrored", tmp_path / "jax"
    run(*common, f"--model_dir={horovod}")
    proc = run(*common, "--engine=tf_distribute", "--cpu_devices=2", f"--model_dir={mirrored}")
    assert "engine tf_distribute: 1 process(es), 2 replica(s)" in proc.stdout
    assert json.loads((mirrored / "plan.json").read_text())["replicas"] == 2
    proc = run(*common, "--engine=jax", "--cpu_devices=2", f"--model_dir={jax}")
    assert "engine jax: 1 process(es), 2 replica(s)" in proc.stdout

    reference = checkpoint_values(horovod)
    assert_close(checkpoint_values(mirrored), reference, **TOLERANCE)
    # JAX: the model's variables come first in its archive; without batch norm and dropout
    # they are the trainable weights. XLA's CPU kernels round otherwise than TensorFlow's.
    expected = trainable_weights(reference)
    actual = [value for _, value in array_entries(jax)[1 : len(expected) + 1]]
    assert len(expected) == 16 and [a.shape for a in actual] == [e.shape for e in expected]
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, **ACROSS_BACKENDS)

    # Each continues on one device (another replica count), to update 5, printing the
    # progress lines of a batch job (stdout is a pipe here) as Horovod's runs do.
    for engine, model_dir in (("tf_distribute", mirrored), ("jax", jax)):
        longer = [*common[:-2], "--train_steps=5", "--checkpoint_every_steps=0"]
        proc = run(
            *longer, "--progress_every_steps=1", f"--engine={engine}", f"--model_dir={model_dir}"
        )
        assert f"Resuming from {model_dir}/checkpoints/ckpt-3" in proc.stdout
        assert json.loads((model_dir / "results.json").read_text())["step"] == 5
        updates = re.findall(r"^update (\d+)/5 \(epoch [\d.]+\) loss ", proc.stdout, re.M)
        assert updates == ["4", "5"], (engine, proc.stdout[-2000:])


@pytest.mark.slow
def test_jax_two_devices_and_accumulation_equal_one_device(tmp_path, jpeg_folder):
    # Batch norm included: DataParallel normalises over the global batch, as one device does.
    # With batch-norm re-estimation at the end (a jitted stateless pass over the global
    # batch, as one device's).
    common = [*TINY, "--dropout=0", "--engine=jax", "--train_steps=3"]
    recalibrated = ["--bn_recalibration_batches=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(*common, *SYNTHETIC, *recalibrated, f"--model_dir={one}")
    proc = run(*common, *SYNTHETIC, *recalibrated, "--cpu_devices=2", f"--model_dir={two}")
    assert "engine jax: 1 process(es), 2 replica(s)" in proc.stdout
    assert_close(array_checkpoint(two), array_checkpoint(one), **TOLERANCE)
    # k x B/k = B, on distinct images (synthetic data repeats one batch) and without batch
    # norm (it normalises each micro-batch alone).
    plain = [*common, *PLAIN, *jpeg_folder]
    whole, accumulated = tmp_path / "whole", tmp_path / "accumulated"
    run(*plain, f"--model_dir={whole}")
    run(*plain, "--grad_accum_steps=2", f"--model_dir={accumulated}")
    assert_close(
        array_checkpoint(accumulated),
        array_checkpoint(whole),
        extra="_gradient_accumulator",
        **TOLERANCE,
    )


HOROVODRUN = str(Path(sys.executable).with_name("horovodrun"))
HOROVODRUN_2 = [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_jax_processes(
    *argv: str, processes: int = 2, check: bool = True
) -> list[subprocess.CompletedProcess]:
    """`train.py --engine=jax` as `processes` processes of one job on localhost."""
    job = {
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"localhost:{free_port()}",
        "KERAS_DISTRIBUTION_NUM_PROCESSES": str(processes),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), "--engine=jax", *argv],
            env=environment(**job, KERAS_DISTRIBUTION_PROCESS_ID=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(processes)
    ]
    done = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            stdout, stderr = proc.communicate()
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    for rank, proc in enumerate(done):
        assert proc.returncode == 0 or not check, (
            f"rank {rank}:\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
        )
    return done


@pytest.mark.slow
@pytest.mark.horovod
def test_jax_two_processes_equal_two_horovod_workers_and_resume(tmp_path, jpeg_folder):
    # Each process reads its own shard (auto_shard_dataset=False), as each Horovod worker
    # does. At global batch 16 every update is the whole training split (a worker's batch is
    # its whole shard; the order inside a shard depends on its seed, which the engines set
    # differently), so the updates agree. Had the processes not communicated, each would
    # have trained on its own 8 images and ended elsewhere.
    common = [*TINY, *PLAIN, *jpeg_folder, "--global_batch_size=16", "--num_classes=10"]
    common.append("--train_steps=3")
    common.append("--checkpoint_every_steps=0")
    init = initial_weights(tmp_path / "init.weights.h5", common)
    common.append(f"--init_weights={init}")
    horovod, jax = tmp_path / "horovod", tmp_path / "jax"
    proc = subprocess.run(
        [*HOROVODRUN_2, sys.executable, str(REPO / "train.py"), *common, f"--model_dir={horovod}"],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = run_jax_processes(*common, f"--model_dir={jax}")
    assert "engine jax: 2 process(es), 2 replica(s)" in rank0.stdout
    assert "identical on all 2 workers" in rank0.stdout
    assert "Evaluation at step 3" in rank0.stdout and "Evaluation" not in rank1.stdout
    # Both evaluated their shard of the 4 validation images; process 0 wrote the sums.
    assert json.loads((jax / "results.json").read_text())["examples"] == 4
    expected = trainable_weights(checkpoint_values(horovod))
    actual = [value for _, value in array_entries(jax)[1 : len(expected) + 1]]
    assert len(expected) == 16 and [a.shape for a in actual] == [e.shape for e in expected]
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, **ACROSS_BACKENDS)

    # Two processes resume it, to update 5 (rank 0 reads, every process assigns: JAX
    # checks that they place equal values), logging the per-layer statistics on rank 0.
    # (Resuming on another device count: test_the_three_engines_end_alike_...)
    again = [*common[:-3], "--train_steps=5", "--checkpoint_every_steps=0", "--log_every_steps=1"]
    rank0, _ = run_jax_processes(*again, f"--model_dir={jax}")
    assert f"Resuming from {jax}/checkpoints/ckpt-3" in rank0.stdout
    assert json.loads((jax / "results.json").read_text())["step"] == 5
    assert "identical on all 2 workers" in rank0.stdout
    # A checkpoint rank 0 cannot read stops both processes, each saying why.
    index = json.loads((jax / "checkpoints" / "checkpoint.json").read_text())["checkpoints"]
    (jax / "checkpoints" / index[-1]).write_bytes(b"damaged")
    failed = run_jax_processes(*again, f"--model_dir={jax}", check=False)
    assert [p.returncode for p in failed] == [1, 1]
    assert "rank 0 failed to restore the latest checkpoint" in failed[1].stderr
    assert "cannot be read: its file is damaged" in failed[0].stderr + failed[1].stderr


# Two replicas in one process: both engines spread a process over its devices.
TWO_REPLICAS = "--cpu_devices=2"
CHECKPOINT_SUFFIX = {"tf_distribute": ".index", "jax": ".npz"}


def checkpoint_steps(model_dir: Path, engine: str) -> list[int]:
    """The updates of the checkpoints in `model_dir`, in either engine's format."""
    suffix = CHECKPOINT_SUFFIX[engine]
    return sorted(
        int(p.name[5 : -len(suffix)]) for p in (model_dir / "checkpoints").glob(f"ckpt-*{suffix}")
    )


def latest_step(model_dir: Path, engine: str) -> int | None:
    """The update of the latest checkpoint the index names (written after the files, so a
    checkpoint it names is complete), in either engine's format."""
    folder = model_dir / "checkpoints"
    if engine == "jax":
        index = folder / "checkpoint.json"
        if not index.exists():
            return None
        return int(json.loads(index.read_text())["checkpoints"][-1][5:-4])
    latest = tf.train.latest_checkpoint(str(folder)) if folder.exists() else None
    return None if latest is None else int(latest.rsplit("-", 1)[1])


def start_train(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # a file, not a pipe: nobody reads while it runs
        return subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *argv],
            env=environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_until(condition, child: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert child.poll() is None, f"the run ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["tf_distribute", "jax"])
def test_nan_keeps_the_last_good_checkpoint_and_sigterm_checkpoints(tmp_path, engine):
    common = [*TINY, *SYNTHETIC, f"--engine={engine}", TWO_REPLICAS]
    common.append("--checkpoint_every_steps=1")
    diverged = tmp_path / "diverged"
    run(*common, "--train_steps=2", f"--model_dir={diverged}")
    proc = run(
        *common,
        "--train_steps=6",
        "--learning_rate=1e25",
        f"--model_dir={diverged}",
        check=False,
    )
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    failed = int(proc.stdout.split("became NaN or Inf at step ")[1].split(".")[0])
    # The checkpoint of the failed step (its weights gave the bad loss) was deleted; the
    # one before it is kept, intact.
    kept = checkpoint_steps(diverged, engine)
    assert 2 <= kept[-1] < failed and failed not in kept
    assert f"The last good checkpoint, {diverged}/checkpoints/ckpt-{kept[-1]}" in proc.stdout
    values = array_checkpoint(diverged) if engine == "jax" else checkpoint_values(diverged)
    images = values["images_seen" if engine == "jax" else "images_seen/.ATTRIBUTES/VARIABLE_VALUE"]
    assert int(images) == kept[-1] * 8
    assert all(np.isfinite(v).all() for v in values.values() if v.dtype.kind == "f")

    stopped = tmp_path / "stopped"
    log = tmp_path / "stopped.log"
    child = start_train(
        [
            *common,
            "--train_steps=100000",
            "--checkpoint_every_steps=0",  # at epoch ends (4 updates) and on the SIGTERM
            f"--model_dir={stopped}",
        ],
        log,
    )
    try:
        # The checkpoint of epoch 1's end: the SIGTERM then lands in a later update.
        wait_until(lambda: checkpoint_steps(stopped, engine), child, log, "checkpoint")
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=TIMEOUT) == 143, log.read_text()[-3000:]
    finally:
        child.kill()
    output = log.read_text()
    step = int(output.split("SIGTERM: stopped at step ")[1].split(";")[0])
    assert f"checkpoint {stopped}/checkpoints/ckpt-{step}" in output
    assert checkpoint_steps(stopped, engine)[-1] == step > 4


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["tf_distribute", "jax"])
def test_kill_9_then_the_same_command_ends_with_the_uninterrupted_weights(tmp_path, engine):
    # Random crops and flips, dropout, a shuffled order: after the restart each must be the
    # uninterrupted run's, wherever in an epoch (2 updates of 2 x 4 images) it stopped.
    root = tmp_path / "data"
    for label in "ab":
        (root / "train" / label).mkdir(parents=True)
        for i in range(4):
            path = root / "train" / label / f"{i}.JPEG"
            path.write_bytes(jpeg_bytes(36, 36, seed=ord(label) * 10 + i))
    common = [
        *TINY,
        f"--engine={engine}",
        TWO_REPLICAS,
        "--dataset=folder",
        f"--data_dir={root}",
        "--preprocessing=cifar",
        "--deterministic",
        "--train_steps=10",
        "--checkpoint_every_steps=1",
        "--eval_every_epochs=0",
        "--num_classes=2",
    ]
    (root / "validation").symlink_to(root / "train")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(*common, f"--model_dir={reference}")
    log = tmp_path / "killed.log"
    child = start_train([*common, f"--model_dir={killed}"], log)
    try:
        # Killed in epoch 1 or later: the rerun's first `fit` starts at a later epoch than
        # the uninterrupted run's (Keras on JAX once read its input before training there).
        wait_until(lambda: (latest_step(killed, engine) or 0) >= 3, child, log, "checkpoint 3")
        child.kill()
        assert child.wait(timeout=TIMEOUT) == -signal.SIGKILL
    finally:
        child.kill()
    step = latest_step(killed, engine)
    assert 3 <= step < 10
    proc = run(*common, f"--model_dir={killed}")
    assert f"Resuming from {killed}/checkpoints/ckpt-{step}" in proc.stdout
    assert json.loads((killed / "results.json").read_text())["step"] == 10
    if engine == "jax":
        actual, expected = array_checkpoint(killed), array_checkpoint(reference)
    else:
        actual, expected = checkpoint_values(killed), checkpoint_values(reference)
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


# --- the JAX engine's checkpoint format, on this process's backend ------------------------


def small_model(units: int = 3):
    import keras

    from lars_tf.optimizer import LARS

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, name="dense")])
    optimizer = LARS(0.1)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def test_array_checkpointer_keeps_k_discards_restores_and_names_what_is_wrong(tmp_path):
    from lars_tf.checkpoint import ArrayCheckpointer

    model, optimizer = small_model()
    saver = ArrayCheckpointer(tmp_path, model, optimizer, max_to_keep=2)
    assert saver.latest is None and saver.restore_latest() == 0
    for step in (1, 2, 3):
        model.layers[0].kernel.assign(np.full((4, 3), float(step), "float32"))
        saver.save(images_seen=8 * step, step=step)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-2.npz", "ckpt-3.npz"]
    assert saver.discard_from(3) == [str(tmp_path / "ckpt-3.npz")]
    assert saver.latest == str(tmp_path / "ckpt-2.npz")

    other_model, other_optimizer = small_model()
    restorer = ArrayCheckpointer(tmp_path, other_model, other_optimizer)
    assert restorer.restore_latest() == 16
    np.testing.assert_array_equal(other_model.layers[0].kernel.numpy(), np.full((4, 3), 2.0))

    wider, wider_optimizer = small_model(units=5)
    with pytest.raises(ValueError, match="does not match this model.*shape here"):
        ArrayCheckpointer(tmp_path, wider, wider_optimizer).restore_latest()
    (tmp_path / "ckpt-2.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="ckpt-2.npz cannot be read"):
        restorer.restore_latest()
    (tmp_path / "checkpoint").write_text("TensorFlow's index")
    with pytest.raises(ValueError, match="holds checkpoints of a TensorFlow engine"):
        restorer.restore_latest()
    model.layers[0].kernel.assign(np.full((4, 3), np.nan, "float32"))
    with pytest.raises(FloatingPointError, match="not finite at step 9"):
        saver.save(images_seen=72, step=9)
