"""Part 6: the training step with TensorFlow's oneDNN CPU kernels off and on, side by side.

TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at import, and turns oneDNN on by default only
on CPUs with AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX; `train.py` turns it on everywhere
unless the user set it. To time both settings in the same minutes of a shared machine, two
`onednn_worker.py` processes (one per setting) each build the same model and batch and wait;
every round asks each for `steps` steps in rotating order (`timing.run_interleaved`), so only
one computes at a time, and the ratio is taken round by round.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from . import environment, timing
from .workloads import TrainCase, Workload

WORKER = Path(__file__).with_name("onednn_worker.py")
SETTINGS = {"oneDNN off": "0", "oneDNN on": "1"}
START_TIMEOUT_S = 600


class _Worker:
    """One `onednn_worker.py` process, driven line by line."""

    def __init__(self, case: TrainCase, setting: str, threads: int):
        command = [
            sys.executable,
            str(WORKER),
            f"--model={case.model}",
            f"--image-size={case.image_size}",
            f"--batch={case.batch}",
            f"--num-classes={case.num_classes}",
            f"--options={json.dumps(case.options)}",
            f"--threads={threads}",
        ]
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=setting, TF_CPP_MIN_LOG_LEVEL="2")
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.process.stdout.readline()
        if not line.startswith("READY "):
            self.close()
            raise RuntimeError(
                f"oneDNN worker ({environment.ONEDNN_ENV}={setting}, {case.model}) did not "
                f"start: exit status {self.process.returncode}, first line {line!r}"
            )
        self.state = json.loads(line[len("READY ") :])

    def seconds_per_step(self, steps: int) -> float:
        self.process.stdin.write(f"{steps}\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"oneDNN worker exited with status {self.process.wait()}")
        return float(answer)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
            self.process.wait(timeout=60)


def measure_case(case: TrainCase, workload: Workload, threads: int) -> dict[str, Any]:
    """Times one model's step with oneDNN off and on; see the module docstring."""
    steps = workload.onednn_steps
    workers = {}
    try:
        # One at a time: building and warming up both at once would only slow both.
        for name, setting in SETTINGS.items():
            workers[name] = _Worker(case, setting, threads)
        load_before = environment.load_average()
        samples = timing.run_interleaved(
            {name: (lambda w=w: w.seconds_per_step(steps)) for name, w in workers.items()},
            repeats=workload.onednn_rounds,
            warmup=1,
            self_timed=True,
        )
    finally:
        for worker in workers.values():
            worker.close()
    speedup = timing.paired_ratio(samples["oneDNN off"], samples["oneDNN on"])
    return {
        "model": case.model,
        "options": case.options,
        "image_size": case.image_size,
        "batch": case.batch,
        "num_classes": case.num_classes,
        "steps_per_sample": steps,
        "onednn_state": {name: w.state for name, w in workers.items()},
        "load_average_before": load_before,
        "load_average_after": environment.load_average(),
        "variants": {name: {"samples_s": s, **timing.summarize(s)} for name, s in samples.items()},
        "ratios": {"step time, oneDNN off / on (speed-up of on)": speedup},
    }


def run(workload: Workload, threads: int) -> dict[str, Any]:
    """Measures part 6 for every case of the workload."""
    cases = [measure_case(case, workload, threads) for case in workload.onednn_cases]
    return {"cases": cases}
