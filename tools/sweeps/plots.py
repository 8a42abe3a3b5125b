"""The plots of a sweep: top-1 against batch, learning rate and epochs."""

from __future__ import annotations

import math
from pathlib import Path

from sweeps.planning import longer_runs
from sweeps.protocols import LINEAR_SCALING, METHOD_TITLES, Protocol


def plot(
    protocol: Protocol,
    records: dict[str, dict],
    best_rows: list[dict],
    results_dir: Path,
    stem: str,
    stats: dict[tuple[str, str, int], dict] | None = None,
) -> list[Path]:
    """Top-1 against batch per method and model, against the learning rate per cell, against
    the epoch budget. With `stats` (`seed_stats`) and `repeat_baseline`, the batch plot shows
    the mean over seeds with error bars. Returns the files written (none without
    measurements)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figures = [
        ("accuracy_vs_batch", _plot_vs_batch(plt, protocol, best_rows, stats)),
        ("accuracy_vs_lr", _plot_vs_lr(plt, protocol, records)),
        ("accuracy_vs_epochs", _plot_vs_epochs(plt, protocol, records, best_rows)),
    ]
    written = []
    for name, figure in figures:
        if figure is None:
            continue
        figure.tight_layout()
        path = results_dir / f"{stem}_{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def _plot_vs_batch(plt, protocol: Protocol, best_rows: list[dict], stats=None):
    """Best top-1 (seed 1) per cell; with `stats` and `repeat_baseline`, the mean over the
    seeds with ± 1 sd error bars where two or more seeds finished (else seed 1, no bar)."""
    measured = [b for b in best_rows if b["best"] is not None]
    if not measured:
        return None
    seeded = bool(stats) and protocol.repeat_baseline
    figure, axes = plt.subplots(
        1, len(protocol.models), figsize=(5 * len(protocol.models), 4), squeeze=False
    )
    markers = {"sgd_warmup": "s", "lars": "o", "nesterov": "^"}
    for axis, model in zip(axes[0], protocol.models, strict=True):
        point = {}
        for b in measured:
            if b["model"] != model:
                continue
            cell = stats.get((model, b["method"], b["batch"])) if seeded else None
            if cell is not None and cell["mean"] is not None:
                point[b["method"], b["batch"]] = (cell["mean"], cell["sd"])
            else:
                point[b["method"], b["batch"]] = (100 * b["best"]["top1"], 0.0)
        for method in ("sgd_warmup", "lars", *protocol.largest_batch_methods):
            xs = sorted(batch for m, batch in point if m == method)
            if xs:
                axis.errorbar(
                    xs,
                    [point[method, x][0] for x in xs],
                    yerr=[point[method, x][1] for x in xs] if seeded else None,
                    marker=markers.get(method, "D"),
                    capsize=3,
                    label=METHOD_TITLES[method],
                )
        baseline = point.get(("sgd", protocol.baseline_batch))
        if baseline:
            axis.axhline(
                baseline[0],
                color="gray",
                linestyle="--",
                label=f"SGD, batch {protocol.baseline_batch}",
            )
            if seeded and baseline[1]:
                axis.axhspan(
                    baseline[0] - baseline[1], baseline[0] + baseline[1], color="gray", alpha=0.2
                )
        axis.set_xscale("log", base=2)
        axis.set_xlabel("batch size")
        axis.set_ylabel(
            "test top-1 (%), best LR: mean ± sd over seeds" if seeded else "test top-1 (%), best LR"
        )
        axis.set_title(f"{model}, {protocol.epochs:g} epochs")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # a model with no finished run yet has none
            axis.legend(fontsize=8)
    return figure


def base_rate(protocol: Protocol, method: str, batch: int, lr: float) -> float:
    """The grid's rate before scaling: per `baseline_batch` images for SGD, at batch 1024
    for LARS (see `Protocol`), so that every batch of a method shares one axis."""
    if method == "lars":
        return lr / math.sqrt(batch / 1024)
    if method in LINEAR_SCALING:
        return lr * protocol.baseline_batch / batch
    return lr


def _plot_vs_lr(plt, protocol: Protocol, records: dict[str, dict]):
    """One panel per model and method: top-1 against the base rate, a line per batch;
    diverged runs drawn as crosses on the x axis."""
    scaling = [r for r in records.values() if r["part"] == "scaling"]
    if not scaling:
        return None
    panels = [("sgd_warmup", "SGD + linear scaling + warm-up (batch 128: baseline)"), ("lars", "")]
    panels += [(method, "") for method in protocol.largest_batch_methods]
    figure, axes = plt.subplots(
        len(protocol.models),
        len(panels),
        figsize=(5 * len(panels), 3.6 * len(protocol.models)),
        squeeze=False,
        sharey=True,
    )
    batches = [protocol.baseline_batch, *protocol.batches]
    palette = plt.get_cmap("viridis")
    colors = {b: palette(i / max(1, len(batches) - 1)) for i, b in enumerate(batches)}
    for row, model in zip(axes, protocol.models, strict=True):
        for axis, (method, title) in zip(row, panels, strict=True):
            methods = ("sgd", method) if method == "sgd_warmup" else (method,)
            for batch in batches:
                runs = sorted(
                    (
                        r
                        for r in scaling
                        if r["model"] == model and r["method"] in methods and r["batch"] == batch
                    ),
                    key=lambda r: r["lr"],
                )
                done = [r for r in runs if r["top1"] is not None]
                x = [base_rate(protocol, r["method"], batch, r["lr"]) for r in done]
                if done:
                    axis.plot(
                        x,
                        [100 * r["top1"] for r in done],
                        marker="o",
                        color=colors[batch],
                        label=f"batch {batch}",
                    )
                diverged = [
                    base_rate(protocol, r["method"], batch, r["lr"])
                    for r in runs
                    if r["top1"] is None
                ]
                if diverged:
                    axis.plot(diverged, [0] * len(diverged), "x", color=colors[batch], ms=9)
            axis.set_xscale("log")
            grid = protocol.lars_base_lrs if method == "lars" else protocol.sgd_base_lrs
            if method == "sgd_warmup":
                grid = sorted({*grid, *protocol.baseline_lrs})
            axis.set_xticks(grid, labels=[f"{r:g}" for r in grid])
            axis.minorticks_off()
            axis.set_xlim(min(grid) / 1.25, max(grid) * 1.25)
            axis.set_xlabel(
                "rate at batch 1024 (LR / sqrt(batch / 1024))"
                if method == "lars"
                else "rate per 128 images (LR x 128 / batch)"
            )
            axis.set_ylabel("test top-1 (%)")
            axis.set_title(f"{model}: {title or METHOD_TITLES[method]}", fontsize=9)
            axis.grid(alpha=0.3)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7, title="x on the axis: diverged", title_fontsize=7)
    return figure


def _plot_vs_epochs(plt, protocol: Protocol, records: dict[str, dict], best_rows: list[dict]):
    # The runs at today's best rate; those at an earlier best stay in the CSV only.
    longer = [
        r
        for r in longer_runs(protocol, records)
        if r.name in records and records[r.name]["top1"] is not None
    ]
    if not longer:
        return None
    measured = [b for b in best_rows if b["best"] is not None]
    figure, axis = plt.subplots(figsize=(5, 4))
    batch = max(protocol.batches)
    for model in protocol.models:
        cell = next(
            (
                b
                for b in measured
                if (b["model"], b["method"], b["batch"]) == (model, "lars", batch)
            ),
            None,
        )
        if cell is None:
            continue
        points = [(r.epochs, 100 * records[r.name]["top1"]) for r in longer if r.model == model]
        points.append((protocol.epochs, 100 * cell["best"]["top1"]))
        axis.plot(*zip(*sorted(points), strict=True), marker="o", label=model)
        baseline = next((b for b in measured if (b["model"], b["method"]) == (model, "sgd")), None)
        if baseline is not None:
            axis.axhline(
                100 * baseline["best"]["top1"],
                color="gray",
                linestyle="--",
                label=f"{model}: SGD, batch {protocol.baseline_batch}, {protocol.epochs:g} epochs",
            )
    axis.set_xlabel("epochs")
    axis.set_ylabel("test top-1 (%)")
    axis.set_title(f"LARS, batch {batch}: longer training")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure
