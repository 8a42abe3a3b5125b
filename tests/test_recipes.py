"""Every recipe in flags/ parses, validates and builds its schedule and optimizer.

Flags are parsed into a fresh `FlagValues` per recipe (validators included), then the getters
and builders train.py uses are run with ImageNet's training-set size; nothing is trained.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from absl import flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # train_flags lives at the top level, beside train.py

import train_flags  # noqa: E402
from lars_tf.data.synthetic import IMAGENET_EXAMPLES  # noqa: E402

RECIPES = sorted((REPO / "flags").glob("*.cfg"))
# flags/cifar10_*.cfg are the bases of tools/sweep.py (it adds batch, LR and epochs; parsed in
# tests/test_sweep.py), not rows of the paper's tables.
# mlperf_*: MLPerf's recipes, tested by test_mlperf_recipes_follow_the_reference.
PAPER_RECIPES = [r for r in RECIPES if not r.name.startswith(("demo_", "cifar10_", "mlperf_"))]


def parse(*argv: str) -> flags.FlagValues:
    values = flags.FlagValues()
    train_flags.define_all(values)
    values(["train.py", *argv])
    return values


@pytest.fixture
def dirs(tmp_path) -> list[str]:
    return [f"--data_dir={tmp_path}", f"--model_dir={tmp_path / 'model'}"]


def test_there_are_recipes_for_every_table_block():
    names = {r.stem for r in PAPER_RECIPES}
    for expected in (
        "alexnet_sgd_b512",
        "alexnet_lars_b8k",
        "alexnet_bn_sgd_b512",
        "alexnet_bn_lars_b32k",
        "alexnet_bn_lars_b32k_e200",
        "resnet50_sgd_b256",
        "resnet50_lars_b32k",
    ):
        assert expected in names
    assert (REPO / "flags" / "demo_fashion_mnist.cfg").exists()


@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=lambda p: p.stem)
def test_paper_recipe_parses_and_builds(recipe, dirs):
    text = recipe.read_text()
    # The row it reproduces and the published accuracy, as comments.
    assert re.search(r"^# Reproduces .*\n#   .+\|.+\|", text, re.M), "no table row named"
    published = re.search(r"^# Published top-1: (\d+\.\d)%", text, re.M)
    assert published and 40 < float(published.group(1)) < 80

    values = parse(f"--flagfile={recipe}", *dirs)
    assert values.model in ("alexnet", "alexnet_bn", "resnet50")
    assert values.dataset == "tfrecord"
    assert values["exclude_bn_and_bias"].present, "the recipe must say whether BN/bias are excluded"
    assert values.global_batch_size in (256, 512, 4096, 8192, 16384, 32768)
    # Divides for the usual world sizes.
    for workers in (1, 8, 64):
        assert train_flags.per_worker_batch(workers, values) >= 1
    steps_per_epoch = IMAGENET_EXAMPLES["train"] // values.global_batch_size
    total = train_flags.training_steps(steps_per_epoch, values)
    warmup = train_flags.warmup_steps(steps_per_epoch, values)
    assert total == pytest.approx(values.epochs * steps_per_epoch, abs=1)
    assert 0 <= warmup < total
    optimizer = train_flags.build_optimizer(
        train_flags.learning_rate(values), total, warmup, steps_per_epoch, values
    )
    schedule = optimizer._learning_rate
    # The paper's poly(2) runs over the whole run, warm-up included: at the warm-up's end
    # the rate is already gamma_0 (1 - W/T)^2.
    expected = values.learning_rate * (1 - warmup / total) ** 2
    assert float(schedule(warmup)) == pytest.approx(expected, rel=1e-5)
    assert float(schedule(total)) == pytest.approx(0.0, abs=1e-6)
    assert optimizer.momentum == 0.9
    assert optimizer.coupled_weight_decay == values.weight_decay
    expected_accum = values.grad_accum_steps if values.grad_accum_steps > 1 else None
    assert optimizer.gradient_accumulation_steps == expected_accum


@pytest.mark.parametrize("recipe", PAPER_RECIPES, ids=lambda p: p.stem)
def test_alexnet_input_is_scaled_as_the_prototxts_scale_it(recipe, dirs):
    # The authors' AlexNet-BN prototxt subtracts the mean and scales by 1/256; BVLC's AlexNet
    # only subtracts the mean. ResNet-50 keeps the inception pipeline's per-channel mean.
    values = parse(f"--flagfile={recipe}", *dirs)
    assert values.mean == ["123.68", "116.78", "103.94"]
    expected = ["256"] if values.model == "alexnet_bn" else []
    assert values.std == expected


def test_demo_recipe_parses(tmp_path):
    values = parse(
        f"--flagfile={REPO / 'flags' / 'demo_fashion_mnist.cfg'}", f"--model_dir={tmp_path}"
    )
    assert values.global_batch_size >= 4096
    assert values.optimizer == "lars"
    assert values.dataset == "tfds:fashion_mnist"
    assert train_flags.per_worker_batch(2, values) * 2 == values.global_batch_size


def test_sgd_is_lars_without_adaptation(dirs):
    values = parse(f"--flagfile={REPO / 'flags' / 'alexnet_bn_sgd_b512.cfg'}", *dirs)
    optimizer = train_flags.build_optimizer(0.02, 100, 0, 10, values)
    import keras

    kernel = keras.Variable(keras.ops.ones((3, 3)), name="kernel")
    optimizer.build([kernel])
    assert optimizer._apply_adaptation == [False]  # local LR 1: plain momentum SGD
    assert optimizer._apply_decay == [True]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rate=-1"], "--learning_rate must be > 0"),
        (["--trust_coefficient=-0.001"], "--trust_coefficient must be > 0"),
        (["--warmup_epochs=5", "--epochs=5"], "--warmup_epochs must be shorter"),
        (["--global_batch_size=0"], "--global_batch_size=0: 0 is not a positive integer"),
        (["--weight_decay=-1"], "--weight_decay=-1: -1.0 is not a non-negative number"),
        (["--eval_steps=0"], "--eval_steps=0: 0 is not a positive integer"),
        (["--momentum=1.5"], "--momentum must be in [0, 1)"),
        (
            ["--dataset=imagenet"],
            "--dataset must be one of tfrecord, folder, synthetic, tfds:<name>",
        ),
        (["--model=vgg16"], "value should be one of"),
        (["--dtype=float16"], "value should be one of"),
        (["--flagfile=/nonexistent/recipe.cfg"], "/nonexistent/recipe.cfg"),
        (["--lr_decay_epochs=60,30", "--lr_schedule=multistep"], "must be increasing"),
        (["--width_multiplier=0.5", "--model=resnet50"], "AlexNet models only"),
        (["--normalization=batch_norm_all", "--model=resnet50"], "AlexNet models only"),
        (["--normalization=group_norm"], "value should be one of"),
    ],
)
def test_bad_flags_are_rejected_with_the_flag_named(argv, message, dirs):
    with pytest.raises(flags.Error, match=re.escape(message)):
        parse(*dirs, *argv)


def test_model_dir_and_data_dir_are_required(tmp_path):
    with pytest.raises(flags.Error, match="--model_dir is required"):
        parse(f"--data_dir={tmp_path}")
    with pytest.raises(flags.Error, match="--data_dir is required"):
        parse(f"--model_dir={tmp_path}")
    with pytest.raises(flags.Error, match="--data_dir does not exist"):
        parse(f"--model_dir={tmp_path}", f"--data_dir={tmp_path / 'missing'}")
    parse(f"--model_dir={tmp_path}", "--synthetic")  # synthetic needs no data


def test_batch_must_divide_by_workers_and_accumulation(dirs):
    values = parse(*dirs, "--global_batch_size=96", "--grad_accum_steps=4")
    assert train_flags.per_worker_batch(2, values) == 12
    with pytest.raises(flags.ValidationError, match=r"--global_batch_size=96 .* 5 x 4 = 20"):
        train_flags.per_worker_batch(5, values)


def test_warmup_longer_than_train_steps_is_rejected(dirs):
    values = parse(*dirs, "--warmup_epochs=2", "--train_steps=10")
    assert train_flags.warmup_steps(4, values) == 8
    with pytest.raises(flags.ValidationError, match="--warmup_epochs=2 .* 10 training steps"):
        train_flags.warmup_steps(5, values)


def test_learning_rate_scaling(dirs):
    values = parse(*dirs, "--learning_rate=0.1", "--global_batch_size=1024")
    assert train_flags.learning_rate(values) == pytest.approx(0.1)
    values = parse(*dirs, "--learning_rate=0.1", "--global_batch_size=1024", "--lr_scaling=linear")
    assert train_flags.learning_rate(values) == pytest.approx(0.4)


def test_lr_scaling_by_workers_is_refused(dirs):
    # --global_batch_size fixes the global batch on any number of workers: Horovod's
    # "lr x workers" would have changed the LR with the worker count at the same batch.
    with pytest.raises(flags.IllegalFlagValueError, match=r"lr_scaling.*none\|linear"):
        parse(*dirs, "--lr_scaling=workers")


@pytest.mark.parametrize("method", ["sgd", "sgd_warmup", "lars"])
def test_sweep_recipes_parse_with_the_sweeps_flags(method, tmp_path):
    """tools/sweep.py's bases, completed the way the sweep completes them, validate."""
    values = parse(
        f"--flagfile={REPO / 'flags' / f'cifar10_{method}.cfg'}",
        f"--data_dir={tmp_path}",
        f"--model_dir={tmp_path / 'model'}",
        "--model=alexnet_bn_small",
        "--global_batch_size=1024",
        "--learning_rate=1",
        "--epochs=3",
        "--warmup_epochs=1",
        "--bn_recalibration_batches=2",
    )
    assert values.optimizer == ("lars" if method == "lars" else "sgd")
    assert values.dataset == "folder"


MLPERF = {  # batch: (base LR, warm-up epochs), the reference's lars_util.py table
    4096: (10.0, 5),
    16384: (25.0, 5),
    32768: (31.2, 25),
}


@pytest.mark.parametrize("batch", sorted(MLPERF))
def test_mlperf_recipes_follow_the_reference(batch, dirs):
    recipe = REPO / "flags" / f"mlperf_resnet50_lars_b{batch // 1024}k.cfg"
    text = recipe.read_text()
    assert "mlcommons/training" in text and "lars_util.py" in text  # names its source
    values = parse(f"--flagfile={recipe}", *dirs)
    lr, warmup_epochs = MLPERF[batch]
    assert (values.global_batch_size, values.learning_rate, values.warmup_epochs) == (
        batch,
        lr,
        warmup_epochs,
    )
    assert values.lr_scaling == "none" and values.optimizer == "lars"
    assert values.exclude_bn_and_bias and not values.decay_in_norm
    assert (values.momentum, values.weight_decay, values.trust_coefficient) == (0.9, 2e-4, 0.001)
    assert values.lars_epsilon == 0.0 and values.label_smoothing == 0.1
    assert values.eval_every_epochs == 4 and values.target_accuracy == 0.759
    assert values.preprocessing == "inception"
    # Linear warm-up to the peak, then poly(2) to 1e-4 over the updates after it.
    steps_per_epoch = IMAGENET_EXAMPLES["train"] // batch
    total = train_flags.training_steps(steps_per_epoch, values)
    warmup = train_flags.warmup_steps(steps_per_epoch, values)
    schedule = train_flags.build_schedule(lr, total, warmup, steps_per_epoch, values)
    assert float(schedule(warmup)) == pytest.approx(lr)
    assert float(schedule(warmup // 2)) == pytest.approx(lr * (warmup // 2) / warmup, rel=1e-5)
    assert float(schedule(total)) == pytest.approx(1e-4, rel=1e-3)
    middle = (warmup + total) // 2
    expected = (lr - 1e-4) * (1 - (middle - warmup) / (total - warmup)) ** 2 + 1e-4
    assert float(schedule(middle)) == pytest.approx(expected, rel=1e-3)
