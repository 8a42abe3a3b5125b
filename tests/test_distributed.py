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
import tensorflow as tf

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
    assert distributed.run_on_root(lambda: 7, "count") == 7
    with pytest.raises(ZeroDivisionError):  # the error itself, nothing to tell other ranks
        distributed.run_on_root(lambda: 1 / 0, "divide")


def test_compression_is_validated():
    with pytest.raises(ValueError, match="compression"):
        distributed.distribute_optimizer(LARS(0.1), compression="int8")
    with pytest.raises(ValueError, match="optimizer"):
        distributed.distribute_optimizer("lars")


# --fp16_allreduce: scaled by an agreed power of two, so small gradients survive float16.


def test_power_of_two_is_exact_over_the_normal_float32_range():
    exponents = np.arange(-126, 128, dtype=np.int32)
    np.testing.assert_array_equal(
        distributed.power_of_two(exponents).numpy(), np.ldexp(np.float32(1.0), exponents)
    )


@pytest.mark.parametrize("workers", [1, 2, 8, 1000])
def test_fp16_scale_puts_the_sum_of_the_largest_elements_just_below_2_to_15(workers):
    max_abs = np.array(
        [1e-30, 6e-8, 1e-7, 3.3e-6, 0.25, 1.0, 1.5, 3e4, 65504.0, 1e9, 1e20], np.float32
    )
    k = distributed.fp16_scale_exponents(max_abs, workers).numpy()
    assert k.dtype == np.int32
    scaled = workers * max_abs.astype(np.float64) * np.ldexp(1.0, k)
    # At most 2**15 (a float16 sum over the workers cannot overflow), and one more doubling
    # would pass it: the largest element uses the top of float16's range.
    assert np.all(scaled <= 2.0**15) and np.all(2 * scaled > 2.0**15), scaled
    # Exactly 2**15 when the bound is a power of two.
    assert distributed.fp16_scale_exponents(np.float32([2.0**-20]), 1).numpy()[0] == 35


def test_fp16_scale_leaves_zero_and_non_finite_tensors_unscaled_and_clips():
    special = np.float32([0.0, np.inf, -np.inf, np.nan, 1e-37, 3e38])
    k = distributed.fp16_scale_exponents(special, 2).numpy()
    # 2e-37 would take 2**136: the scale stops at 2**126, whose inverse is a normal float32;
    # 2 x 3e38 overflows float32 but not the float64 the exponent is computed in.
    np.testing.assert_array_equal(k, [0, 0, 0, 0, 126, -114])


def test_scaled_fp16_sum_keeps_the_norm_that_a_plain_cast_loses():
    # Two workers' gradients of per-element RMS 1e-7, summed in float16 as Horovod sums them.
    rng = np.random.default_rng(0)
    grads = [rng.normal(0.0, 1e-7, (64, 64)).astype(np.float32) for _ in range(2)]
    mean = (grads[0] + grads[1]) / 2
    k = distributed.fp16_scale_exponents([max(np.abs(g).max() for g in grads)], 2)[0]
    summed = distributed.fp16_compress(grads[0], k) + distributed.fp16_compress(grads[1], k)
    assert summed.dtype == tf.float16
    scaled = distributed.fp16_decompress(summed, k, 2, tf.float32).numpy()
    plain = tf.cast(
        (tf.cast(grads[0], tf.float16) + tf.cast(grads[1], tf.float16)) / 2, tf.float32
    ).numpy()

    def norm_error(reduced):
        return abs(np.linalg.norm(reduced) / np.linalg.norm(mean) - 1)

    assert norm_error(scaled) < 1e-4
    # Two float16 roundings (compress, sum) of at most 2**-11 of the largest element each.
    assert np.abs(scaled - mean).max() <= 2**-10 * np.abs(mean).max()
    assert not np.any(scaled == 0)
    assert norm_error(plain) > 0.02 and np.mean(plain == 0) > 0.2


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


@pytest.mark.horovod
@pytest.mark.slow
def test_fp16_allreduce_keeps_the_norms_of_small_gradients(tmp_path):
    # Two real workers, gradients of RMS 1e-7 (the norms LARS divides by). Scaled float16
    # must give the float32 all-reduce's norms to 1e-4 and every element to two float16
    # roundings of the tensor's largest; the plain cast it replaces must visibly not.
    script = Path(__file__).parent / "hvd_scripts" / "fp16_allreduce.py"
    proc = subprocess.run(
        horovodrun(2, str(script), str(tmp_path)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    names = ["small_conv", "small_dense", "unit", "large", "zeros"]
    for result in ranks:
        assert int(result["world"]) == 2
        for name in names:
            reference = result[f"float32/{name}"]
            np.testing.assert_allclose(
                reference, (ranks[0][f"local/{name}"] + ranks[1][f"local/{name}"]) / 2, rtol=1e-6
            )
            scaled = result[f"scaled_fp16/{name}"]
            assert scaled.dtype == np.float32
            np.testing.assert_array_equal(result[f"scaled_fp16_traced/{name}"], scaled)
            np.testing.assert_array_equal(scaled, ranks[0][f"scaled_fp16/{name}"])
            if name == "zeros":
                np.testing.assert_array_equal(scaled, 0.0)
                continue
            norm = np.linalg.norm(reference)
            assert abs(np.linalg.norm(scaled) / norm - 1) < 1e-4, name
            assert np.abs(scaled - reference).max() <= 2**-10 * np.abs(reference).max(), name
    plain = ranks[0]
    for name in ("small_conv", "small_dense"):
        reference = plain[f"float32/{name}"]
        cast = plain[f"plain_fp16/{name}"]
        assert np.linalg.norm(cast - reference) / np.linalg.norm(reference) > 0.1, name
        assert np.mean(cast == 0) > 0.1, name
    assert not np.isfinite(plain["plain_fp16/large"]).all()  # the float16 sum overflowed
