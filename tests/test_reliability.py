"""Reliability: train.py survives what happens on shared clusters and refuses bad input clearly.

Faults are real: real train.py processes, real signals (kill -9 of the process, of one rank
under `horovodrun`, of a process stalled inside a checkpoint write), real files. Bad input is
real bytes: corrupt and non-RGB images, a truncated TFRecord shard, out-of-range labels, bad
flags. Models are the tiny AlexNet-BN of tests/test_train.py; runs take a few steps.

Covered elsewhere (not repeated here): SIGTERM writes a checkpoint, exits 143 and the rerun
ends exactly where an uninterrupted run ends (test_train.py::
test_resume_after_sigterm_continues_the_same_run); a global batch not divisible by workers x
accumulation, a negative learning rate and a missing recipe file are refused before anything
is written (test_train.py::test_bad_flags_fail_before_writing_anything); corrupt images are
skipped and counted exactly by the pipeline (test_data.py::
test_corrupt_images_are_skipped_and_counted).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from checkpoint_files import checkpoint_values
from jpeg_fixtures import cmyk_jpeg_bytes, jpeg_bytes, png_bytes, random_pixels, tfds_builder

import train_flags
from lars_tf.data import build_dataset, imagenet

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = str(REPO / "train.py")
STALLING_TRAIN_PY = str(REPO / "tests" / "reliability_scripts" / "train_stalling_checkpoint.py")
TIMEOUT = 300
# A dead rank must end the job within this many seconds (Horovod notices in a few).
HOROVOD_FAILURE_BOUND = 120
TINY = [
    "--model=alexnet_bn_small",
    "--width_multiplier=0.125",
    "--groups=1",
    "--image_size=32",
    "--log_every_steps=0",
]
SYNTHETIC = ["--synthetic", "--synthetic_examples=32", "--num_classes=10"]
# Marks every process a test starts (horovodrun passes the environment on to its ranks), so
# that ranks can be found and nothing outlives its test.
MARK = "LARS_TF_RELIABILITY_RUN"


# --- processes ----------------------------------------------------------------------------


@pytest.fixture
def mark() -> str:
    """A unique value of $LARS_TF_RELIABILITY_RUN; its processes are killed at teardown."""
    value = uuid.uuid4().hex
    yield value
    kill_all(value)


def kill_all(value: str) -> None:
    for pid in marked_processes(value):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def marked_processes(value: str) -> dict[int, dict[str, str]]:
    """`{pid: environment}` of the live processes started with `$MARK=value`."""
    found = {}
    needle = f"{MARK}={value}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone, or not ours
        if needle in environ and state != "Z":
            found[int(entry.name)] = dict(
                item.decode(errors="replace").split("=", 1) for item in environ if b"=" in item
            )
    return found


def rank_pid(value: str, rank: int) -> int | None:
    """The pid of the train.py python process of Horovod rank `rank`, if it runs."""
    for pid, environ in marked_processes(value).items():
        if environ.get("HOROVOD_RANK") != str(rank):
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # The rank's python itself, not the `sh -c env ... python train.py` that starts it.
        if len(argv) > 1 and argv[1].endswith(b"train.py") and b"python" in argv[0]:
            return pid
    return None


def env(value: str) -> dict[str, str]:
    return dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="2",
        OMP_NUM_THREADS="1",
        HOROVOD_GLOO_TIMEOUT_SECONDS="120",  # rendezvous on a loaded 2-core machine
        **{MARK: value},
    )


def horovodrun(workers: int) -> list[str]:
    runner = Path(sys.executable).with_name("horovodrun")
    return [str(runner), "-np", str(workers), "-H", f"localhost:{workers}", "--gloo"]


def train(value: str, *argv: str, check: bool = True, script: str = TRAIN_PY):
    proc = subprocess.run(
        [sys.executable, script, *argv],
        env=env(value),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def start(value: str, command: list[str], log: Path, **extra_env: str) -> subprocess.Popen:
    """Starts `command` with its output (stdout and stderr) going to the file `log`."""
    with open(log, "w") as out:  # a file, not a pipe: nobody reads while it runs
        proc = subprocess.Popen(
            command,
            env={**env(value), **extra_env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.log = log
    return proc


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}:\n{proc.log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.01)


# --- checkpoints --------------------------------------------------------------------------


def checkpoint_numbers(model_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (model_dir / "checkpoints").glob("*.index"))


def latest_step(model_dir: Path) -> int | None:
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    return None if latest is None else int(latest.rsplit("-", 1)[1])


def images_seen(values: dict[str, np.ndarray]) -> int:
    return int(values["images_seen/.ATTRIBUTES/VARIABLE_VALUE"])


def assert_intact(model_dir: Path) -> dict[str, np.ndarray]:
    values = checkpoint_values(model_dir)
    for name, value in values.items():
        if value.dtype.kind == "f":
            assert np.isfinite(value).all(), name
    return values


def assert_same_weights(actual: Path, expected: Path, rtol: float, atol: float) -> None:
    a, e = checkpoint_values(actual), checkpoint_values(expected)
    assert a.keys() == e.keys()
    for name in e:
        # LARS's statistics buffer (the last update's ||w||, ||g|| and local LR) is a ratio of
        # float32 norms: a weight 1 ulp off moves it by ~1e-6 relative (measured 1.18e-6 once,
        # on a resume from another checkpoint), so it gets ten times the weights' rtol.
        tolerance = 10 * rtol if "_statistics" in name else rtol
        np.testing.assert_allclose(a[name], e[name], rtol=tolerance, atol=atol, err_msg=name)


# --- data ---------------------------------------------------------------------------------


def class_folders(root: Path, split: str, images: dict[str, list[bytes]]) -> Path:
    for name, datas in images.items():
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(datas):
            (root / split / name / f"{i}.JPEG").write_bytes(data)
    return root


def write_records(folder: Path, split: str, shards: list[list[tuple[bytes, int]]]) -> list[Path]:
    """ImageNet-schema shards of `(encoded, label)` records, and their manifest entry."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, records in enumerate(shards):
        path = folder / imagenet.shard_name(split, index, len(shards))
        with tf.io.TFRecordWriter(str(path)) as writer:
            for n, (data, label) in enumerate(records):
                example = imagenet.make_example(
                    data,
                    label=label,
                    synset=imagenet.imagenet_synsets()[label],
                    filename=f"{split}_{index}_{n}.JPEG",
                    height=0,
                    width=0,
                )
                writer.write(example.SerializeToString())
        paths.append(path)
    manifest = imagenet.read_manifest(folder) or {"splits": {}}
    manifest["splits"][split] = {
        "num_examples": sum(map(len, shards)),
        "shards": {p.name: len(r) for p, r in zip(paths, shards, strict=True)},
    }
    imagenet.write_manifest(folder, {"splits": manifest["splits"]})
    return paths


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- faults -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory) -> tuple[list[str], Path]:
    """Flags of a deterministic 16-step run on JPEGs, and its uninterrupted model_dir.

    Eight different images, random crops and flips, dropout: the data order, the
    augmentation and the dropout masks all matter, and after a restart they must be those
    of the uninterrupted run, wherever in an epoch (4 steps) the run stopped.
    """
    root = tmp_path_factory.mktemp("exact")
    images = {c: [jpeg_bytes(36, 36, seed=ord(c) + i) for i in range(0, 40, 10)] for c in "ab"}
    data = class_folders(root / "data", "train", images)
    class_folders(data, "validation", {c: [jpeg_bytes(36, 36, seed=90 + ord(c))] for c in "ab"})
    common = [
        *TINY,
        "--dataset=folder",
        f"--data_dir={data}",
        "--preprocessing=cifar",
        "--global_batch_size=2",
        "--deterministic",
        "--train_steps=16",
        "--checkpoint_every_steps=3",  # and at each epoch's end: 3, 4, 6, 8, 9, 12, 15, 16
        "--eval_every_epochs=0",
    ]
    reference = root / "reference"
    value = uuid.uuid4().hex
    try:
        train(value, *common, f"--model_dir={reference}")
    finally:
        kill_all(value)
    return common, reference


def assert_resumes_and_ends_as_the_reference(exact_run, model_dir: Path, value: str) -> None:
    common, reference = exact_run
    step = latest_step(model_dir)
    rerun = train(value, *common, f"--model_dir={model_dir}")
    assert f"Resuming from {model_dir}/checkpoints/ckpt-{step} at step {step}." in rerun.stdout
    assert json.loads((model_dir / "results.json").read_text())["step"] == 16
    assert latest_step(model_dir) == 16
    assert_same_weights(model_dir, reference, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_kill_9_then_the_same_command_ends_with_the_uninterrupted_weights(
    tmp_path, mark, exact_run
):
    common, _ = exact_run
    model_dir = tmp_path / "run"
    command = [sys.executable, TRAIN_PY, *common, f"--model_dir={model_dir}"]
    proc = start(mark, command, tmp_path / "killed.log")
    wait_for(lambda: latest_step(model_dir) is not None, proc, "checkpoint")
    proc.kill()
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert latest_step(model_dir) < 16
    assert_resumes_and_ends_as_the_reference(exact_run, model_dir, mark)


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, mark, exact_run):
    common, _ = exact_run
    model_dir = tmp_path / "run"
    marker = tmp_path / "stalled"
    proc = start(
        mark,
        [sys.executable, STALLING_TRAIN_PY, *common, f"--model_dir={model_dir}"],
        tmp_path / "killed.log",
        STALL_CHECKPOINT="4",
        STALL_MARKER=str(marker),
    )
    wait_for(marker.exists, proc, "stalled checkpoint write")
    # Half written: the variables are in ckpt-4_temp/, there is no ckpt-4.index yet.
    assert list((model_dir / "checkpoints" / "ckpt-4_temp").iterdir())
    proc.kill()
    proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL

    assert latest_step(model_dir) == 3
    assert checkpoint_numbers(model_dir) == [3]
    assert images_seen(assert_intact(model_dir)) == 3 * 2
    # Step 3 is inside the first epoch: the rerun also skips the 3 batches already used.
    assert_resumes_and_ends_as_the_reference(exact_run, model_dir, mark)
    assert not list((model_dir / "checkpoints").glob("*_temp"))  # the rerun's save cleaned up


@pytest.mark.slow
def test_nan_loss_keeps_the_last_good_checkpoint_and_a_lower_rate_resumes(tmp_path, mark):
    model_dir = tmp_path / "run"
    common = [
        *TINY,
        *SYNTHETIC,
        "--global_batch_size=16",
        "--optimizer=sgd",
        "--warmup_epochs=2",  # 4 steps from 0: step 0 trains at rate 0, step 1 explodes
        "--train_steps=20",
        "--checkpoint_every_steps=1",
        "--eval_steps=1",
        f"--model_dir={model_dir}",
    ]
    proc = train(mark, *common, "--learning_rate=1e25", check=False)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    failed = int(proc.stdout.split("NaN or Inf at step ")[1].split(".")[0])
    assert failed >= 2
    # The checkpoint of the failed step holds the weights that gave the NaN: not kept. The
    # one before is, and nothing was written after it.
    good = latest_step(model_dir)
    assert good is not None and good < failed
    assert checkpoint_numbers(model_dir)[-1] == good
    assert f"The last good checkpoint, {model_dir}/checkpoints/ckpt-{good}, was kept." in (
        proc.stdout
    )
    assert images_seen(assert_intact(model_dir)) == good * 16
    assert not (model_dir / "results.json").exists()

    # The user's fix: the same run with a sane rate continues from the kept checkpoint.
    rerun = train(mark, *common, "--learning_rate=0.1")
    assert f"Resuming from {model_dir}/checkpoints/ckpt-{good} at step {good}." in rerun.stdout
    results = json.loads((model_dir / "results.json").read_text())
    assert results["step"] == 20 and np.isfinite(results["loss"])


@pytest.mark.horovod
@pytest.mark.slow
def test_rank_killed_under_horovodrun_then_resumes_on_other_worker_counts(tmp_path, mark):
    # 1 worker, killed -> 2 workers resume it, rank 1 is killed -> 1 worker finishes it. The
    # training images are identical, so one worker's batch of 2 and two workers' batches of
    # 1 give the same updates (also batch-norm statistics): the chained run must end with the
    # weights of an uninterrupted single-worker run.
    image = jpeg_bytes(36, 36, seed=5)
    data = class_folders(tmp_path / "data", "train", {"a": [image] * 4})
    (data / "train" / "b").mkdir()
    class_folders(data, "validation", {"a": [image], "b": [jpeg_bytes(36, 36, seed=6)]})
    common = [
        *TINY,
        "--dataset=folder",
        f"--data_dir={data}",
        "--preprocessing=eval",
        "--dropout=0",  # dropout masks are per worker
        "--global_batch_size=2",
        "--deterministic",
        "--train_steps=24",
        "--checkpoint_every_steps=2",
        "--eval_every_epochs=0",
    ]
    reference = tmp_path / "reference"
    train(mark, *common, f"--model_dir={reference}")

    model_dir = tmp_path / "run"
    single = [sys.executable, TRAIN_PY, *common, f"--model_dir={model_dir}"]
    proc = start(mark, single, tmp_path / "single.log")
    wait_for(lambda: latest_step(model_dir) is not None, proc, "checkpoint")
    proc.kill()
    proc.wait(timeout=TIMEOUT)
    first = latest_step(model_dir)

    job = start(mark, horovodrun(2) + single, tmp_path / "horovodrun.log")
    wait_for(lambda: (latest_step(model_dir) or 0) > first, job, "checkpoint of the 2 workers")
    wait_for(lambda: rank_pid(mark, 1) is not None, job, "rank 1")
    os.kill(rank_pid(mark, 1), signal.SIGKILL)
    killed = time.monotonic()
    try:
        job.wait(timeout=HOROVOD_FAILURE_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"horovodrun still running {HOROVOD_FAILURE_BOUND} s after rank 1 died")
    assert time.monotonic() - killed < HOROVOD_FAILURE_BOUND
    output = job.log.read_text()
    assert job.returncode != 0, output[-3000:]
    assert f"Resuming from {model_dir}/checkpoints/ckpt-{first} at step {first}." in output
    assert "2 worker(s) x 1 x 1 accumulation = global batch 2" in output
    # horovodrun names the rank that died and how.
    assert "Process name: 1\nExit code: 137" in output, output[-3000:]
    deadline = time.monotonic() + 30
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.2)  # Horovod's per-rank supervisors wind down
    assert not marked_processes(mark), "processes of the failed job survived it"
    second = latest_step(model_dir)
    assert first < second < 24
    assert images_seen(assert_intact(model_dir)) == second * 2

    rerun = train(mark, *common, f"--model_dir={model_dir}")
    assert f"Resuming from {model_dir}/checkpoints/ckpt-{second} at step {second}." in (
        rerun.stdout
    )
    assert "1 worker(s) x 2 x 1 accumulation = global batch 2" in rerun.stdout
    assert latest_step(model_dir) == 24
    # Equal up to the order of float sums (a batch of 2 on one worker, or 1 on each of 2).
    assert_same_weights(model_dir, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.horovod
@pytest.mark.slow
def test_a_checkpoint_rank0_cannot_read_stops_every_rank_with_the_reason(tmp_path, mark):
    # Rank 0 alone reads the checkpoint; the others used to wait in the broadcast of its
    # result until horovodrun killed them, never saying why. Now each rank prints the reason
    # and exits non-zero, in the seconds after rank 0 fails.
    model_dir = tmp_path / "run"
    common = [
        *TINY,
        *SYNTHETIC,
        "--global_batch_size=4",
        "--checkpoint_every_steps=1",
        "--eval_every_epochs=0",
        "--eval_steps=1",
        f"--model_dir={model_dir}",
    ]
    train(mark, *common, "--train_steps=2")
    (data,) = (model_dir / "checkpoints").glob("ckpt-2.data-*")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # e.g. a copy cut short

    began = time.monotonic()
    job = start(
        mark,
        horovodrun(2) + [sys.executable, TRAIN_PY, *common, "--train_steps=4"],
        tmp_path / "horovodrun.log",
    )
    try:
        job.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"horovodrun still running {TIMEOUT} s after it started")
    output = job.log.read_text()
    assert job.returncode != 0, output[-3000:]
    reason = (
        "rank 0 failed to restore the latest checkpoint: ValueError: checkpoint "
        f"{model_dir}/checkpoints/ckpt-2 cannot be read"
    )
    for rank in (0, 1):
        # Printed by the rank itself: rank 1 knows why, not only that it was terminated.
        assert f"[{rank}]<stderr>:lars_tf rank {rank}: {reason}" in output, output[-4000:]
        assert f"Process {rank} exit with status code" in output, output[-4000:]
    # Start-up (two TensorFlow imports on a loaded machine) dominates; a rank left waiting
    # would take horovodrun's rendezvous timeout or the test's.
    assert time.monotonic() - began < HOROVOD_FAILURE_BOUND
    assert latest_step(model_dir) == 2  # nothing was trained or saved over it


# --- bad input: images and files ----------------------------------------------------------


def test_non_rgb_images_are_converted_and_undecodable_ones_skipped(tmp_path):
    # ImageNet's JPEG folders hold grayscale and CMYK JPEGs and a PNG named .JPEG; read as
    # they are (no converter), each must come out as the RGB image it shows.
    cmyk = cmyk_jpeg_bytes(32, 32, seed=3)
    if cmyk is None:
        pytest.skip("PIL is not installed, so no CMYK JPEG can be made")
    rgba = tf.io.encode_png(
        np.concatenate([random_pixels(32, 32, 3, seed=4), np.full((32, 32, 1), 128, np.uint8)], -1)
    ).numpy()
    images = {
        "a_gray": jpeg_bytes(32, 32, channels=1, seed=1),
        "b_cmyk": cmyk,
        "c_png": png_bytes(32, 32, seed=2),
        "d_rgba_png": rgba,
        "e_garbage": b"\xff\xd8\xff\xe0 not really a JPEG",
        "f_rgb": jpeg_bytes(32, 32, seed=5),
    }
    class_folders(tmp_path, "validation", {name: [data] for name, data in images.items()})
    spec = build_dataset(
        "folder",
        split="validation",
        batch_size=8,
        image_size=32,
        data_dir=str(tmp_path),
        is_training=False,
        preprocessing="none",  # the decoded pixels, resized to their own size
    )
    batches = list(spec.dataset)
    pixels = np.concatenate([x.numpy() for x, _ in batches])
    labels = np.concatenate([y.numpy() for _, y in batches]).tolist()
    assert labels == [0, 1, 2, 3, 5]  # the garbage one (label 4) is skipped ...
    assert spec.corrupt_count() == 1  # ... and counted; the others are not corrupt
    assert pixels.shape == (5, 32, 32, 3)
    gray = tf.io.decode_jpeg(images["a_gray"], channels=1).numpy()
    np.testing.assert_array_equal(pixels[0], np.repeat(gray, 3, axis=-1))
    # CMYK through a colour conversion (and two JPEG encodings): close to the RGB shown.
    assert np.abs(pixels[1] - random_pixels(32, 32, 3, seed=3)).mean() < 4
    np.testing.assert_array_equal(pixels[2], random_pixels(32, 32, 3, seed=2))
    np.testing.assert_array_equal(pixels[3], random_pixels(32, 32, 3, seed=4))  # alpha dropped


def test_a_damaged_tfrecord_file_is_named(tmp_path, caplog):
    records = [(jpeg_bytes(16, 16, seed=i), i) for i in range(6)]
    paths = write_records(tmp_path, "train", [records[:3], records[3:]])
    truncate(paths[1], keep=0.6)  # the last record of the second file is cut
    options = dict(split="train", batch_size=2, image_size=8, is_training=False)
    spec = build_dataset("tfrecord", **options, data_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        labels = [int(y) for _, batch in spec.dataset for y in batch]
    assert 5 not in labels and {0, 1, 2, 3} <= set(labels)
    assert f"TFRecord file {paths[1]} is damaged" in caplog.text
    assert str(paths[0]) not in caplog.text
    # Without a manifest the split's records are counted first: the damage is found then.
    (tmp_path / imagenet.MANIFEST_NAME).unlink()
    with pytest.raises(ValueError, match=f"TFRecord file '{paths[1]}' is damaged"):
        build_dataset("tfrecord", **options, data_dir=str(tmp_path))


def test_labels_out_of_range_are_an_error_not_a_skip(tmp_path):
    records = [(jpeg_bytes(16, 16, seed=i), i) for i in range(6)]
    write_records(tmp_path, "train", [records])
    options = dict(split="train", batch_size=2, image_size=8, is_training=False)
    spec = build_dataset("tfrecord", **options, data_dir=str(tmp_path), num_classes=4)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"outside \[0, num_classes=4\)"):
        for _ in spec.dataset:
            pass
    spec = build_dataset("tfrecord", **options, data_dir=str(tmp_path), num_classes=6)
    assert sum(int(y.shape[0]) for _, y in spec.dataset) == 6
    # Sources that know their classes refuse too few up front.
    class_folders(tmp_path / "folders", "train", {c: [records[0][0]] for c in "abc"})
    with pytest.raises(ValueError, match="num_classes=2 but .* has 3 classes"):
        build_dataset("folder", **options, data_dir=str(tmp_path / "folders"), num_classes=2)
    LarsTfThreeClasses(data_dir=str(tmp_path / "tfds")).download_and_prepare()
    source = "tfds:lars_tf_three_classes"
    with pytest.raises(ValueError, match="num_classes=2 but .*'label' feature has 3 classes"):
        build_dataset(source, **options, data_dir=str(tmp_path / "tfds"), num_classes=2)
    spec = build_dataset(source, **options, data_dir=str(tmp_path / "tfds"))
    assert spec.num_classes == 3 and sum(int(y.shape[0]) for _, y in spec.dataset) == 3
    with pytest.raises(ValueError, match="tensorflow-datasets has no dataset 'no_such_data'"):
        build_dataset("tfds:no_such_data", **options, data_dir=str(tmp_path / "tfds"))


LarsTfThreeClasses = tfds_builder(
    "LarsTfThreeClasses", num_classes=3, splits={"train": (0, 3, 16, 16)}
)


@pytest.mark.slow
def test_training_skips_corrupt_images_and_reads_past_a_truncated_shard(tmp_path, mark):
    data = tmp_path / "data"
    cmyk = cmyk_jpeg_bytes(40, 40, seed=7) or jpeg_bytes(40, 40, seed=7)
    first = [
        *[(jpeg_bytes(40, 40, seed=i), i % 4) for i in range(3)],
        (jpeg_bytes(40, 40, channels=1, seed=3), 3),
        (cmyk, 0),
        (png_bytes(40, 40, seed=4), 1),  # as ImageNet's one PNG named .JPEG
        (b"this is not an image", 2),
        (jpeg_bytes(40, 40, seed=5)[:150], 3),  # a truncated JPEG
    ]
    second = [(jpeg_bytes(40, 40, seed=10 + i), i % 4) for i in range(4)]
    paths = write_records(data, "train", [first, second])
    truncate(paths[1], keep=0.8)
    write_records(data, "validation", [[(jpeg_bytes(40, 40, seed=20 + i), i) for i in range(4)]])
    proc = train(
        mark,
        *TINY,
        "--dataset=tfrecord",
        f"--data_dir={data}",
        "--num_classes=4",
        "--global_batch_size=4",
        "--train_steps=6",  # 12 examples listed, 3 steps per epoch: 2 epochs, > 2 passes
        "--checkpoint_every_steps=0",
        f"--model_dir={tmp_path / 'run'}",
    )
    assert "Evaluation at step 6 on 4 images" in proc.stdout
    assert f"TFRecord file {paths[1]} is damaged" in proc.stderr
    skipped = int(proc.stderr.split(" corrupt training images were skipped")[0].split()[-1])
    # Each full pass: 2 undecodable images + 1 read error; 24 images need 3 passes of 9.
    assert skipped >= 6, proc.stderr[-3000:]


# --- bad input: flags and data locations --------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs=2", "--warmup_epochs=3"], "--warmup_epochs must be shorter than --epochs"),
        (["--trust_coefficient=-0.001"], "--trust_coefficient must be > 0"),
        (["--trust_coefficient=0"], "--trust_coefficient must be > 0"),
        (["--model=vgg16"], "flag --model=vgg16: value should be one of <alexnet|alexnet_bn|"),
        (
            ["--nosynthetic", "--dataset=lmdb", "--data_dir=/"],
            "--dataset must be one of tfrecord, folder, synthetic, tfds:<name>",
        ),
        (
            ["--nosynthetic", "--dataset=folder", "--data_dir=/nonexistent"],
            "--data_dir does not exist",
        ),
    ],
)
def test_bad_flags_are_refused_when_parsed(argv, message):
    # Parsing is the first thing train.py does (absl's app.run), before main() reads or
    # writes anything; test_train.py shows it for three flags with real processes.
    values = flags.FlagValues()
    train_flags.define_all(values)
    with pytest.raises(flags.IllegalFlagValueError) as error:
        values(["train.py", "--model_dir=/tmp/unused", "--synthetic", *argv])
    assert message in str(error.value)


BAD_RUNS = [
    "warmup_over_train_steps",
    "empty_file_pattern",
    "more_classes_than_num_classes",
    "labels_out_of_range",
]


def _bad_runs(root: Path) -> dict[str, tuple[list[str], str]]:
    """`{case: (argv, expected message)}`; data for them is written under `root`."""
    (root / "empty").mkdir()
    class_folders(root / "three", "train", {c: [jpeg_bytes(16, 16, seed=1)] for c in "abc"})
    labelled = [(jpeg_bytes(40, 40, seed=i), i) for i in range(6)]
    write_records(root / "labels", "train", [labelled])
    write_records(root / "labels", "validation", [labelled[:3]])
    return {
        "warmup_over_train_steps": (
            [*SYNTHETIC, "--global_batch_size=16", "--train_steps=4", "--warmup_epochs=3"],
            "--warmup_epochs=3 is 6 steps at 2 steps per epoch, not shorter than the 4 "
            "training steps",
        ),
        "empty_file_pattern": (
            ["--dataset=tfrecord", f"--data_dir={root / 'empty'}"],
            f"no TFRecord files match '{root / 'empty'}/train-*'",
        ),
        "more_classes_than_num_classes": (
            ["--dataset=folder", f"--data_dir={root / 'three'}", "--num_classes=2"],
            f"num_classes=2 but '{root / 'three'}' has 3 classes",
        ),
        "labels_out_of_range": (
            ["--dataset=tfrecord", f"--data_dir={root / 'labels'}", "--num_classes=3"],
            "a label is outside [0, num_classes=3)",
        ),
    }


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, str]]:
    """Every bad run at once (each is mostly TensorFlow's start-up)."""
    root = tmp_path_factory.mktemp("bad")
    cases = _bad_runs(root)
    assert sorted(cases) == sorted(BAD_RUNS)
    value = uuid.uuid4().hex

    def run(name):
        argv, message = cases[name]
        model_dir = root / "runs" / name
        argv = [*TINY, "--global_batch_size=2", *argv, f"--model_dir={model_dir}"]
        return name, (train(value, *argv, check=False), model_dir, message)

    try:
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            return dict(pool.map(run, cases))
    finally:
        kill_all(value)


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_RUNS)
def test_bad_data_is_refused_with_a_clear_error(bad_runs, case):
    proc, model_dir, message = bad_runs[case]
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert message in output, output[-3000:]
    if case == "labels_out_of_range":
        # Found in the first batch (the labels are in the records): nothing was saved.
        assert not list(model_dir.glob("checkpoints/ckpt-*"))
    else:
        # Refused before anything was written.
        assert not model_dir.exists()
