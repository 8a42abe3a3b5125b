"""Part 5: predicted data-parallel scaling efficiency from the ring all-reduce cost model.

```
t_compute(B)  = B * t_image                               (one GPU, per step, batch B per GPU)
t_allreduce   = 2 (N - 1) / N * S / W                     (ring all-reduce of S gradient bytes,
                                                           N workers, link bandwidth W)
efficiency    = t_compute / (t_compute + t_exposed)       (= throughput of N / (N x one))
t_exposed     = t_allreduce                               (no overlap)
              = max(0, t_allreduce - 2/3 t_compute)       (full overlap with the backward pass,
                                                           2/3 of the compute)
```

`t_image` is one GPU's training time per image from one published table that has both
models, measured with the same script on the same GPUs (`GPU` in `tools/bench/scaling.py`).
This CPU's times per image (part 2, scaled to the reference resolution by the pixel count)
are set beside them: one CPU-to-GPU factor taken from ResNet-50 would predict AlexNet's GPU
time badly (on a CPU its grouped convolutions and large fully connected layers at a small
batch cost far more, relative to ResNet-50, than on a GPU), so the table uses the published
time of each model. Gradients are float32, no compression; `t_image` is taken as independent
of the batch. Ignored: per-message latency (2(N-1) steps of a ring; hierarchical all-reduce
hides it), contention and stragglers, input pipeline stalls; so the table is an upper bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

WORKERS = (8, 16, 32, 64, 128, 256, 512, 1024)
BATCHES = (32, 64, 128, 256)
BANDWIDTHS_GBIT = (25, 100)
# Share of a step's compute spent in the backward pass, which all-reduce can overlap.
BACKWARD_SHARE = 2.0 / 3.0
BYTES_PER_GRADIENT = 4


@dataclasses.dataclass(frozen=True)
class GpuAssumption:
    """Published single-GPU training throughputs, images per second, by model role."""

    name: str
    images_per_s: dict[str, float]
    source: str


P100 = GpuAssumption(
    name=(
        "NVIDIA Tesla P100 (DGX-1), TensorFlow tf_cnn_benchmarks, float32, synthetic data, "
        "1 GPU, batch 64 (ResNet-50) and 512 (AlexNet)"
    ),
    images_per_s={"resnet50": 219.0, "alexnet": 2987.0},
    source=(
        "TensorFlow performance benchmarks, May 2017 (tensorflow/tensorflow, "
        "tensorflow/docs_src/performance/benchmarks.md, 'Details for NVIDIA DGX-1 (NVIDIA "
        "Tesla P100)', 'Training synthetic data'); the GPU generation of the paper's time"
    ),
)
GPU = P100


def ring_allreduce_seconds(gradient_bytes: float, workers: int, bandwidth_gbit: float) -> float:
    """`2 (N - 1) / N * S / W`: the bandwidth term of a ring all-reduce (0 for one worker)."""
    if workers < 1 or bandwidth_gbit <= 0:
        raise ValueError(f"need workers >= 1 and bandwidth > 0, got {workers}, {bandwidth_gbit}")
    return 2.0 * (workers - 1) / workers * gradient_bytes * 8.0 / (bandwidth_gbit * 1e9)


def efficiency(compute_s: float, allreduce_s: float, overlap: bool = False) -> float:
    """Scaling efficiency of one step; see the module docstring for `overlap`."""
    exposed = max(0.0, allreduce_s - BACKWARD_SHARE * compute_s) if overlap else allreduce_s
    return compute_s / (compute_s + exposed)


def single_factor_gpu_seconds(
    cpu_seconds_per_image: Mapping[str, float], gpu: GpuAssumption = GPU
) -> dict[str, float]:
    """GPU time per image if every model ran `k` times faster on the GPU than on this CPU,
    with `k` taken from ResNet-50's published throughput (a cross-check, not the table's input).

    Args:
        cpu_seconds_per_image: model role -> measured CPU seconds per training image at the
            model's reference resolution; must include "resnet50", the anchor.
        gpu: the published throughputs.
    """
    if "resnet50" not in cpu_seconds_per_image:
        raise ValueError("cpu_seconds_per_image needs the anchor 'resnet50'")
    anchor = cpu_seconds_per_image["resnet50"]
    return {
        role: seconds / anchor / gpu.images_per_s["resnet50"]
        for role, seconds in cpu_seconds_per_image.items()
    }


def table(
    models: Mapping[str, Mapping[str, float]],
    *,
    overlap: bool = False,
    workers: Sequence[int] = WORKERS,
    batches: Sequence[int] = BATCHES,
    bandwidths_gbit: Sequence[float] = BANDWIDTHS_GBIT,
) -> list[dict[str, Any]]:
    """Rows of predicted efficiency: one per model, bandwidth and per-GPU batch.

    Args:
        models: role -> {"parameters": trainable parameters, "gpu_s_per_image": seconds}.
        overlap: overlap the all-reduce with the backward pass.
    """
    rows = []
    for role, model in models.items():
        gradient_bytes = model["parameters"] * BYTES_PER_GRADIENT
        for bandwidth in bandwidths_gbit:
            for batch in batches:
                compute = batch * model["gpu_s_per_image"]
                rows.append(
                    {
                        "model": role,
                        "bandwidth_gbit": bandwidth,
                        "batch_per_gpu": batch,
                        "compute_ms": compute * 1e3,
                        "efficiency": {
                            n: efficiency(
                                compute,
                                ring_allreduce_seconds(gradient_bytes, n, bandwidth),
                                overlap,
                            )
                            for n in workers
                        },
                    }
                )
    return rows


def run(train_result: Mapping[str, Any], gpu: GpuAssumption = GPU) -> dict[str, Any]:
    """Part 5 from the published GPU times and part 2's measurements (`train_step.run`)."""
    cpu_reference, measured = {}, {}
    for case in train_result["cases"]:
        scale = (case["reference_image_size"] / case["image_size"]) ** 2
        cpu_reference[case["role"]] = case["compute_s_per_image"] * scale
        measured[case["role"]] = {
            "model": case["model"],
            "image_size": case["image_size"],
            "cpu_s_per_image": case["compute_s_per_image"],
            "pixel_scale_to_reference": scale,
            "reference_image_size": case["reference_image_size"],
            "parameters": case["trainable_parameters"],
            "gradient_mb": case["trainable_parameters"] * BYTES_PER_GRADIENT / 1e6,
        }
    single_factor = single_factor_gpu_seconds(cpu_reference, gpu)
    models = {}
    for role, entry in measured.items():
        gpu_images_per_s = gpu.images_per_s[role]
        entry["gpu_images_per_s"] = gpu_images_per_s
        entry["cpu_to_gpu_speedup"] = cpu_reference[role] * gpu_images_per_s
        entry["single_factor_gpu_images_per_s"] = 1.0 / single_factor[role]
        models[role] = {"parameters": entry["parameters"], "gpu_s_per_image": 1 / gpu_images_per_s}
    return {
        "gpu": dataclasses.asdict(gpu),
        "backward_share": BACKWARD_SHARE,
        "models": measured,
        "no_overlap": table(models, overlap=False),
        "backward_overlap": table(models, overlap=True),
        "targets": [],
    }
