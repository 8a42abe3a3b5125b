"""`lars_tf.plan`: a run's lengths in optimizer updates and the conversions to other units."""

from __future__ import annotations

import json

import pytest

from lars_tf.plan import make_plan, per_worker_batch_size


def test_per_worker_batch_size():
    assert per_worker_batch_size(4096, 2, 1) == 2048
    assert per_worker_batch_size(32768, 8, 4) == 1024
    with pytest.raises(ValueError, match="global_batch_size=100 must be divisible .* 3 x 2 = 6"):
        per_worker_batch_size(100, 3, 2)


def test_plan_lengths_and_conversions():
    # ImageNet at 8K on 8 workers with 2 micro-batches: 156 updates per epoch.
    plan = make_plan(
        train_examples=1_281_167,
        global_batch_size=8192,
        workers=8,
        accumulation_steps=2,
        epochs=90,
        warmup_epochs=5,
        checkpoint_every_updates=500,
    )
    assert plan.updates_per_epoch == 156
    assert plan.total_updates == 90 * 156 and plan.warmup_updates == 5 * 156
    assert plan.per_worker_batch_size == 512 and plan.images_per_micro_batch == 4096
    assert plan.micro_batches(10) == 20  # per worker
    assert plan.images(10) == 81_920
    assert plan.epochs(312) == 2.0
    # A checkpoint records images; any worker count at the same global batch reads it back.
    assert plan.updates_from_images(plan.images(1234)) == 1234
    written = json.loads(json.dumps(plan.as_dict()))
    assert written["total_updates"] == 14_040 and written["per_worker_batch_size"] == 512
    assert written["epochs"] == 90.0


def test_plan_rounds_epochs_up_and_prefers_updates():
    assert make_plan(train_examples=100, global_batch_size=10, epochs=2.05).total_updates == 21
    plan = make_plan(train_examples=100, global_batch_size=10, epochs=90, train_updates=7)
    assert plan.total_updates == 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(train_examples=5, global_batch_size=8, epochs=1), "5 examples, fewer than one"),
        (dict(train_examples=80, global_batch_size=8), "`epochs` or `train_updates`"),
        (
            dict(train_examples=80, global_batch_size=8, train_updates=20, warmup_epochs=2),
            "warmup_epochs=2 is 20 updates .* not shorter than the 20",
        ),
        (dict(train_examples=80, global_batch_size=8, workers=3, epochs=1), "3 x 1 = 3"),
    ],
)
def test_bad_plans_are_refused_with_the_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_plan(**kwargs)
