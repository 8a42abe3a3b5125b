"""train.py end to end: single process and `horovodrun -np 2`, synthetic and real JPEGs,
resume after SIGTERM, NaN stop, and flags rejected before anything is written.

Every run is a real subprocess of train.py on a tiny AlexNet-BN (width 1/8, ungrouped convs)
for a few steps of a few images.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from checkpoint_files import checkpoint_values
from jpeg_fixtures import jpeg_bytes

from lars_tf import checkpoint, evaluation, guard, trainer

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
TRAIN_PY = str(REPO / "train.py")
TIMEOUT = 300
TINY = [
    "--model=alexnet_bn_small",
    "--width_multiplier=0.125",
    "--groups=1",
    "--image_size=32",
    "--global_batch_size=16",
    "--eval_batch_size=16",
    "--log_every_steps=1",
]
SYNTHETIC = ["--synthetic", "--synthetic_examples=32", "--num_classes=10"]


def _env() -> dict[str, str]:
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1")


def _horovodrun(np_: int) -> list[str]:
    runner = Path(sys.executable).with_name("horovodrun")
    return [str(runner), "-np", str(np_), "-H", f"localhost:{np_}", "--gloo"]


def train(*argv: str, workers: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, TRAIN_PY, *argv]
    if workers > 1:
        command = _horovodrun(workers) + command
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("setting, expected", [(None, "1 True"), ("0", "0 False")])
def test_train_py_turns_onednn_on_unless_the_user_chose(setting, expected):
    # TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it is imported: train.py must set it
    # before its own imports, and leave a user's choice alone. IsMklEnabled is what TF's
    # start-up line reports ("oneDNN custom operations are on").
    env = {k: v for k, v in _env().items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    probe = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); import train; "
        "from tensorflow.python.util import _pywrap_util_port as port; "
        "print(os.environ['TF_ENABLE_ONEDNN_OPTS'], port.IsMklEnabled())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(REPO)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == expected


def test_plan_segments_finish_a_partial_epoch_first():
    Segment = trainer.Segment
    assert trainer.plan_segments(0, 10, 4) == [Segment(0, 3, 4, 0)]  # last epoch cut at 10
    assert trainer.plan_segments(6, 10, 4) == [Segment(1, 2, 2, 1), Segment(2, 3, 4, 2)]
    assert trainer.plan_segments(8, 12, 4) == [Segment(2, 3, 4, 2)]
    assert trainer.plan_segments(10, 10, 4) == []


def test_checkpointer_keeps_the_last_good_checkpoint(tmp_path):
    import keras

    from lars_tf.optimizer import LARS

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = LARS(0.1)
    optimizer.build(model.trainable_variables)
    checkpointer = checkpoint.Checkpointer(tmp_path, model, optimizer, max_to_keep=2)
    assert checkpointer.restore_latest() == 0
    good = checkpointer.save(images_seen=128, step=1)
    model.layers[0].kernel.assign(np.full((3, 2), np.nan, np.float32))
    with pytest.raises(FloatingPointError, match="step 2"):
        checkpointer.save(images_seen=256, step=2)
    assert checkpointer.latest == good
    assert checkpointer.restore_latest() == 128
    assert np.isfinite(model.layers[0].kernel.numpy()).all()


@pytest.mark.parametrize("bad", ["loss", "weights"])
def test_a_nan_keeps_the_checkpoints_before_the_first_bad_state(tmp_path, bad):
    """Update 3's loss is NaN (so the weights after update 2, saved as ckpt-2, are bad), or
    update 3 makes the weights non-finite from a finite loss (ckpt-2 is good): either way
    `failed_step` is the first bad state and every checkpoint before it is kept."""
    from lars_tf.optimizer import LARS

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = LARS(0.1)
    optimizer.build(model.trainable_variables)
    checkpointer = checkpoint.Checkpointer(tmp_path, model, optimizer, max_to_keep=5)
    run_guard = guard.RunGuard(total_batches=10)
    saver = checkpoint.CheckpointCallback(checkpointer, run_guard, 4, every_n_steps=1)
    for callback in (run_guard, saver):
        callback.set_model(model)
    for batch in range(3):
        if batch == 2 and bad == "weights":
            model.layers[0].kernel.assign(np.full((3, 2), np.inf, np.float32))
        loss = np.nan if batch == 2 and bad == "loss" else 1.0
        for callback in (run_guard, saver):
            callback.on_train_batch_end(batch, {"loss": loss})
    assert run_guard.stop_reason == "nan" and model.stop_training
    assert run_guard.failed_step == {"loss": 2, "weights": 3}[bad]
    kept = {"loss": "ckpt-1", "weights": "ckpt-2"}[bad]
    assert checkpointer.latest.endswith(kept)
    saver.on_train_end()  # nothing more is saved
    assert checkpointer.latest.endswith(kept)


def test_a_checkpoint_of_another_configuration_is_refused_with_the_reason(tmp_path):
    import keras

    from lars_tf.optimizer import LARS

    def setup(layers):
        model = keras.Sequential([keras.Input((3,)), *layers, keras.layers.Dense(2)])
        optimizer = LARS(0.1)
        optimizer.build(model.trainable_variables)
        return checkpoint.Checkpointer(tmp_path, model, optimizer)

    written = setup([]).save(images_seen=64, step=1)
    # One layer more (as --normalize_on_device adds in front of a model): not a partial restore.
    with pytest.raises(ValueError, match="does not match this model and optimizer") as error:
        setup([keras.layers.Dense(3)]).restore_latest()
    assert written in str(error.value) and "flags.txt" in str(error.value)


def test_a_damaged_checkpoint_is_refused_naming_it(tmp_path):
    import keras

    from lars_tf.optimizer import LARS

    def setup():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(64), keras.layers.Dense(2)])
        optimizer = LARS(0.1)
        optimizer.build(model.trainable_variables)
        return checkpoint.Checkpointer(tmp_path, model, optimizer)

    written = setup().save(images_seen=64, step=1)
    (data,) = tmp_path.glob("ckpt-1.data-*")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # a copy cut short
    with pytest.raises(ValueError, match="cannot be read: its files are damaged") as error:
        setup().restore_latest()
    assert written in str(error.value) and "TensorFlow says:" in str(error.value)


def test_normalising_in_tf_data_instead_of_on_the_device_trains_too(tmp_path):
    # --normalize_on_device (default) moves the normalisation into the model; the other
    # placement must still run end to end (the equality of both is tested in test_models
    # and test_data).
    proc = train(
        *TINY,
        *SYNTHETIC,
        "--nonormalize_on_device",
        "--train_steps=2",
        "--eval_steps=1",
        f"--model_dir={tmp_path / 'run'}",
    )
    assert "Evaluation at step 2 on 16 images" in proc.stdout
    assert json.loads((tmp_path / "run" / "results.json").read_text())["step"] == 2


def test_single_process_synthetic_run_writes_everything(tmp_path):
    model_dir = tmp_path / "run"
    proc = train(
        *TINY,
        *SYNTHETIC,
        "--train_steps=6",
        "--checkpoint_every_steps=2",
        "--keep_checkpoints=2",
        "--eval_steps=2",
        f"--model_dir={model_dir}",
    )
    assert "Evaluation at step 6 on 32 images" in proc.stdout
    # Per-epoch line: loss, top-1, top-5, learning rate, images/s, validation numbers.
    epoch_lines = [line for line in proc.stdout.splitlines() if "images_per_sec" in line]
    assert len(epoch_lines) == 3
    for key in ("loss", "top1", "top5", "learning_rate", "val_top1", "val_top5"):
        assert f" {key}: " in epoch_lines[-1]

    with open(model_dir / "training_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert float(rows[0]["learning_rate"]) > float(rows[-1]["learning_rate"])  # poly decay
    assert float(rows[-1]["images_per_sec"]) > 0
    results = json.loads((model_dir / "results.json").read_text())
    assert results["step"] == 6 and results["examples"] == 32
    assert 0.0 <= results["top1"] <= results["top5"] <= 1.0
    plan = json.loads((model_dir / "plan.json").read_text())
    assert plan["per_worker_batch_size"] == 16 and plan["total_updates"] == 6
    assert "--global_batch_size=16" in (model_dir / "flags.txt").read_text()
    # Only the newest checkpoints are kept; TensorBoard has epoch scalars and trust ratios.
    names = sorted(p.name for p in (model_dir / "checkpoints").glob("*.index"))
    assert names == ["ckpt-4.index", "ckpt-6.index"]
    for sub in ("train", "validation", "layers"):
        assert list((model_dir / "tensorboard" / sub).glob("events.out.tfevents.*")), sub
    values = checkpoint_values(model_dir)
    assert any(v.dtype == np.int64 and v.shape == () and v == 6 * 16 for v in values.values())


@pytest.fixture
def one_image_folder(tmp_path) -> Path:
    """A JPEG folder whose training split is one real JPEG, four times (and an empty second
    class): an epoch of 4 steps at batch 1, each on the same image."""
    root = tmp_path / "jpegs"
    (root / "train" / "a").mkdir(parents=True)
    (root / "train" / "b").mkdir(parents=True)
    image = jpeg_bytes(40, 40, seed=1)
    for i in range(4):
        (root / "train" / "a" / f"{i}.jpg").write_bytes(image)
    for label, seed in (("a", 2), ("b", 3)):
        (root / "validation" / label).mkdir(parents=True)
        (root / "validation" / label / "0.jpg").write_bytes(jpeg_bytes(40, 40, seed=seed))
    return root


@pytest.mark.slow
def test_resume_after_sigterm_continues_the_same_run(tmp_path, one_image_folder):
    # Every step trains on the same single image (batch 1, nothing random in the
    # preprocessing, deterministic ops): whatever the data order, a run interrupted by SIGTERM
    # and rerun must end exactly where an uninterrupted run ends. That needs the right step,
    # learning rate (warm-up for 5 steps, then poly decay), momentum and batch-norm statistics
    # after the restart. An epoch is 4 steps (not 1: --deterministic rebuilds the input
    # pipeline for each epoch, about 0.4 s each here), so the stop may fall inside one. The
    # images being one, this test cannot see which batches a resume skips: the fault tests
    # (tests/test_engine_faults.py, distinct images, shuffled) do; a resume at an epoch's
    # end: tests/test_engines.py.
    every = 2  # --checkpoint_every_steps
    common = [
        *TINY,
        "--global_batch_size=1",
        "--dataset=folder",
        f"--data_dir={one_image_folder}",
        "--preprocessing=eval",
        "--dropout=0",
        "--deterministic",
        "--train_steps=40",
        "--warmup_epochs=1.25",  # 5 steps
        "--learning_rate=5",
        f"--checkpoint_every_steps={every}",
        "--eval_every_epochs=0",
        "--log_every_steps=0",
    ]
    reference = tmp_path / "reference"
    train(*common, f"--model_dir={reference}")

    resumed = tmp_path / "resumed"
    command = [sys.executable, TRAIN_PY, *common, f"--model_dir={resumed}"]
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    index = resumed / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + TIMEOUT
    while not index.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = (out.decode() for out in proc.communicate(timeout=TIMEOUT))
    assert proc.returncode == 143, stdout[-3000:] + stderr[-3000:]
    stopped = int(stdout.split("SIGTERM: stopped at step ")[1].split(";")[0])
    assert 2 <= stopped < 40
    assert tf.train.latest_checkpoint(str(resumed / "checkpoints")).endswith(f"ckpt-{stopped}")

    proc = train(*common, f"--model_dir={resumed}")
    assert f"Resuming from {resumed}/checkpoints/ckpt-{stopped} at step {stopped}." in proc.stdout
    assert "Evaluation at step 40" in proc.stdout
    expected, actual = checkpoint_values(reference), checkpoint_values(resumed)
    assert expected.keys() == actual.keys()
    # The stop's own checkpoint is one save more, unless it fell on a periodic one.
    saves = "save_counter/.ATTRIBUTES/VARIABLE_VALUE"
    assert actual.pop(saves) == expected.pop(saves) + (stopped % every != 0)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, atol=1e-9, err_msg=name)
    with open(resumed / "training_log.csv") as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    # 4 steps per epoch, the log continues without a gap. An epoch the stop cut is logged twice,
    # each row its own part of it (tools/plot_run.py keeps the last).
    cut = [stopped // 4] if stopped % 4 else []
    assert epochs == sorted([*range(10), *cut])


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model_dir = tmp_path / "run"
    proc = train(
        *TINY,
        *SYNTHETIC,
        "--optimizer=sgd",
        "--learning_rate=1e25",  # the first update makes the logits overflow
        "--train_steps=20",
        "--checkpoint_every_steps=1",
        "--log_every_steps=0",
        f"--model_dir={model_dir}",
        check=False,
    )
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the loss or the weights became NaN or Inf at step" in proc.stdout
    step = int(proc.stdout.split("NaN or Inf at step ")[1].split(".")[0])
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    assert latest is None or int(latest.rsplit("-", 1)[1]) <= step
    if latest is not None:
        assert all(np.isfinite(v).all() for v in checkpoint_values(model_dir).values())
    assert not (model_dir / "results.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--global_batch_size=30", "--grad_accum_steps=4"], "--global_batch_size=30"),
        (["--flagfile=/nonexistent/recipe.cfg"], "/nonexistent/recipe.cfg"),
        (["--learning_rate=-0.1"], "--learning_rate must be > 0"),
    ],
)
def test_bad_flags_fail_before_writing_anything(tmp_path, argv, message):
    model_dir = tmp_path / "run"
    proc = train(*TINY, *SYNTHETIC, f"--model_dir={model_dir}", *argv, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not model_dir.exists()


@pytest.mark.horovod
@pytest.mark.slow
def test_two_workers_synthetic_end_identical(tmp_path):
    model_dir = tmp_path / "run"
    proc = train(
        *TINY,
        *SYNTHETIC,
        "--grad_accum_steps=2",
        "--train_steps=4",
        "--checkpoint_every_steps=2",
        "--eval_steps=1",
        f"--model_dir={model_dir}",
        workers=2,
    )
    assert "identical on all 2 workers" in proc.stdout
    assert "2 worker(s) x 4 x 2 accumulation = global batch 16" in proc.stdout
    assert proc.stdout.count("Evaluation at step 4") == 1  # rank 0 only
    assert json.loads((model_dir / "results.json").read_text())["examples"] == 2 * 16


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory) -> Path:
    """A 2-class JPEG folder tree (train/, validation/) of real CIFAR-10 images."""
    if not CIFAR.exists():
        pytest.skip(f"shared data not found at {CIFAR}")
    root = tmp_path_factory.mktemp("cifar")
    wanted = {"airplane": 0, "automobile": 0}
    with tarfile.open(CIFAR, "r:gz") as archive:
        for member in archive:
            parts = member.name.split("/")
            if len(parts) != 3 or parts[0] != "train" or parts[1] not in wanted:
                if all(n >= 48 for n in wanted.values()):
                    break
                continue
            n = wanted[parts[1]]
            if n >= 48:
                continue
            wanted[parts[1]] += 1
            split = "train" if n < 32 else "validation"
            target = root / split / parts[1] / parts[2]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
    return root


REAL = [
    "--dataset=folder",
    "--preprocessing=cifar",
    "--mean=125.31,122.95,113.87",
    "--std=62.99,62.09,66.70",
    "--train_steps=4",
    "--checkpoint_every_steps=0",
]


def test_single_process_real_jpegs(tmp_path, cifar_folder):
    proc = train(*TINY, *REAL, f"--data_dir={cifar_folder}", f"--model_dir={tmp_path / 'run'}")
    assert "on 64 images" in proc.stdout
    assert "Evaluation at step 4 on 32 images" in proc.stdout


@pytest.mark.horovod
@pytest.mark.slow
def test_two_workers_real_jpegs_end_identical(tmp_path, cifar_folder):
    proc = train(
        *TINY,
        *REAL,
        f"--data_dir={cifar_folder}",
        f"--model_dir={tmp_path / 'run'}",
        workers=2,
    )
    assert "identical on all 2 workers" in proc.stdout
    assert "Evaluation at step 4 on 32 images" in proc.stdout  # the two shards together


PROGRESS = re.compile(
    r"update (\d+)/(\d+) \(epoch ([\d.]+)\) loss ([\d.]+) top1 ([\d.]+)% (\d+) images/s "
    r"lr ([\d.e+-]+) elapsed (\d+):(\d\d):(\d\d) eta (\d+):(\d\d):(\d\d)"
)


def _seconds(h: str, m: str, s: str) -> int:
    return 3600 * int(h) + 60 * int(m) + int(s)


def test_two_workers_print_progress_lines_and_synthetic_skips_evaluation(tmp_path):
    """Under horovodrun stdout is a pipe: rank 0 prints a line every 2 updates with numbers
    that agree with the run; the synthetic run evaluates nothing by default."""
    model_dir = tmp_path / "run"
    proc = train(
        *TINY,
        "--synthetic",
        "--synthetic_examples=64",
        "--num_classes=10",
        "--grad_accum_steps=2",
        "--train_steps=12",
        "--progress_every_steps=2",
        "--checkpoint_every_steps=0",
        f"--model_dir={model_dir}",
        workers=2,
    )
    lines = PROGRESS.findall(proc.stdout)
    assert [int(m[0]) for m in lines] == [2, 4, 6, 8, 10, 12], proc.stdout[-3000:]
    assert {int(m[1]) for m in lines} == {12}
    # 64 examples / global batch 16 = 4 updates per epoch.
    assert [float(m[2]) for m in lines] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    # images/s of each interval within the range of the run's own per-epoch measurements.
    epochs = list(csv.DictReader((model_dir / "training_log.csv").open()))
    measured = [float(row["images_per_sec"]) for row in epochs]
    assert len(measured) == 3
    rates = [int(m[5]) for m in lines[1:]]  # the first interval includes tracing
    assert all(min(measured) / 4 <= r <= max(measured) * 4 for r in rates), (rates, measured)
    etas = [_seconds(*m[10:13]) for m in lines]
    assert etas[-1] == 0 and etas[-1] <= etas[1] <= etas[0], etas
    elapsed = [_seconds(*m[7:10]) for m in lines]
    assert elapsed == sorted(elapsed)
    # Only rank 0 prints.
    assert proc.stdout.count("update 12/12") == 1
    assert "not evaluated" in proc.stdout and "Evaluation at step" not in proc.stdout
    assert json.loads((model_dir / "results.json").read_text()) == {"step": 12}
    # (Keras' CSVLogger adds val_ columns of its own, empty here.)
    assert all(row.get("val_top1", "NA") == "NA" for row in epochs)


def test_progress_line_numbers():
    from lars_tf.progress import ProgressLogger

    logger = ProgressLogger(
        total_updates=100,
        start_update=20,
        updates_per_epoch=40,
        images_per_update=512,
        every_n_updates=10,
        learning_rate=lambda: 0.25,
    )
    logger._started, logger._last = 1000.0, (1000.0, 20)
    line = logger.line(30, {"loss": 2.5, "top1": 0.125}, now=1010.0)
    # 10 updates x 512 images in 10 s; 10 s for 10 updates, 70 to go.
    assert line == (
        "update 30/100 (epoch 0.75) loss 2.5000 top1 12.50% 512 images/s lr 0.25 "
        "elapsed 0:00:10 eta 0:01:10"
    )
    line = logger.line(40, {}, now=1030.0)
    assert line.endswith("256 images/s lr 0.25 elapsed 0:00:30 eta 0:01:30")


def test_target_accuracy_stops_at_the_first_evaluation_that_reaches_it(monkeypatch):
    """A real `fit` of 5 epochs whose evaluations (stubbed: 0.3, 0.6, 0.8, ...) reach the
    target 0.75 at the third: the run stops there and records that epoch and update."""
    scores = iter([0.3, 0.6, 0.8, 0.9, 0.95])
    evaluated = []

    def fake_evaluate(model, dataset, steps=None, engine=None):
        evaluated.append(1)
        return {"loss": 1.0, "top1": next(scores), "top5": 1.0, "examples": 8}

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    x = np.zeros((8, 2), "float32")
    y = np.zeros((8,), "int32")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    run_guard = guard.RunGuard(total_batches=5 * 4)
    callback = evaluation.EvaluationCallback(None, run_guard, every_n_epochs=1, target_top1=0.75)
    history = model.fit(x, y, batch_size=2, epochs=5, callbacks=[run_guard, callback], verbose=0)
    assert len(history.history["loss"]) == 3 and len(evaluated) == 3
    assert run_guard.stop_reason == "target"
    assert callback.target_reached == {"epoch": 3, "update": 12, "top1": 0.8}


def test_label_smoothing_and_an_unreached_target_in_a_run(tmp_path):
    model_dir = tmp_path / "run"
    proc = train(
        *TINY,
        *SYNTHETIC,
        "--train_steps=2",
        "--eval_steps=1",
        "--label_smoothing=0.1",
        "--target_accuracy=1.0",
        f"--model_dir={model_dir}",
    )
    assert "Target top-1 100.00% not reached." in proc.stdout
    results = json.loads((model_dir / "results.json").read_text())
    assert results["target_accuracy"] == 1.0 and results["target_reached"] is None
    assert "--label_smoothing=0.1" in (model_dir / "flags.txt").read_text()
