"""Part 4: Horovod all-reduce of a model's gradients across 2 ranks, tensor fusion on and off.

Launches `allreduce_worker.py` twice under `horovodrun -np 2 -H localhost:2 --gloo`: with
Horovod's default fusion threshold and with `HOROVOD_FUSION_THRESHOLD=0` (read once at
`hvd.init()`, hence two launches). Both ranks share this machine's cores and talk over the
loopback interface, so the figures bound the software overhead, not a network.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import timing
from .workloads import Workload

WORKER = Path(__file__).with_name("allreduce_worker.py")
RANKS = 2


def horovodrun() -> str | None:
    """The `horovodrun` beside this interpreter, or on PATH."""
    beside = Path(sys.executable).with_name("horovodrun")
    return str(beside) if beside.exists() else shutil.which("horovodrun")


def _launch(workload: Workload, output: str, fusion: bool, timeout: float) -> dict[str, Any]:
    runner = horovodrun()
    command = [
        runner,
        "-np",
        str(RANKS),
        "-H",
        f"localhost:{RANKS}",
        "--gloo",
        "--gloo-timeout-seconds",
        "120",
        sys.executable,
        str(WORKER),
        "--output",
        output,
        "--model",
        workload.allreduce_model,
        "--repeats",
        str(workload.allreduce_repeats),
    ]
    if fusion:
        command += [
            "--step-model",
            workload.step_model,
            "--step-image-size",
            str(workload.step_image_size),
            "--step-batch",
            str(workload.step_batch),
            "--step-rounds",
            str(workload.step_rounds),
        ]
    threads = max(1, (os.cpu_count() or 1) // RANKS)
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="2",
        OMP_NUM_THREADS=str(threads),
        TF_NUM_INTRAOP_THREADS=str(threads),
        XLA_FLAGS=f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}",
    )
    env.pop("HOROVOD_FUSION_THRESHOLD", None)
    if not fusion:
        env["HOROVOD_FUSION_THRESHOLD"] = "0"
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if process.returncode != 0:
        tail = (process.stdout + process.stderr)[-3000:]
        raise RuntimeError(f"horovodrun exited with {process.returncode}:\n{tail}")
    with open(output, encoding="utf-8") as f:
        result = json.load(f)
    result["command"] = shlex.join(_shown(c) for c in command)
    return result


def _shown(argument: str) -> str:
    """Paths inside the working directory relative, others as they are."""
    if os.path.isabs(argument):
        relative = os.path.relpath(argument)
        return argument if relative.startswith("..") else relative
    return argument


def _bandwidths(bytes_: int, seconds: float, ranks: int) -> dict[str, float]:
    return {
        # Algorithm bandwidth: gradient bytes per second of all-reduce.
        "algorithm_gb_per_s": bytes_ / seconds / 1e9,
        # Bus bandwidth: what each link carries in a ring, 2(N-1)/N of the gradient bytes.
        "bus_gb_per_s": 2 * (ranks - 1) / ranks * bytes_ / seconds / 1e9,
    }


def run(workload: Workload, work_dir: str, timeout: float = 900) -> dict[str, Any]:
    """Measures part 4, or returns `{"skipped": reason}` without Horovod."""
    if horovodrun() is None:
        return {"skipped": "horovodrun not found"}
    try:
        import horovod.tensorflow  # noqa: F401
    except ImportError as error:
        return {"skipped": f"horovod.tensorflow cannot be imported ({error})"}
    os.makedirs(work_dir, exist_ok=True)
    launches = {}
    for fusion in (True, False):
        name = "fusion on" if fusion else "fusion off"
        output = os.path.join(work_dir, f"allreduce-{name.replace(' ', '-')}.json")
        launches[name] = _launch(workload, output, fusion, timeout)
    table = {}
    for name, launch in launches.items():
        gradients = launch["gradients"]
        for variant, stats in gradients["variants"].items():
            table[f"{variant}, {name}"] = {
                "median_s": stats["median"],
                "iqr_s": stats["iqr"],
                **_bandwidths(gradients["bytes"], stats["median"], launch["size"]),
            }
    on = launches["fusion on"]["gradients"]["variants"]["allreduce per tensor"]["samples_s"]
    off = launches["fusion off"]["gradients"]["variants"]["allreduce per tensor"]["samples_s"]
    result: dict[str, Any] = {
        "ranks": RANKS,
        "model": workload.allreduce_model,
        "tensors": launches["fusion on"]["gradients"]["tensors"],
        "bytes": launches["fusion on"]["gradients"]["bytes"],
        "launches": launches,
        "table": table,
        # Separate launches, so a ratio of medians (not paired by round).
        "fusion_speedup_per_tensor": timing.summarize(off)["median"]
        / timing.summarize(on)["median"],
        "targets": [],
    }
    if "step" in launches["fusion on"]:
        result["step"] = launches["fusion on"]["step"]
    return result
