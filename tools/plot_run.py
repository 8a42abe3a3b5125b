"""Draws one or several train.py runs in one PNG, so that two runs are compared in a picture.

    python tools/plot_run.py --model_dir=runs/lars_b8k --model_dir=runs/sgd_b8k \
        --output=compare.png

Per run (one colour each): the training loss and top-1 of every epoch and the validation
ones where the run evaluated (`<model_dir>/training_log.csv`, Keras' CSVLogger), the global
learning rate of every logged update, and, in a panel of its own, the local LR of every
variable (`<model_dir>/tensorboard/layers`, written by
`lars_tf.callbacks.LayerStatisticsLogger` every `--log_every_steps` updates). A run without
the layer logs (`--log_every_steps=0`) gets its learning rate from the CSV, one point per
epoch, and no local-LR panel. Needs matplotlib (the dev extra of setup.cfg).
"""

from __future__ import annotations

import csv
import glob
import math
import os
import re
import sys
from collections.abc import Sequence

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_multi_string(
    "model_dir", None, "A train.py --model_dir to draw; repeat the flag to compare runs."
)
flags.DEFINE_list(
    "labels", None, "Legend names of the runs, in --model_dir order (default: folder names)."
)
flags.DEFINE_string("output", "run.png", "The PNG to write.")
flags.DEFINE_string(
    "layers",
    None,
    "Regular expression: only the variables whose path it matches (re.search) get a local-LR "
    "curve, e.g. 'kernel'. Default: every variable the run logged.",
)
flags.DEFINE_integer("dpi", 110, "Resolution of the PNG.")
flags.DEFINE_string("title", None, "Title of the figure (default: the run labels).")

CSV_NAME = "training_log.csv"
LAYERS_DIR = os.path.join("tensorboard", "layers")
LOCAL_LR = "local_lr/"
# Variables named in a local-LR legend; more get a colour bar from input to output.
MAX_LEGEND = 24


def read_training_log(model_dir: str) -> dict[str, list[float]]:
    """The columns of `<model_dir>/training_log.csv` as floats (empty cells as NaN); `epoch`
    becomes the number of epochs done (Keras logs the 0-based index of the epoch ended).

    A resumed run appends to the file: a repeated epoch keeps its last row."""
    path = os.path.join(model_dir, CSV_NAME)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_epoch = {}
    for row in rows:
        by_epoch[int(float(row["epoch"]))] = row
    columns: dict[str, list[float]] = {}
    for epoch in sorted(by_epoch):
        row = by_epoch[epoch]
        for key, value in row.items():
            if key is None:
                continue
            try:
                number = float(value) if value not in ("", None) else math.nan
            except ValueError:
                number = math.nan
            columns.setdefault(key, []).append(number)
    if "epoch" in columns:
        columns["epoch"] = [e + 1 for e in columns["epoch"]]
    return columns


def _scalar(value) -> float | None:
    import tensorflow as tf

    if value.HasField("simple_value"):
        return float(value.simple_value)
    if value.HasField("tensor"):
        array = tf.make_ndarray(value.tensor)
        if array.size == 1 and array.dtype.kind in "fiu":
            return float(array.reshape(()))
    return None


def read_layer_scalars(model_dir: str) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar of `<model_dir>/tensorboard/layers` by tag: `(steps, values)`, sorted by
    step, the last value kept where a resumed run wrote a step again; {} without the logs.

    Tags (`LayerStatisticsLogger`): `learning_rate` (the global rate of update t) and
    `local_lr/<path>`, `weight_norm/<path>`, `grad_norm/<path>` per variable."""
    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(model_dir, LAYERS_DIR, "events.out.tfevents.*")))
    series: dict[str, dict[int, float]] = {}
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                number = _scalar(value)
                if number is not None:
                    series.setdefault(value.tag, {})[int(event.step)] = number
    return {
        tag: (sorted(points), [points[s] for s in sorted(points)]) for tag, points in series.items()
    }


class Run:
    """One run's curves, read from its model directory."""

    def __init__(self, model_dir: str, label: str | None = None, layers: str | None = None):
        self.model_dir = model_dir
        self.label = label or os.path.basename(os.path.normpath(model_dir))
        self.log = read_training_log(model_dir)
        scalars = read_layer_scalars(model_dir)
        pattern = re.compile(layers) if layers else None
        self.local_lr = {
            tag[len(LOCAL_LR) :]: points
            for tag, points in scalars.items()
            if tag.startswith(LOCAL_LR)
            and (pattern is None or pattern.search(tag[len(LOCAL_LR) :]))
        }
        self.learning_rate = scalars.get("learning_rate")
        self.lr_per_update = self.learning_rate is not None


def _plot_metric(ax, runs: Sequence[Run], colors, key: str, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    for run, color in zip(runs, colors, strict=True):
        epochs = run.log.get("epoch", [])
        for column, style, suffix in ((key, "-", "train"), (f"val_{key}", "--", "validation")):
            values = run.log.get(column)
            if values and any(not math.isnan(v) for v in values):
                ax.plot(
                    epochs, values, style, color=color, marker=".", label=f"{run.label} {suffix}"
                )
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")


def plot(runs: Sequence[Run], output: str, dpi: int = 110, title: str | None = None) -> str:
    """Writes the figure of `runs` to `output` (PNG) and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = [f"C{i % 10}" for i in range(len(runs))]
    with_layers = [run for run in runs if run.local_lr]
    rows = 2 if with_layers else 1
    bottom = max(len(with_layers), 1)
    fig = plt.figure(figsize=(max(16, 8 * bottom), 4.8 * rows), layout="constrained")
    grid = fig.add_gridspec(rows, 1)
    top = grid[0].subgridspec(1, 3)
    _plot_metric(fig.add_subplot(top[0]), runs, colors, "loss", "loss", "cross-entropy")
    _plot_metric(fig.add_subplot(top[1]), runs, colors, "top1", "top-1 accuracy", "top-1")
    ax = fig.add_subplot(top[2])
    for run, color in zip(runs, colors, strict=True):
        if run.lr_per_update:
            steps, values = run.learning_rate
            ax.plot(steps, values, color=color, label=f"{run.label} (per update)")
        elif "learning_rate" in run.log:
            # No layer logs: the CSV's rate at the end of each epoch, against the epoch.
            ax.plot(
                run.log["epoch"],
                run.log["learning_rate"],
                color=color,
                marker=".",
                label=f"{run.label} (per epoch, x = epoch)",
            )
    ax.set(title="learning rate schedule", xlabel="update", ylabel="global LR")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    if with_layers:
        cmap = plt.get_cmap("viridis")
        lower = grid[1].subgridspec(1, bottom)
        for i, run in enumerate(with_layers):
            ax = fig.add_subplot(lower[i])
            names = list(run.local_lr)
            for j, name in enumerate(names):
                steps, values = run.local_lr[name]
                ax.plot(steps, values, color=cmap(j / max(len(names) - 1, 1)), lw=1, label=name)
            if all(v > 0 for _, values in run.local_lr.values() for v in values):
                ax.set_yscale("log")
            ax.set(
                title=f"{run.label}: local LR of each of {len(names)} variables",
                xlabel="update",
                ylabel="local LR (trust ratio)",
            )
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if len(names) <= MAX_LEGEND:
                ax.legend(fontsize="xx-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
            else:
                colorbar = fig.colorbar(
                    matplotlib.cm.ScalarMappable(
                        matplotlib.colors.Normalize(0, len(names) - 1), cmap
                    ),
                    ax=ax,
                )
                colorbar.set_label("variable, input (0) to output")
    fig.suptitle(title or " vs ".join(run.label for run in runs))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=dpi)
    plt.close(fig)
    return output


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.model_dir:
        raise app.UsageError("give at least one --model_dir")
    labels = FLAGS.labels or []
    if labels and len(labels) != len(FLAGS.model_dir):
        raise app.UsageError(
            f"--labels has {len(labels)} names for {len(FLAGS.model_dir)} --model_dir"
        )
    runs = []
    for i, model_dir in enumerate(FLAGS.model_dir):
        if not os.path.isfile(os.path.join(model_dir, CSV_NAME)):
            raise app.UsageError(f"{model_dir} has no {CSV_NAME}: not a train.py --model_dir?")
        runs.append(Run(model_dir, labels[i] if labels else None, FLAGS.layers))
    path = plot(runs, FLAGS.output, FLAGS.dpi, FLAGS.title)
    for run in runs:
        points = len(run.learning_rate[0]) if run.lr_per_update else 0
        print(
            f"{run.label}: {len(run.log.get('epoch', []))} epoch(s), {points} logged update(s), "
            f"{len(run.local_lr)} variable(s) with a local LR",
            file=sys.stderr,
        )
    print(path)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)
