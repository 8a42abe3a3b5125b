"""The engines (lars_tf.engines) under train.py: launches refused, replicas equal to one device.

Every run is a real `train.py` process. "Two replicas at B/2 equal one device at B" is checked
on checkpoints: the engines that keep one replica per device with its own batch-norm
statistics (tf_distribute, Horovod) are compared on a model without batch norm and dropout,
where the update is the same sum of gradients; JAX's DataParallel computes the global batch
in one XLA program, so its batch norm sees the whole batch and it is compared with it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from checkpoint_files import checkpoint_values
from engine_runs import (
    ACROSS_BACKENDS,
    HOROVOD_ENV,
    HOROVODRUN_2,
    PLAIN,
    REPO,
    SYNTHETIC,
    TINY,
    TOLERANCE,
    array_checkpoint,
    array_entries,
    assert_close,
    assert_same_progress,
    environment,
    run,
    run_jax_processes,
    run_processes,
    tf_config_job,
    trainable_weights,
)
from jpeg_fixtures import jpeg_bytes

from lars_tf.engines import launch, tf_distribute

TF_WORKERS = REPO / "tests" / "scripts" / "tf_workers.py"

sys.path.insert(0, str(REPO))  # train_flags lives at the top level, beside train.py
import train_flags  # noqa: E402


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
        ("tf_distribute", {"TF_CONFIG": TF_CONFIG_2}, 3, "--num_workers=3 but this --engine=tf_"),
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
    launch.check_launch("tf_distribute", {"TF_CONFIG": TF_CONFIG_2}, expected_workers=2)
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
        (
            ["--engine=tf_distribute", "--cpu_devices=2"],
            {"TF_CONFIG": TF_CONFIG_2},
            "--cpu_devices=2 with a TF_CONFIG of 2 workers",
        ),
        (
            ["--engine=tf_distribute", "--cpu_devices=2", "--grad_accum_steps=2"],
            {},
            "Keras 3's gradient accumulation fails under MirroredStrategy",
        ),
        (
            ["--engine=tf_distribute", "--cpu_devices=2", "--xla"],
            {},
            "--xla on 2 tf.distribute replicas",
        ),
        (["--engine=jax", "--fp16_allreduce"], {}, "--fp16_allreduce is Horovod's compression"),
        (["--cpu_devices=2"], {}, "--cpu_devices is for --engine=tf_distribute and jax"),
        # absl's enum check names the engines before train.py's own launch check runs.
        (["--engine=mpi"], {}, "--engine=mpi: value should be one of <horovod|tf_distribute|jax>"),
        ([], {"KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}, "launch with horovodrun instead"),
        (
            ["--engine=tf_distribute", "--num_workers=2"],
            {"TF_CONFIG": TF_CONFIG_1},
            "--num_workers=2 but this --engine=tf_distribute launch has 1",
        ),
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
    """The weights train.py's model of `argv` starts from, saved as a Keras .weights.h5.

    Seeded, so that every run of a test starts from the same weights. Unseeded, about one
    pytest run in five drew weights with a ReLU at a kink: one conv4 output of the batch-norm
    test's failing weights was -1.2e-7 (its channel's |x| ~0.14), within float32 rounding of
    0. The 1-process batch and the 2 processes' global batch hold the same 16 images in
    another order, the sums round differently, and that one ReLU opens in one program and not
    the other. Every gradient below it (conv1..conv4, through the batch norms) then differs
    by about 1% of its norm, all of conv4's in output channel 32 alone, while the first
    update's gradients of conv5 and fc6..fc8 agree to 6e-7 of theirs. Each program computes,
    in float32, the gradient on its own side of the ReLU's jump at 0 (float64 agrees with
    the one-process order to 7e-7); one process fed those images in some orders shows the
    same 1% difference, on TensorFlow too. So no engine is wrong, and the measured rate is
    two runs of ten of one test.
    """
    import keras

    keras.utils.set_random_seed(0)
    fv = flags.FlagValues()
    train_flags.define_all(fv)
    fv(["train.py", *argv, "--model_dir=unused"])
    train_flags.build_model(10, (32, 32, 3), fv).save_weights(path)
    return path


@pytest.mark.slow
def test_the_three_engines_end_alike_and_resume_on_another_replica_count(tmp_path):
    # Runs of 3 updates resumed to 5 must follow the uninterrupted 5-update reference: a
    # multistep rate (poly decays to the last update, which the resume moves) and, with
    # --deterministic, the same input for every epoch however the run was cut (without it, a
    # resumed run rebuilds its input at the next epoch with the seed offset by the epoch:
    # another synthetic batch).
    # The rate drops x0.1 at epoch 1 (update 5, 4 updates per epoch): an update counter off
    # by one after the resume would show in the weights.
    exact = ["--lr_schedule=multistep", "--lr_decay_epochs=1", "--deterministic"]
    base = [*TINY, *SYNTHETIC, *PLAIN, *exact]
    init = initial_weights(tmp_path / "init.weights.h5", base)
    fresh = [*base, f"--init_weights={init}"]
    common = [*fresh, "--train_steps=3", "--checkpoint_every_steps=0"]
    horovod, mirrored, jax = tmp_path / "horovod", tmp_path / "mirrored", tmp_path / "jax"
    # The reference: Horovod's one worker, 5 updates uninterrupted, every one checkpointed.
    run(*fresh, "--train_steps=5", "--checkpoint_every_steps=1", f"--model_dir={horovod}")
    proc = run(*common, "--engine=tf_distribute", "--cpu_devices=2", f"--model_dir={mirrored}")
    assert "engine tf_distribute: 1 process(es), 2 replica(s)" in proc.stdout
    assert json.loads((mirrored / "plan.json").read_text())["replicas"] == 2
    proc = run(*common, "--engine=jax", "--cpu_devices=2", f"--model_dir={jax}")
    assert "engine jax: 1 process(es), 2 replica(s)" in proc.stdout

    def assert_all_close(step: int) -> None:
        reference = checkpoint_values(horovod, step=step)
        assert_close(checkpoint_values(mirrored), reference, **TOLERANCE)
        assert_same_progress(checkpoint_values(mirrored), reference)
        # JAX: the model's variables come first in its archive; without batch norm and
        # dropout they are the trainable weights. XLA's CPU kernels round otherwise than
        # TensorFlow's.
        expected = trainable_weights(reference)
        actual = [value for _, value in array_entries(jax)[1 : len(expected) + 1]]
        assert len(expected) == 16 and [a.shape for a in actual] == [e.shape for e in expected]
        for a, e in zip(actual, expected, strict=True):
            np.testing.assert_allclose(a, e, err_msg=f"update {step}", **ACROSS_BACKENDS)

    assert_all_close(step=3)
    # Each continues on one device (another replica count), to update 5, printing the
    # progress lines of a batch job (stdout is a pipe here) as Horovod's runs do, and ends
    # where the uninterrupted reference did.
    for engine, model_dir in (("tf_distribute", mirrored), ("jax", jax)):
        # A resume: the weights come from the checkpoint.
        longer = [*base, "--train_steps=5", "--checkpoint_every_steps=0"]
        proc = run(
            *longer, "--progress_every_steps=1", f"--engine={engine}", f"--model_dir={model_dir}"
        )
        assert f"Resuming from {model_dir}/checkpoints/ckpt-3" in proc.stdout
        assert json.loads((model_dir / "results.json").read_text())["step"] == 5
        updates = re.findall(r"^update (\d+)/5 \(epoch [\d.]+\) loss ", proc.stdout, re.M)
        assert updates == ["4", "5"], (engine, proc.stdout[-2000:])
    assert_all_close(step=5)


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
    proc = run(*plain, "--grad_accum_steps=2", f"--model_dir={accumulated}")
    assert "1 worker(s) x 4 x 2 accumulation = global batch 8" in proc.stdout
    stored = array_checkpoint(accumulated)
    # Two micro-batches per update really ran: the accumulators exist, 3 updates of 8 images.
    assert [k for k in stored if "_gradient_accumulator" in k]
    assert int(stored["images_seen"]) == int(array_checkpoint(whole)["images_seen"]) == 24
    assert_close(stored, array_checkpoint(whole), extra="_gradient_accumulator", **TOLERANCE)


@pytest.mark.slow
@pytest.mark.horovod
def test_two_processes_equal_one_and_resume_on_one_under_horovod_and_jax(tmp_path, jpeg_folder):
    # Each process reads its own shard (auto_shard_dataset=False), as each Horovod worker
    # does. At global batch 16 every update is the whole training split (a worker's batch is
    # its whole shard; the order inside a shard depends on its seed, which the engines set
    # differently), so two processes at B/2 must give one process's weights at B. Had the
    # processes not communicated, each would have trained on its own 8 images and ended
    # elsewhere. One update is one epoch here, so every update is checkpointed.
    common = [*TINY, *PLAIN, *jpeg_folder, "--global_batch_size=16", "--num_classes=10"]
    common.append("--checkpoint_every_steps=0")
    # Multistep, x0.1 from epoch 4 (update 5): a 3-update run resumed to 5 then follows the
    # schedule of a 5-update run (poly's decay to the last update would not), and an update
    # counter off by one would show in the weights.
    common += ["--lr_schedule=multistep", "--lr_decay_epochs=4"]
    init = initial_weights(tmp_path / "init.weights.h5", common)
    fresh = [*common, f"--init_weights={init}"]
    first = [*fresh, "--train_steps=3"]
    longer = [*common, "--train_steps=5"]  # a resume: the weights come from the checkpoint
    horovod2, horovod1 = tmp_path / "horovod2", tmp_path / "horovod1"
    jax2, jax1 = tmp_path / "jax2", tmp_path / "jax1"

    # The references: one process, 5 updates uninterrupted.
    run(*fresh, "--train_steps=5", f"--model_dir={horovod1}")
    run(*fresh, "--train_steps=5", "--engine=jax", f"--model_dir={jax1}")

    proc = run(*first, f"--model_dir={horovod2}", launcher=HOROVODRUN_2, **HOROVOD_ENV)
    assert "2 worker(s) x 8" in proc.stdout, proc.stdout[-2000:]
    assert_close(checkpoint_values(horovod2), checkpoint_values(horovod1, step=3), **TOLERANCE)
    rank0, rank1 = run_jax_processes(*first, f"--model_dir={jax2}")
    assert "engine jax: 2 process(es), 2 replica(s)" in rank0.stdout
    assert "identical on all 2 workers" in rank0.stdout
    assert "Evaluation at step 3" in rank0.stdout and "Evaluation" not in rank1.stdout
    # Both evaluated their shard of the 4 validation images; process 0 wrote the sums.
    assert json.loads((jax2 / "results.json").read_text())["examples"] == 4
    assert_close(array_checkpoint(jax2), array_checkpoint(jax1, step=3), **TOLERANCE)
    # And the two backends agree (XLA's CPU kernels round otherwise than TensorFlow's).
    expected = trainable_weights(checkpoint_values(horovod2))
    actual = [value for _, value in array_entries(jax2)[1 : len(expected) + 1]]
    assert len(expected) == 16 and [a.shape for a in actual] == [e.shape for e in expected]
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, **ACROSS_BACKENDS)

    # Resumed on one process (another worker count), each ends where the uninterrupted
    # one-process run did.
    proc = run(*longer, f"--model_dir={horovod2}")
    assert f"Resuming from {horovod2}/checkpoints/ckpt-3" in proc.stdout
    assert_close(checkpoint_values(horovod2), checkpoint_values(horovod1), **TOLERANCE)
    assert_same_progress(checkpoint_values(horovod2), checkpoint_values(horovod1))
    proc = run(*longer, "--engine=jax", f"--model_dir={jax2}")
    assert f"Resuming from {jax2}/checkpoints/ckpt-3" in proc.stdout
    assert "engine jax: 1 process(es), 1 replica(s)" in proc.stdout
    assert_close(array_checkpoint(jax2), array_checkpoint(jax1), **TOLERANCE)
    assert_same_progress(array_checkpoint(jax2), array_checkpoint(jax1))

    # A checkpoint rank 0 cannot read stops both processes, each saying why. (Two processes
    # resume a run exactly, after kill -9 and after a SIGTERM, logging the per-layer
    # statistics on rank 0: tests/test_engine_faults.py; on another device count:
    # test_the_three_engines_end_alike_...)
    index = json.loads((jax2 / "checkpoints" / "checkpoint.json").read_text())["checkpoints"]
    (jax2 / "checkpoints" / index[-1]).write_bytes(b"damaged")
    failed = run_jax_processes(*common, "--train_steps=7", f"--model_dir={jax2}", check=False)
    assert [p.returncode for p in failed] == [1, 1]
    assert "rank 0 failed to restore the latest checkpoint" in failed[1].stderr
    assert "cannot be read: its file is damaged" in failed[0].stderr + failed[1].stderr


@pytest.mark.slow
def test_two_tf_distribute_workers_equal_one_and_resume_on_other_worker_counts(
    tmp_path, jpeg_folder
):
    # MultiWorkerMirroredStrategy over two processes on localhost (TF_CONFIG), each reading
    # its own shard at B/2, against one tf_distribute process at B: the same flags and
    # schedule as the Horovod and JAX test above (every update is the whole split, one
    # update per epoch, each checkpointed; the rate drops x0.1 at update 5).
    common = [*TINY, *PLAIN, *jpeg_folder, "--global_batch_size=16", "--num_classes=10"]
    common += ["--checkpoint_every_steps=0", "--lr_schedule=multistep", "--lr_decay_epochs=4"]
    init = initial_weights(tmp_path / "init.weights.h5", common)
    workers = dict(engine="tf_distribute")  # run_processes passes --engine itself
    one_process = [*common, "--engine=tf_distribute"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(*one_process, f"--init_weights={init}", "--train_steps=5", f"--model_dir={one}")

    rank0, rank1 = run_processes(
        *common, f"--init_weights={init}", "--train_steps=3", f"--model_dir={two}", **workers
    )
    assert "engine tf_distribute: 2 process(es), 2 replica(s)" in rank0.stdout
    assert "2 worker(s) x 8" in rank0.stdout and "identical on all 2 workers" in rank0.stdout
    assert "Evaluation at step 3" in rank0.stdout and "Evaluation" not in rank1.stdout
    # Both evaluated their shard of the 4 validation images; the chief wrote the sums.
    assert json.loads((two / "results.json").read_text())["examples"] == 4
    assert_close(checkpoint_values(two), checkpoint_values(one, step=3), **TOLERANCE)

    # One worker continues to update 4; two workers again to 5, from the chief's restore
    # sent to the other worker. Each ends where the uninterrupted run did.
    proc = run(*one_process, "--train_steps=4", f"--model_dir={two}")
    assert f"Resuming from {two}/checkpoints/ckpt-3" in proc.stdout
    assert_close(checkpoint_values(two), checkpoint_values(one, step=4), **TOLERANCE)
    rank0, _ = run_processes(*common, "--train_steps=5", f"--model_dir={two}", **workers)
    assert f"Resuming from {two}/checkpoints/ckpt-4" in rank0.stdout
    assert "identical on all 2 workers" in rank0.stdout
    assert_close(checkpoint_values(two), checkpoint_values(one), **TOLERANCE)
    assert_same_progress(checkpoint_values(two), checkpoint_values(one))

    # A checkpoint the chief cannot read stops both workers, each saying why.
    (two / "checkpoints" / "ckpt-5.index").write_bytes(b"damaged")
    failed = run_processes(*common, "--train_steps=7", f"--model_dir={two}", **workers, check=False)
    assert [p.returncode for p in failed] == [1, 1]
    assert "rank 0 failed to restore the latest checkpoint" in failed[1].stderr
    assert "cannot be read" in failed[0].stderr + failed[1].stderr


def test_tf_distribute_workers_share_collectives_and_keep_seeds_of_their_own(tmp_path):
    # Two MultiWorkerMirroredStrategy workers on localhost, each running
    # tests/scripts/tf_workers.py: every collective the trainer uses, checked directly.
    procs = [
        subprocess.Popen(
            [sys.executable, str(TF_WORKERS), str(tmp_path)],
            env=environment(**job),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for job in tf_config_job(2)
    ]
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:  # one worker's failure leaves the other waiting in a collective
            proc.kill()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    assert rank0["workers"] == rank0["replicas"] == 2
    # Worker 1's perturbed kernel is seen by both; after the broadcast both hold rank 0's.
    assert rank0["mismatches_before"] == rank1["mismatches_before"] == ["net/dense/kernel"]
    assert rank0["mismatches_after"] == rank1["mismatches_after"] == []
    assert rank1["kernel_before"] != rank0["kernel_before"]
    assert rank0["kernel"] == rank1["kernel"] == rank0["kernel_before"]
    # The strategy starts every worker with worker 0's seed whatever each one's Keras seed
    # (the workers then drew 2 and 3 times); the broadcast gives replica i rank 0's state
    # with seed + i, so the dropout masks differ.
    (seed, draws), (seed1, draws1) = rank0["states_before"][0], rank1["states_before"][0]
    assert seed1 == seed and (draws, draws1) == (2, 3)
    assert rank0["states_after"] == [[seed, 2]] and rank1["states_after"] == [[seed + 1, 2]]
    assert rank0["states_after_draw"] == [[seed, 3]]
    assert rank1["states_after_draw"] == [[seed + 1, 3]]
    assert rank0["mask"] != rank1["mask"]
    for seen in (rank0, rank1):
        assert seen["moving_mean"] == [5.0] * 16  # (0 + 10) / 2
        assert seen["object"] == {"from": 0, "text": "üüü"}
        assert seen["sum"] == [1.0, 2.0] and seen["max"] == 1.0
        assert seen["logs"] == {"loss": 0.5, "images_per_sec": 150.0}
        assert "synchronized on read (other/on_read/total)" in seen["on_read_error"]
        assert "cannot be sent exactly" in seen["integer_error"]


def test_tf_distribute_devices_of_one_process_keep_seeds_of_their_own(tmp_path):
    # MirroredStrategy over two logical CPUs: both copies of the seed state start equal; the
    # broadcast sets them apart (seed, seed + 1) at the draws counted so far, a draw advances
    # both, and a checkpoint's restore (which assigns every copy the saved one) followed by
    # the broadcast that `restore` always runs gives the same copies again.
    proc = subprocess.run(
        [sys.executable, str(TF_WORKERS), str(tmp_path), "--cpu_devices=2"],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads((tmp_path / "local.json").read_text())
    (seed, draws), copy1 = seen["before"]
    assert copy1 == [seed, draws] and draws == 1
    assert seen["after"] == [[seed, 1], [seed + 1, 1]]
    first, second = seen["masks"]
    assert first != second
    assert seen["after_draw"] == [[seed, 2], [seed + 1, 2]]
    assert seen["restored"] == [[seed, 2], [seed, 2]]
    assert seen["restored_and_broadcast"] == [[seed, 2], [seed + 1, 2]]


def test_tf_config_ranks_count_the_chief_first():
    cluster = {"chief": ["c:1"], "worker": ["w0:1", "w1:1"]}
    ranks = [
        tf_distribute._tf_config_rank({"cluster": cluster, "task": task})
        for task in (
            {"type": "chief", "index": 0},
            {"type": "worker", "index": 0},
            {"type": "worker", "index": 1},
        )
    ]
    assert ranks == [0, 1, 2]
    no_chief = {"cluster": {"worker": ["w0:1", "w1:1"]}, "task": {"type": "worker", "index": 1}}
    assert tf_distribute._tf_config_rank(no_chief) == 1


def test_on_read_variables_names_what_a_chief_only_save_would_hang_on():
    import keras
    import tensorflow as tf

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.total = keras.Variable(0.0, trainable=False, synchronization="on_read", name="total")
    assert tf_distribute.on_read_variables(tf.train.Checkpoint(model=model)) == ["total"]
    plain = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert tf_distribute.on_read_variables(tf.train.Checkpoint(model=plain)) == []


@pytest.mark.slow
def test_jax_two_processes_train_and_reestimate_batch_norm_as_one(tmp_path, jpeg_folder):
    # Batch norm and its re-estimation before the evaluation: DataParallel normalises over
    # the global batch, which each process feeds its shard of (at global batch 16, the whole
    # training split), so two processes compute what one does; the re-estimated statistics
    # are the global batch's too.
    common = [*TINY, "--dropout=0", *jpeg_folder, "--global_batch_size=16", "--num_classes=10"]
    common += ["--train_steps=2", "--bn_recalibration_batches=2"]
    init = initial_weights(tmp_path / "init.weights.h5", common)
    common.append(f"--init_weights={init}")
    one, two = tmp_path / "one", tmp_path / "two"
    run(*common, "--engine=jax", f"--model_dir={one}")
    rank0, _ = run_jax_processes(*common, f"--model_dir={two}")
    assert "engine jax: 2 process(es), 2 replica(s)" in rank0.stdout
    stored, expected = array_checkpoint(two), array_checkpoint(one)
    moving = [k for k in expected if "moving_mean" in k or "moving_variance" in k]
    assert len(moving) >= 4, sorted(expected)
    # Re-estimated: 2 updates at the twin's momentum 0.9 from variance 1 leave each moving
    # variance at 0.81 + 0.19 x the batch's, never below 0.81; the deeper layers' are ~0.02.
    assert any(expected[k].max() < 0.5 for k in moving if "moving_variance" in k)
    assert_close(stored, expected, **TOLERANCE)
    # The momenta (about 1e-6) sit under TOLERANCE's atol: each compared to 1e-4 of its own
    # norm, which a 1% gradient difference (a ReLU at a kink, see initial_weights) exceeds.
    momenta = [k for k in expected if k.endswith("_momentum")]
    assert len(momenta) == 16, sorted(expected)  # a kernel and a bias for each of 8 layers
    for name in momenta:
        difference = np.linalg.norm(stored[name] - expected[name])
        assert difference <= 1e-4 * np.linalg.norm(expected[name]), name
    assert json.loads((two / "results.json").read_text())["examples"] == 4


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
