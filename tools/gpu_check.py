"""Check a GPU machine for lars_tf: devices, NCCL equivalence, training speed, LARS update cost.

Run it through tools/gpu_check.sh. Every part runs in its own subprocess (one failing part is
recorded and the others still run; the parent process never touches a GPU), and the results go
to DIR/gpu_check.json and DIR/gpu_check.md:

1. devices: the GPUs TensorFlow sees (name, compute capability), TensorFlow's CUDA and cuDNN
   build, whether Horovod was built with NCCL/CUDA, and `nvidia-smi -L`.
2. equivalence: tests/hvd_scripts/equivalence.py (the script of tests/test_distributed.py) as
   one process at the full batch, then under `horovodrun -np <GPUs>` with one GPU per rank
   (NCCL all-reduce, NCCL_DEBUG=INFO to show it was used): the final weights of N workers x B/N
   equal those of 1 worker x B, and every rank's are bit-identical. TF32 is off
   (NVIDIA_TF32_OVERRIDE=0): it would round the convolutions to 10 bits of mantissa.
3. train step: ResNet-50 (224 px) and AlexNet-BN (227 px), mixed_float16 and XLA
   (`jit_compile=True`), LARS, synthetic data already on the GPU, one GPU; images/s as
   tf_cnn_benchmarks counts them (warm-up steps, then batch x steps / time). A batch that does
   not fit is halved until it does, and the report says so. Horovod's all-reduce has no XLA
   kernel in this build, so the step is that of one GPU: per-GPU throughput, the figure
   tf_cnn_benchmarks' tables divide by the GPU count.
4. optimizer: one LARS update of ResNet-50's variables against Keras SGD(momentum), both in a
   tf.function with XLA, timed interleaved with tools/bench/ (optimizer_update, timing),
   with the device synchronized after every call.

`--cpu_smoke` runs every part on the CPU (CUDA_VISIBLE_DEVICES="", 2 Gloo workers) with tiny
shapes: it checks the code paths, its numbers mean nothing. The test suite runs it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
EQUIVALENCE = REPO / "tests" / "hvd_scripts" / "equivalence.py"
EQUIVALENCE_STEPS = 3
# The same tolerances as tests/test_distributed.py on the CPU; on GPUs cuDNN may pick different
# convolution algorithms for B and B/N images, so a little more room in the last bits.
TOLERANCE = {"cpu": {"rtol": 1e-5, "atol": 1e-6}, "gpu": {"rtol": 1e-4, "atol": 1e-5}}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/gpu_check")
    parser.add_argument("--cpu_smoke", action="store_true", help="every part on the CPU, tiny")
    parser.add_argument("--np", type=int, default=0, help="Horovod workers (default: the GPUs)")
    parser.add_argument("--resnet50_batch", type=int, default=256, help="images per GPU")
    parser.add_argument("--alexnet_batch", type=int, default=512, help="images per GPU")
    parser.add_argument("--warmup_steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50, help="timed train steps per model")
    parser.add_argument("--update_repeats", type=int, default=21)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per part")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--image_size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--update_model", default="resnet50", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Workers: each runs in its own process and writes one JSON file.


def _tf():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    return tf


def worker_devices(args: argparse.Namespace) -> dict[str, Any]:
    tf = _tf()
    build = dict(tf.sysconfig.get_build_info())
    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capability = details.get("compute_capability")
        gpus.append(
            {
                "device": gpu.name,
                "name": details.get("device_name", ""),
                "compute_capability": ".".join(map(str, capability)) if capability else None,
            }
        )
    import horovod
    import horovod.tensorflow as hvd

    return {
        "tensorflow": tf.__version__,
        "keras": __import__("keras").__version__,
        "is_cuda_build": bool(build.get("is_cuda_build")),
        "cuda_version": build.get("cuda_version"),
        "cudnn_version": build.get("cudnn_version"),
        "gpus": gpus,
        "horovod": horovod.__version__,
        "horovod_nccl_built": int(hvd.nccl_built()),
        "horovod_cuda_built": bool(hvd.cuda_built()),
        "horovod_gloo_built": bool(hvd.gloo_built()),
    }


def worker_train_step(args: argparse.Namespace) -> dict[str, Any]:
    tf = _tf()
    import keras

    from lars_tf import models
    from lars_tf.optimizer import LARS

    keras.mixed_precision.set_global_policy("mixed_float16")
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    options: dict[str, Any] = {}
    if args.cpu_smoke and args.model == "alexnet_bn":
        options["width_multiplier"] = 0.125  # the 4096-wide FC layers dominate on a CPU
    if args.cpu_smoke and args.model == "resnet50":
        options["stage_blocks"] = (1, 1, 1, 1)  # XLA:CPU compiling 16 blocks took minutes
    batch, attempts = args.batch, []
    while True:
        try:
            keras.backend.clear_session()
            model = models.build(
                args.model,
                num_classes=1000,
                input_shape=(args.image_size, args.image_size, 3),
                **options,
            )
            model.compile(
                optimizer=LARS(0.1, momentum=0.9, weight_decay=5e-4, trust_coefficient=1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=True,
            )
            # Synthetic data made on the device once, as tf_cnn_benchmarks' --data_name=synthetic.
            images = tf.random.uniform(
                (batch, args.image_size, args.image_size, 3), dtype="float16"
            )
            labels = tf.random.uniform((batch,), maxval=1000, dtype=tf.int32)
            start = time.perf_counter()
            for _ in range(args.warmup_steps):
                loss = model.train_on_batch(images, labels)
            warmup_s = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = model.train_on_batch(images, labels)  # returns a float: synchronizes
            elapsed = time.perf_counter() - start
            break
        except tf.errors.ResourceExhaustedError as error:
            attempts.append({"batch": batch, "error": str(error).splitlines()[0][:300]})
            if batch <= 1:
                raise
            batch //= 2
    return {
        "model": args.model,
        "options": options,
        "image_size": args.image_size,
        "batch_per_gpu": batch,
        "batch_requested": args.batch,
        "out_of_memory_at": attempts,
        "dtype_policy": "mixed_float16",
        "jit_compile": True,
        "device": "GPU:0" if on_gpu else "CPU",
        "trainable_parameters": int(sum(int(v.numpy().size) for v in model.trainable_weights)),
        "warmup_steps": args.warmup_steps,
        "warmup_s": warmup_s,
        "steps": args.steps,
        "elapsed_s": elapsed,
        "step_s": elapsed / args.steps,
        "images_per_s_per_gpu": batch * args.steps / elapsed,
        "final_loss": float(loss),
    }


def worker_optimizer(args: argparse.Namespace) -> dict[str, Any]:
    tf = _tf()
    sys.path.insert(0, str(TOOLS))
    from bench import optimizer_update, timing

    shapes = optimizer_update.variable_shapes(args.update_model)
    weights, grads = optimizer_update.make_tensors(shapes)
    variants = optimizer_update.lars_tf_variants(weights, grads)
    names = (optimizer_update.LARS_XLA, optimizer_update.SGD_XLA, optimizer_update.LARS_PLAIN)
    names += (optimizer_update.SGD_PLAIN, optimizer_update.NORMS_XLA)

    def synchronized(call):
        def run():
            call()
            tf.test.experimental.sync_devices()  # GPU kernels run asynchronously

        return run

    samples = timing.run_interleaved(
        {n: synchronized(variants[n]) for n in names}, repeats=args.update_repeats, warmup=3
    )
    ratios = {
        "LARS / SGD, XLA": timing.paired_ratio(
            samples[optimizer_update.LARS_XLA], samples[optimizer_update.SGD_XLA]
        ),
        "LARS / SGD, tf.function without XLA (LARS compiles its update)": timing.paired_ratio(
            samples[optimizer_update.LARS_PLAIN], samples[optimizer_update.SGD_PLAIN]
        ),
        "norms alone / SGD, XLA": timing.paired_ratio(
            samples[optimizer_update.NORMS_XLA], samples[optimizer_update.SGD_XLA]
        ),
    }
    return {
        "model": args.update_model,
        "tensors": len(shapes),
        "parameters": int(sum(w.size for w in weights)),
        "device": "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU",
        "repeats": args.update_repeats,
        "variants": {n: timing.summarize(s) for n, s in samples.items()},
        "ratios": ratios,
    }


def worker_equivalence_rank(argv: list[str]) -> None:
    """One rank of equivalence.py, on the GPU of its local rank (Horovod's one GPU per process)."""
    local_rank = os.environ.get("HOROVOD_LOCAL_RANK", "0")
    if os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        os.environ["CUDA_VISIBLE_DEVICES"] = local_rank
    import runpy

    sys.argv = [str(EQUIVALENCE), *argv]
    runpy.run_path(str(EQUIVALENCE), run_name="__main__")


WORKERS = {
    "devices": worker_devices,
    "train_step": worker_train_step,
    "optimizer": worker_optimizer,
}


# ----------------------------------------------------------------------------------------------
# The parent: runs the workers, checks, writes the report.


def _env(cpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["KERAS_BACKEND"] = "tensorflow"
    env["NVIDIA_TF32_OVERRIDE"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _tail(text: str, limit: int = 3000) -> str:
    return text[-limit:]


def run_worker(name: str, args: argparse.Namespace, out_dir: Path, *extra: str, tag="") -> dict:
    out = out_dir / f"{name}{tag}.json"
    cmd = [sys.executable, __file__, f"--worker={name}", f"--worker_out={out}", *extra]
    if args.cpu_smoke:
        cmd.append("--cpu_smoke")
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            env=_env(args.cpu_smoke),
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {args.timeout:.0f} s"}
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        return {"ok": False, "error": _tail(proc.stdout + proc.stderr), "wall_s": wall}
    return {"ok": True, "wall_s": wall, **json.loads(out.read_text())}


def horovodrun() -> str:
    runner = Path(sys.executable).with_name("horovodrun")
    found = str(runner) if runner.exists() else shutil.which("horovodrun")
    if not found:
        raise FileNotFoundError("horovodrun not found next to the interpreter or on PATH")
    return found


def check_equivalence(args: argparse.Namespace, workers: int, out_dir: Path) -> dict[str, Any]:
    import numpy as np

    kind = "cpu" if args.cpu_smoke else "gpu"
    result: dict[str, Any] = {"workers": workers, "tolerance": TOLERANCE[kind]}
    if workers < 2:
        result.update(ok=None, skipped=f"needs 2 or more {'workers' if args.cpu_smoke else 'GPUs'}")
        return result
    global_batch = 8 * workers
    result.update(global_batch=global_batch, steps=EQUIVALENCE_STEPS)
    script = [__file__, "--worker=equivalence_rank", "--"]
    runs = {}
    for n in (1, workers):
        run_dir = out_dir / f"equivalence_np{n}"
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(run_dir), str(global_batch), "1", str(EQUIVALENCE_STEPS)]
        cmd = [sys.executable, *script, *argv]
        if n > 1:
            cmd = [horovodrun(), "-np", str(n), "-H", f"localhost:{n}", "--gloo", *cmd]
        env = _env(args.cpu_smoke)
        env["NCCL_DEBUG"] = "INFO"
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=args.timeout
            )
        except subprocess.TimeoutExpired:
            result.update(ok=False, error=f"{n} worker(s): timed out after {args.timeout:.0f} s")
            return result
        result[f"wall_s_np{n}"] = time.perf_counter() - start
        if proc.returncode != 0:
            result.update(ok=False, error=f"{n} worker(s):\n{_tail(proc.stdout + proc.stderr)}")
            return result
        if n > 1:
            output = proc.stdout + proc.stderr
            result["nccl_used"] = "NCCL INFO" in output
            lines = [line for line in output.splitlines() if "NCCL INFO NCCL version" in line]
            result["nccl_version_line"] = lines[0].split("NCCL INFO ")[-1] if lines else None
        runs[n] = [dict(np.load(run_dir / f"rank{r}.npz")) for r in range(n)]

    def weights(saved: dict) -> list:
        return [saved[k] for k in sorted(saved) if k.startswith("weight_")]

    reference = weights(runs[1][0])
    distributed = [weights(rank) for rank in runs[workers]]
    max_abs = max(
        float(np.max(np.abs(a - e))) for a, e in zip(distributed[0], reference, strict=True)
    )
    scale = max(float(np.max(np.abs(e))) for e in reference)
    close = all(
        np.allclose(a, e, **TOLERANCE[kind]) for a, e in zip(distributed[0], reference, strict=True)
    )
    identical = all(
        np.array_equal(a, b)
        for other in distributed[1:]
        for a, b in zip(distributed[0], other, strict=True)
    )
    updates = [int(rank["updates"]) for rank in runs[workers]]
    result.update(
        max_abs_difference=max_abs,
        max_abs_weight=scale,
        equal_to_one_worker=bool(close),
        ranks_bit_identical=bool(identical),
        updates=updates,
    )
    ok = close and identical and updates == [EQUIVALENCE_STEPS] * workers
    if not args.cpu_smoke and not result.get("nccl_used"):
        result["error"] = "no NCCL INFO line in the output: the all-reduce did not go through NCCL"
        ok = False
    result["ok"] = bool(ok)
    return result


def plan(args: argparse.Namespace, gpus: int) -> dict[str, Any]:
    """The shapes each part runs at."""
    if args.cpu_smoke:
        return {
            "workers": args.np or 2,
            "train": [("resnet50", 32, 2), ("alexnet_bn", 67, 2)],
            "warmup_steps": 1,
            "steps": 2,
            "update_model": "resnet20_cifar",
            "update_repeats": 3,
        }
    return {
        "workers": args.np or gpus,
        "train": [("resnet50", 224, args.resnet50_batch), ("alexnet_bn", 227, args.alexnet_batch)],
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "update_model": "resnet50",
        "update_repeats": args.update_repeats,
    }


def nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    return (proc.stdout + proc.stderr).strip()


def markdown(report: dict[str, Any]) -> str:
    dev = report["devices"]
    lines = [
        "# lars_tf GPU check",
        "",
        f"{report['date']}, {report['mode']}, {report['wall_s']:.0f} s; "
        f"overall: **{'PASS' if report['ok'] else 'FAIL'}**.",
        "",
        "## Devices",
        "",
    ]
    if dev.get("ok"):
        lines += [
            f"TensorFlow {dev['tensorflow']} (CUDA build: {dev['is_cuda_build']}, CUDA "
            f"{dev['cuda_version']}, cuDNN {dev['cudnn_version']}), Keras {dev['keras']}, "
            f"Horovod {dev['horovod']} (NCCL built: {bool(dev['horovod_nccl_built'])}, CUDA built: "
            f"{dev['horovod_cuda_built']}, Gloo built: {dev['horovod_gloo_built']}).",
            "",
            f"GPUs TensorFlow sees: {len(dev['gpus'])}",
            "",
        ]
        lines += [
            f"- {g['device']}: {g['name']} (compute {g['compute_capability']})" for g in dev["gpus"]
        ]
    else:
        lines.append(f"failed:\n\n```\n{dev.get('error')}\n```")
    if report.get("nvidia_smi"):
        lines += ["", "```", report["nvidia_smi"], "```"]
    eq = report["equivalence"]
    lines += ["", f"## {eq.get('workers')} workers = 1 worker (lars_tf.distributed)", ""]
    if eq.get("skipped"):
        lines.append(f"skipped: {eq['skipped']}")
    elif "max_abs_difference" in eq:
        lines += [
            f"Global batch {eq['global_batch']}, {eq['steps']} LARS updates: equal to one worker "
            f"(rtol {eq['tolerance']['rtol']}, atol {eq['tolerance']['atol']}): "
            f"**{eq['equal_to_one_worker']}** (largest difference {eq['max_abs_difference']:.2e}, "
            f"largest weight {eq['max_abs_weight']:.2f}); ranks bit-identical: "
            f"**{eq['ranks_bit_identical']}**; NCCL used: {eq.get('nccl_used')} "
            f"({eq.get('nccl_version_line') or 'no NCCL line'}).",
        ]
    if eq.get("error"):
        lines += ["", f"```\n{eq['error']}\n```"]
    lines += [
        "",
        "## Train step: mixed_float16 + XLA, LARS, synthetic data, one GPU",
        "",
        "| model | image | batch/GPU | step (ms) | images/s per GPU | note |",
        "|---|---|---|---|---|---|",
    ]
    for case in report["train_step"]:
        if case.get("ok"):
            note = (
                f"batch {case['batch_requested']} did not fit" if case["out_of_memory_at"] else ""
            )
            lines.append(
                f"| {case['model']} | {case['image_size']} | {case['batch_per_gpu']} | "
                f"{case['step_s'] * 1e3:.1f} | {case['images_per_s_per_gpu']:.1f} | {note} |"
            )
        else:
            lines.append(f"| {case['model']} | | | | failed | see JSON |")
    opt = report["optimizer"]
    lines += ["", "## Optimizer update: LARS / SGD time", ""]
    if opt.get("ok"):
        lines += [
            f"{opt['model']} variables ({opt['tensors']} tensors, {opt['parameters']:,} "
            f"parameters) on {opt['device']}, {opt['repeats']} interleaved rounds, medians:",
            "",
            "| variant | median (ms) |",
            "|---|---|",
        ]
        lines += [f"| {n} | {v['median'] * 1e3:.3f} |" for n, v in opt["variants"].items()]
        lines += ["", "| ratio | median | IQR |", "|---|---|---|"]
        lines += [f"| {n} | {r['median']:.3f} | {r['iqr']:.3f} |" for n, r in opt["ratios"].items()]
    else:
        lines.append(f"failed:\n\n```\n{opt.get('error')}\n```")
    if report["mode"] == "cpu_smoke":
        lines += ["", "CPU smoke mode: tiny shapes on the CPU; the numbers mean nothing."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker=equivalence_rank"]:
        worker_equivalence_rank(argv[2:])
        return 0
    args = parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](args)
        Path(args.worker_out).write_text(json.dumps(result, indent=2))
        return 0

    start = time.perf_counter()
    out_dir = Path(args.output_dir).resolve()
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": "cpu_smoke" if args.cpu_smoke else "gpu",
        "command": [sys.executable, *sys.argv],
        "nvidia_smi": nvidia_smi(),
    }
    print("gpu_check: devices", flush=True)
    report["devices"] = run_worker("devices", args, work)
    gpus = len(report["devices"].get("gpus", []))
    shapes = plan(args, gpus)
    report["plan"] = shapes
    if not args.cpu_smoke and gpus == 0:
        report["devices"]["ok"] = False
        report["devices"].setdefault("error", "TensorFlow sees no GPU (use --cpu_smoke without)")
    if report["devices"].get("ok") and not report["devices"].get("horovod_nccl_built"):
        report["devices"]["ok"] = args.cpu_smoke  # the CPU build can still run the smoke test
        report["devices"]["warning"] = "Horovod was built without NCCL (make install GPU=1)"
    print(f"gpu_check: equivalence, {shapes['workers']} workers", flush=True)
    report["equivalence"] = check_equivalence(args, shapes["workers"], work)
    report["train_step"] = []
    for model, size, batch in shapes["train"]:
        print(f"gpu_check: train step {model} {size}px batch {batch}", flush=True)
        extra = (f"--model={model}", f"--image_size={size}", f"--batch={batch}")
        extra += (f"--warmup_steps={shapes['warmup_steps']}", f"--steps={shapes['steps']}")
        case = run_worker("train_step", args, work, *extra, tag=f"_{model}")
        case.setdefault("model", model)
        report["train_step"].append(case)
    print(f"gpu_check: optimizer update on {shapes['update_model']}", flush=True)
    report["optimizer"] = run_worker(
        "optimizer",
        args,
        work,
        f"--update_model={shapes['update_model']}",
        f"--update_repeats={shapes['update_repeats']}",
    )
    parts = [report["devices"], report["optimizer"], *report["train_step"]]
    report["ok"] = all(p.get("ok") for p in parts) and report["equivalence"].get("ok") is not False
    report["wall_s"] = time.perf_counter() - start
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out_dir / "gpu_check.md").write_text(markdown(report))
    print(f"gpu_check: {'PASS' if report['ok'] else 'FAIL'}; {out_dir / 'gpu_check.md'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
