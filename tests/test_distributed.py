"""lars_tf.distributed: gradient averaging once per update, broadcast, agreement across ranks.

The equivalences run `tests/hvd_scripts/equivalence.py` (a tiny conv net without batch norm
or dropout, LARS with momentum, weight decay, global-norm clipping and a rate that changes at
every update, on a fixed data order) as one process and under `horovodrun -np 2`, and compare
the final weights: 2 workers x B/2 == 1 worker x B, 4 x B/4 accumulated == 1 x B, and both
ranks bit-identical.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from lars_tf import distributed
from lars_tf.optimizer import LARS

SCRIPT = Path(__file__).parent / "hvd_scripts" / "equivalence.py"
REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, STEPS = 16, 3
TIMEOUT = 240


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )


def horovodrun(np_: int, *args: str) -> list[str]:
    runner = Path(sys.executable).with_name("horovodrun")
    runner = str(runner) if runner.exists() else shutil.which("horovodrun")
    assert runner, "horovodrun not found next to the interpreter or on PATH"
    return [runner, "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", sys.executable, *args]


def run_equivalence(out_dir: Path, workers: int, accum: int, *extra: str) -> list[dict]:
    """Run the script; returns each rank's saved arrays."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [str(SCRIPT), str(out_dir), str(GLOBAL_BATCH), str(accum), str(STEPS), *extra]
    command = horovodrun(workers, *args) if workers > 1 else [sys.executable, *args]
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [dict(np.load(out_dir / f"rank{r}.npz")) for r in range(workers)]


def weights(result: dict) -> list[np.ndarray]:
    return [result[k] for k in sorted(result, key=str) if k.startswith("weight_")]


def assert_same_training(actual: dict, expected: dict) -> None:
    assert int(actual["updates"]) == int(expected["updates"]) == STEPS
    np.testing.assert_allclose(actual["learning_rate"], expected["learning_rate"], rtol=1e-6)
    for a, e in zip(weights(actual), weights(expected), strict=True):
        # float32: the sums are taken in a different order, nothing more.
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def assert_ranks_identical(results: list[dict]) -> None:
    for other in results[1:]:
        for a, b in zip(weights(results[0]), weights(other), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def one_worker_full_batch(tmp_path_factory) -> dict:
    return run_equivalence(tmp_path_factory.mktemp("reference"), workers=1, accum=1)[0]


# Single process: the fallback and the Keras hook the averaging relies on.


def test_single_process_is_a_no_op():
    assert distributed.init() == 1
    assert (distributed.size(), distributed.rank(), distributed.is_rank0()) == (1, 0, True)
    assert not distributed.is_distributed()
    optimizer = LARS(0.1, weight_decay=1e-4)
    config = optimizer.get_config()
    assert distributed.distribute_optimizer(optimizer, compression="fp16") is optimizer
    assert "_clip_gradients" not in vars(optimizer)  # nothing patched without workers
    assert optimizer.get_config() == config
    assert distributed.average_logs({"loss": 2.0, "name": "x"}) == {"loss": 2.0, "name": "x"}
    np.testing.assert_array_equal(distributed.allreduce_sum([1.0, 2.0]), [1.0, 2.0])
    assert distributed.allreduce_max(3.0) == 3.0
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


def test_compression_is_validated():
    with pytest.raises(ValueError, match="compression"):
        distributed.distribute_optimizer(LARS(0.1), compression="int8")
    with pytest.raises(ValueError, match="optimizer"):
        distributed.distribute_optimizer("lars")


@pytest.mark.parametrize("accum, micro_steps, updates", [(None, 4, 4), (3, 6, 2)])
def test_keras_clips_once_per_update(accum, micro_steps, updates):
    # distribute_optimizer all-reduces inside `_clip_gradients`: that is only right while
    # Keras calls it once per update (with accumulation: on the update step only, with the
    # accumulated gradients). A Keras release that changes this must fail here.
    optimizer = LARS(0.1, gradient_accumulation_steps=accum)
    variable = keras.Variable(np.ones(3, np.float32))
    optimizer.build([variable])
    seen = []

    def counting_clip(grads):
        seen.append(np.array(grads[0]))
        return type(optimizer)._clip_gradients(optimizer, grads)

    object.__setattr__(optimizer, "_clip_gradients", counting_clip)
    for step in range(micro_steps):
        optimizer.apply([np.full(3, step + 1.0, np.float32)], [variable])
    assert len(seen) == updates
    if accum:  # the mean of the accumulated micro-batches 1,2,3 and 4,5,6
        np.testing.assert_allclose([s[0] for s in seen], [2.0, 5.0])


def test_accumulation_matches_full_batch(tmp_path, one_worker_full_batch):
    accumulated = run_equivalence(tmp_path, workers=1, accum=4)[0]
    assert_same_training(accumulated, one_worker_full_batch)


# Two real Horovod processes.


@pytest.mark.horovod
@pytest.mark.slow
def test_two_workers_match_one_worker(tmp_path, one_worker_full_batch):
    results = run_equivalence(tmp_path, workers=2, accum=1)
    assert [int(r["world"]) for r in results] == [2, 2]
    assert all(bool(r["serializes"]) for r in results)
    assert_ranks_identical(results)
    assert_same_training(results[0], one_worker_full_batch)


@pytest.mark.horovod
@pytest.mark.slow
def test_two_workers_with_accumulation_match_one_worker(tmp_path, one_worker_full_batch):
    results = run_equivalence(tmp_path, workers=2, accum=2)
    assert_ranks_identical(results)
    assert_same_training(results[0], one_worker_full_batch)


@pytest.mark.horovod
@pytest.mark.slow
def test_overflow_on_one_rank_is_skipped_everywhere(tmp_path):
    # Under mixed_float16, only the last rank sees an Inf at update 1. Every rank must skip
    # that update (else one waits in the all-reduce the other never joins, or they diverge).
    results = run_equivalence(
        tmp_path, 2, 2, "--mixed_float16", "--fp16_allreduce", "--poison_last_rank_at=1"
    )
    assert_ranks_identical(results)
    for r in results:
        assert int(r["updates"]) == STEPS - 1
        assert float(r["loss_scale"]) == 2.0**14  # halved once from 2**15
        assert all(np.isfinite(w).all() for w in weights(r))
