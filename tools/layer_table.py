#!/usr/bin/env python
"""Table 2 and Figure 2 of the LARS paper from train.py's per-layer trust-ratio log.

    tools/layer_table.py --run=runs/table2/b128 --run=runs/table2/b512 \\
        --output=docs/results/table2 [--table_step=0]

Reads the TensorBoard events that `lars_tf.callbacks.LayerStatisticsLogger` writes under
`<run>/tensorboard/layers` (train.py `--log_every_steps=1`): for every trainable variable,
`weight_norm/<path>` (||w|| before the update), `grad_norm/<path>` (||g|| of the batch's
gradient, weight decay not included) and `local_lr/<path>` (LARS's trust ratio, times the
global rate gives the variable's rate). Writes:

- `<output>.md`: Table 2 in the paper's layout (a column per variable, `conv1.b`, `conv1.w`,
  ..., rows ||w||, ||g||, ||w||/||g||) for the update `--table_step` of each run, and the
  spread of ||w||/||g|| over the weight matrices (kernels), the quantity LARS equalises;
- `<output>_local_lr.png`: Figure 2, each layer's local LR over the logged updates, one panel
  per run (batch size);
- `<output>.csv`: every logged value (run, step, variable, statistic, value).
"""

from __future__ import annotations

import csv
import json
import os
import re
import statistics
from collections import defaultdict
from pathlib import Path

from absl import app, flags

STATISTICS = ("weight_norm", "grad_norm", "local_lr")

flags.DEFINE_multi_string("run", None, "A train.py model directory (repeat for several).")
flags.DEFINE_string("output", None, "Output path without extension.")
flags.DEFINE_integer("table_step", 0, "The update whose norms make the table.", lower_bound=0)
FLAGS = flags.FLAGS


def read_layer_log(run_dir: str | os.PathLike) -> dict[str, dict[str, dict[int, float]]]:
    """`{statistic: {variable path: {step: value}}}` from a run's layer-statistics events.

    Raises:
        FileNotFoundError: The run has no `tensorboard/layers` events.
    """
    import tensorflow as tf

    log_dir = Path(run_dir) / "tensorboard" / "layers"
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(
            f"no layer-statistics events in {log_dir}: run train.py with --log_every_steps=1"
        )
    values: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for path in files:
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                statistic, _, variable = value.tag.partition("/")
                if statistic in STATISTICS and variable:
                    number = float(tf.make_ndarray(value.tensor))
                    values[statistic][variable][int(event.step)] = number
    return values


def short_name(path: str) -> str:
    """`conv1/kernel` -> `conv1.w`, `fc6/bias` -> `fc6.b` (the paper's names)."""
    layer, _, variable = path.rpartition("/")
    suffix = {"kernel": "w", "bias": "b"}.get(variable, variable)
    return f"{layer.split('/')[-1]}.{suffix}"


def _layer_order(path: str) -> tuple:
    """Network order: conv1..conv5, fc6..fc8, bias before weights as in the paper."""
    match = re.search(r"(conv|fc)(\d+)", path)
    number = int(match.group(2)) if match else 99
    return (number, 0 if path.endswith("bias") else 1, path)


def table(values: dict, step: int) -> tuple[list[str], list[list[float]]]:
    """Columns (short names) and rows ||w||, ||g||, ||w||/||g|| at update `step`."""
    paths = sorted(values["weight_norm"], key=_layer_order)
    paths = [p for p in paths if step in values["weight_norm"][p]]
    if not paths:
        raise ValueError(f"update {step} was not logged")
    weights = [values["weight_norm"][p][step] for p in paths]
    grads = [values["grad_norm"][p][step] for p in paths]
    ratios = [w / g if g else float("inf") for w, g in zip(weights, grads, strict=True)]
    return [short_name(p) for p in paths], [weights, grads, ratios]


def kernel_spread(names: list[str], ratios: list[float]) -> str:
    """One line: the smallest and largest ||w||/||g|| among the kernels (`*.w`), their
    quotient and the median; biases and batch-norm variables are left out."""
    kernels = sorted((r, n) for n, r in zip(names, ratios, strict=True) if n.endswith(".w"))
    if not kernels:
        return "No kernels logged."
    (low, low_name), (high, high_name) = kernels[0], kernels[-1]
    median = statistics.median(r for r, _ in kernels)
    return (
        f"‖w‖ / ‖∇w‖ over the {len(kernels)} kernels: from {_format(low)} ({low_name}) to "
        f"{_format(high)} ({high_name}), a factor of {_format(high / low)}; median "
        f"{_format(median)}."
    )


def _plan(run: str) -> dict:
    plan_file = Path(run) / "plan.json"
    return json.loads(plan_file.read_text()) if plan_file.exists() else {}


def _model(run: str) -> str:
    """The run's `--model` (and `--normalization`, if given) from train.py's `flags.txt`."""
    flags_file = Path(run) / "flags.txt"
    text = flags_file.read_text() if flags_file.exists() else ""
    model = re.search(r"^--model=(\S+)", text, re.M)
    normalization = re.search(r"^--normalization=(\S+)", text, re.M)
    name = model.group(1) if model else Path(run).name
    return f"{name} ({normalization.group(1)})" if normalization else name


def _format(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.2e}"


def write_outputs(runs: list[str], output: str, table_step: int) -> list[Path]:
    """Writes the table (.md), the plot (_local_lr.png) and the raw values (.csv)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    output_path = Path(output)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    logs = {run: read_layer_log(run) for run in runs}
    lines = []
    for run, values in logs.items():
        batch = _plan(run).get("global_batch_size", "?")
        names, rows = table(values, table_step)
        lines += [
            f"Batch {batch}, update {table_step} (`{run}`):",
            "",
            "| Layer | " + " | ".join(names) + " |",
            "|" + " --- |" * (len(names) + 1),
        ]
        for label, row in zip(("‖w‖", "‖∇w‖", "‖w‖ / ‖∇w‖"), rows, strict=True):
            lines.append(f"| {label} | " + " | ".join(_format(v) for v in row) + " |")
        lines += ["", kernel_spread(names, rows[2]), ""]
    md = output_path.with_suffix(".md")
    md.write_text("\n".join(lines))

    with open(output_path.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "step", "variable", "statistic", "value"])
        for run, values in logs.items():
            for statistic in STATISTICS:
                for path, series in sorted(values[statistic].items()):
                    for step, value in sorted(series.items()):
                        writer.writerow([run, step, path, statistic, repr(value)])

    figure, axes = plt.subplots(1, len(logs), figsize=(6 * len(logs), 4.5), squeeze=False)
    for axis, (run, values) in zip(axes[0], logs.items(), strict=True):
        batch = _plan(run).get("global_batch_size", "?")
        colors = plt.get_cmap("tab20").colors  # 16 variables: one colour each
        for index, path in enumerate(sorted(values["local_lr"], key=_layer_order)):
            series = sorted(values["local_lr"][path].items())
            style = "--" if path.endswith("bias") else "-"
            axis.plot(
                *zip(*series, strict=True),
                style,
                marker=".",
                color=colors[index % len(colors)],
                label=short_name(path),
            )
        axis.set_yscale("log")
        axis.set_xlabel("update")
        axis.set_ylabel("local LR (trust ratio, × global LR = the layer's rate)")
        axis.set_title(f"{_model(run)}, batch {batch}")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    png = output_path.parent / f"{output_path.name}_local_lr.png"
    figure.savefig(png, dpi=100)
    plt.close(figure)
    return [md, output_path.with_suffix(".csv"), png]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.run or not FLAGS.output:
        raise app.UsageError("--run (one or more) and --output are required")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for path in write_outputs(FLAGS.run, FLAGS.output, FLAGS.table_step):
        print(path)


if __name__ == "__main__":
    app.run(main)
