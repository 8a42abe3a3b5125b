"""Horovod is built with TensorFlow and Gloo, and two real processes talk to each other."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "scripts" / "hvd_smoke.py"


def test_horovod_built_with_tensorflow_and_gloo():
    import horovod.tensorflow as hvd
    from horovod.common.util import extension_available

    assert extension_available("tensorflow"), "Horovod was built without TensorFlow support"
    assert hvd.gloo_built(), "Horovod was built without Gloo"
    hvd.init()
    assert (hvd.rank(), hvd.size()) == (0, 1)


def horovodrun_command(np_: int, *args: str) -> list[str]:
    """`horovodrun -np N` on localhost over Gloo, from the same environment as the tests."""
    runner = Path(sys.executable).with_name("horovodrun")
    if not runner.exists():
        runner = shutil.which("horovodrun")
    assert runner, "horovodrun not found next to the interpreter or on PATH"
    return [str(runner), "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", *args]


@pytest.mark.horovod
def test_two_ranks_allreduce_and_broadcast_keras_model(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1")
    cmd = horovodrun_command(2, sys.executable, str(SCRIPT), str(tmp_path))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    n_vars = sum(k.startswith("after_") for k in ranks[0].files)
    assert n_vars == 4  # two Dense layers: kernel and bias each
    for r in ranks:
        assert int(r["size"]) == 2
        np.testing.assert_allclose(r["averaged"], [1.5, 3.0])  # mean of (1,2) and (2,4)
        np.testing.assert_allclose(r["summed"], [3.0, 6.0])
    # The ranks started different and ended equal to rank 0's initial weights.
    assert not np.array_equal(ranks[0]["before_0"], ranks[1]["before_0"])
    for i in range(n_vars):
        for r in ranks:
            np.testing.assert_array_equal(r[f"after_{i}"], ranks[0][f"before_{i}"])
