"""tools/plot_run.py on a real tiny train.py run: the PNG is written and the curves read back
from the run's CSV log and TensorBoard layer logs have one point per epoch / logged update."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tool_modules import load_tool

REPO = Path(__file__).resolve().parents[1]
PLOT_RUN = REPO / "tools" / "plot_run.py"
TIMEOUT = 300
# As tests/test_train.py: a tiny AlexNet-BN on synthetic images, 2 updates per epoch.
TINY = [
    "--model=alexnet_bn_small",
    "--width_multiplier=0.125",
    "--groups=1",
    "--image_size=32",
    "--global_batch_size=16",
    "--eval_batch_size=16",
    "--synthetic",
    "--synthetic_examples=32",
    "--num_classes=10",
]
STEPS, STEPS_PER_EPOCH = 4, 2


def _env() -> dict[str, str]:
    import os

    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("plot") / "run"
    command = [
        sys.executable,
        str(REPO / "train.py"),
        *TINY,
        f"--train_steps={STEPS}",
        "--eval_steps=1",
        "--log_every_steps=1",
        f"--model_dir={model_dir}",
    ]
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return model_dir


@pytest.mark.slow
def test_curves_read_back_with_one_point_per_epoch_and_update(tiny_run):
    tool = load_tool("plot_run")
    run = tool.Run(str(tiny_run))
    epochs = STEPS // STEPS_PER_EPOCH
    assert run.log["epoch"] == [1.0, 2.0]
    for key in ("loss", "top1", "val_loss", "val_top1", "learning_rate"):
        assert len(run.log[key]) == epochs, key
    assert run.lr_per_update
    steps, values = run.learning_rate
    assert len(steps) == STEPS and len(values) == STEPS
    assert steps == sorted(steps)
    assert values[-1] < values[0]  # the default schedule decays
    # One curve per trainable variable of the model, a point per update each.
    assert len(run.local_lr) > 4
    assert {len(s) for s, _ in run.local_lr.values()} == {STEPS}
    assert all(v > 0 for _, vs in run.local_lr.values() for v in vs)
    kernels = tool.Run(str(tiny_run), layers="kernel").local_lr
    assert kernels and set(kernels) < set(run.local_lr)
    assert all("kernel" in name for name in kernels)


@pytest.mark.slow
def test_cli_draws_two_runs_in_one_png(tiny_run, tmp_path):
    output = tmp_path / "compare.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(PLOT_RUN),
            f"--model_dir={tiny_run}",
            f"--model_dir={tiny_run}",
            "--labels=first,second",
            f"--output={output}",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(output)
    data = output.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert f"first: 2 epoch(s), {STEPS} logged update(s)" in proc.stderr


def test_cli_refuses_a_folder_that_is_not_a_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(PLOT_RUN), f"--model_dir={tmp_path}"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode != 0
    assert "training_log.csv" in proc.stderr
