"""tools/sweep.py: resumability, the order of runs, and the report, on fake runs.

The runs here are fakes (an executor that writes what train.py writes) so that the grid logic
is tested in a second; `test_train_arguments_parse` checks the real command lines against
train.py's flags and the recipe files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

import pytest
from tool_modules import load_tool

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tools"))

import sweep  # noqa: E402

TINY = sweep.Protocol(
    name="tiny",
    models=("alexnet_bn_small",),
    epochs=2,
    baseline_batch=128,
    batches=(1024, 2048),
    baseline_lrs=(0.05, 0.1),
    sgd_base_lrs=(0.05, 0.1),
    lars_base_lrs=(5.0, 10.0, 20.0),
    warmup_epochs=1,
)


def fake_accuracy(run: sweep.Run) -> float:
    """A made-up outcome: LARS best at its middle rate, SGD + warm-up worse at larger
    batches, longer runs better."""
    if run.method == "lars":
        return 0.6 - abs(run.lr - 10.0 * (run.batch / 1024) ** 0.5) / 100 + run.epochs / 100
    return 0.5 - run.batch / 1e5 + run.lr / 100


class FakeTrain:
    """Writes `results.json` and `training_log.csv` as train.py does, with top-1 from
    `accuracy`; exits as told."""

    def __init__(self, exit_codes: dict[str, int] | None = None, accuracy=fake_accuracy):
        self.calls: list[str] = []
        self.exit_codes = exit_codes or {}
        self.accuracy = accuracy

    def short_calls(self) -> list[str]:
        """The runs in the order they were started, without the model's name."""
        return [name.removeprefix("alexnet_bn_small_") for name in self.calls]

    def __call__(self, run: sweep.Run, model_dir: Path) -> int:
        self.calls.append(run.name)
        model_dir.mkdir(parents=True, exist_ok=True)
        code = self.exit_codes.get(run.name, 0)
        if code == 0:
            top1 = self.accuracy(run)
            (model_dir / "results.json").write_text(
                json.dumps({"step": 10, "top1": top1, "top5": 0.9, "loss": 1.0})
            )
            (model_dir / "training_log.csv").write_text("epoch,loss,top1\n0,2.0,0.3\n1,1.5,0.5\n")
        return code


def test_runs_order_and_rates():
    runs = sweep.scaling_runs(TINY)
    # 1 baseline cell x 2 rates + 2 batches x (2 SGD rates + 3 LARS rates), + the ablation.
    assert len(runs) == 2 + 2 * (2 + 3) + 1
    assert len({r.name for r in runs}) == len(runs)
    # The batch-norm ablation follows its twin: the LARS cell nearest 4096, middle rate,
    # without re-estimation.
    ablation = runs.pop(3)
    # The middle rate of each of the 5 cells comes first.
    first = runs[:5]
    assert [(r.method, r.batch) for r in first] == [
        ("sgd", 128),
        ("sgd_warmup", 2048),
        ("lars", 2048),
        ("sgd_warmup", 1024),
        ("lars", 1024),
    ]
    assert [r.lr for r in first] == [0.1, 1.6, 14.1, 0.8, 10.0]
    assert (ablation.part, ablation.method, ablation.batch, ablation.lr) == (
        "bn_ablation",
        "lars",
        2048,
        14.1,
    )
    assert ablation.name.endswith("_movingstats") and "--bn_recalibration_batches=0" in (
        ablation.train_args(TINY, Path("/x"))
    )
    assert all(r.recalibrate for r in runs if r is not ablation)
    assert sweep.cell_lrs(TINY, "sgd_warmup", 2048) == [0.8, 1.6]  # linear scaling from 128
    assert sweep.cell_lrs(TINY, "lars", 2048) == [7.07, 14.1, 28.3]  # sqrt scaling from 1K
    assert all(r.warmup_epochs == 0 for r in runs if r.method == "sgd")
    assert all(r.warmup_epochs == 1 for r in runs if r.method != "sgd")


def test_sweep_resumes_and_never_redoes_finished_runs(tmp_path):
    fake = FakeTrain()
    records = sweep.sweep(TINY, tmp_path / "runs", tmp_path / "results", fake, max_runs=4)
    assert len(fake.calls) == 4 and len(records) == 4
    again = FakeTrain()
    records = sweep.sweep(TINY, tmp_path / "runs", tmp_path / "results", again)
    assert not set(again.calls) & set(fake.calls)
    # All scaling runs, then the 3 train-longer runs with the best LARS rate of batch 2048.
    assert len(records) == 13 + 3
    longer = [r for r in records.values() if r["part"] == "longer"]
    assert sorted(r["epochs"] for r in longer) == [2.5, 3.0, 4.0]
    assert {r["lr"] for r in longer} == {14.1} and {r["batch"] for r in longer} == {2048}
    # They ran as soon as they could, before the baseline's other rate (the slowest run).
    order = fake.calls + again.calls
    assert order[-1] == "alexnet_bn_small_sgd_b128_lr0.05_e2_s1"
    assert [n for n in order if "_e2_" not in n] == [
        "alexnet_bn_small_lars_b2048_lr14.1_e2.5_s1",
        "alexnet_bn_small_lars_b2048_lr14.1_e3_s1",
        "alexnet_bn_small_lars_b2048_lr14.1_e4_s1",
    ]
    third = FakeTrain()
    sweep.sweep(TINY, tmp_path / "runs", tmp_path / "results", third)
    assert third.calls == []


def test_a_fresh_checkout_resumes_from_the_committed_csv(tmp_path):
    # Run directories are not committed; the report's CSV is. With the runs gone, the
    # finished ones count as done from their rows, their outcomes unchanged, and the
    # report is rewritten with them, not without them.
    fake = FakeTrain(exit_codes={"alexnet_bn_small_lars_b2048_lr14.1_e2_s1": 3})
    first = sweep.sweep(TINY, tmp_path / "runs", tmp_path / "results", fake, max_runs=4)
    diverged = [r for r in first.values() if r["status"] == "diverged"]
    assert len(diverged) == 1
    shutil.rmtree(tmp_path / "runs")
    again = FakeTrain()
    resumed = sweep.sweep(TINY, tmp_path / "runs", tmp_path / "results", again, max_runs=1)
    assert not set(again.calls) & set(fake.calls) and len(again.calls) == 1
    for name, record in first.items():
        assert resumed[name] == record, name
    with open(tmp_path / "results" / "cifar10_tiny_runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 5
    # A row the protocol does not know (an older grid), or whose run differs from the
    # protocol's of that name (another warm-up), is not a record, and is kept aside.
    results = tmp_path / "results"
    with open(results / "cifar10_tiny_runs.csv") as f:
        rows = list(csv.DictReader(f))
    done = next(r for r in rows if r["status"] == "done")
    older = {**done, "warmup_epochs": "5"}
    unknown = {**done, "name": "alexnet_bn_small_lars_b2048_lr99_e2_s1", "lr": "99"}
    with open(results / "cifar10_tiny_runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(done))
        writer.writeheader()
        writer.writerows([r for r in rows if r is not done] + [older, unknown])
    shutil.rmtree(tmp_path / "runs")
    found = sweep.collect(TINY, tmp_path / "runs" / "tiny", results)
    assert found.keys() == resumed.keys() - {done["name"]}
    with open(results / "cifar10_tiny_runs_other.csv") as f:
        assert [r["name"] for r in csv.DictReader(f)] == [done["name"], unknown["name"]]


def test_order_climbs_towards_each_cells_best_rate(tmp_path):
    """After the middle rates, each cell tries the neighbours of its best rate so far, so a
    sweep stopped early has bracketed as many optima as it could."""
    wide = dataclasses.replace(
        TINY, name="wide", batches=(2048,), lars_base_lrs=(2.5, 5.0, 10.0, 20.0, 40.0)
    )

    def rising(run: sweep.Run) -> float:  # every cell's best is its largest rate
        return run.lr / 100

    fake = FakeTrain({"alexnet_bn_small_sgd_warmup_b2048_lr1.6_e2_s1": 3}, accuracy=rising)
    sweep.sweep(wide, tmp_path / "runs", tmp_path / "results", fake)
    assert fake.short_calls() == [
        # The middle rate of every cell (the SGD + warm-up one diverges), the ablation.
        "sgd_b128_lr0.1_e2_s1",
        "sgd_warmup_b2048_lr1.6_e2_s1",
        "lars_b2048_lr14.1_e2_s1",
        "lars_b2048_lr14.1_e2_s1_movingstats",
        # Neighbours of each cell's best, largest batch first, the baseline last: below a
        # divergence; both sides of LARS's middle, then up while the top rate stays best.
        "sgd_warmup_b2048_lr0.8_e2_s1",
        "lars_b2048_lr7.07_e2_s1",
        "lars_b2048_lr28.3_e2_s1",
        "lars_b2048_lr56.6_e2_s1",
        # LARS's best is bracketed (at the grid's top): train longer at that rate.
        "lars_b2048_lr56.6_e2.5_s1",
        "lars_b2048_lr56.6_e3_s1",
        "lars_b2048_lr56.6_e4_s1",
        # The baseline's neighbour, the rest of the grid.
        "sgd_b128_lr0.05_e2_s1",
        "lars_b2048_lr3.54_e2_s1",
    ]


def test_runs_at_chance_rank_as_failures_when_climbing():
    """Two runs at chance (10% on CIFAR-10) differ by noise: the climb goes below the smaller
    rate, not towards the larger one that was luckier."""
    wide = dataclasses.replace(TINY, batches=(2048,), sgd_base_lrs=(0.01, 0.02, 0.05, 0.1))
    cell = sweep.cell_lrs(wide, "sgd_warmup", 2048)  # [0.16, 0.32, 0.8, 1.6]

    def climb(top1_by_lr: dict[float, float | None]) -> list[float]:
        records = {
            r.name: {"top1": top1_by_lr[r.lr]}
            for r in sweep.scaling_runs(wide)
            if r.method == "sgd_warmup" and r.lr in top1_by_lr
        }
        return [r.lr for r in sweep.next_to_best(wide, "alexnet_bn_small", records)]

    assert climb({cell[2]: 0.0994}) == [cell[1]]  # a failure: only down, never up
    assert climb({cell[2]: 0.0994, cell[1]: 0.0975}) == [cell[0]]
    assert climb({cell[2]: 0.0994, cell[1]: None}) == [cell[0]]
    assert climb({cell[2]: 0.0994, cell[1]: 0.30}) == [cell[0]]  # best 0.32: go on down
    assert climb({cell[2]: 0.40, cell[1]: 0.30}) == [cell[3]]


def test_best_rates_are_repeated_with_more_seeds(tmp_path):
    """Once a large-batch cell's best rate is bracketed, it runs again with each repeat seed;
    the report gives the spread and the LARS - SGD difference of the means."""
    seeded = dataclasses.replace(TINY, name="seeded", repeat_seeds=(2, 3))

    fake = FakeTrain(accuracy=lambda run: fake_accuracy(run) + run.seed / 100)
    records = sweep.sweep(seeded, tmp_path / "runs", tmp_path / "results", fake)
    repeats = sorted(
        (r["method"], r["batch"], r["lr"], r["seed"])
        for r in records.values()
        if r["part"] == "repeat"
    )
    assert repeats == [
        (method, batch, lr, seed)
        for method, batch, lr in [
            ("lars", 1024, 10.0), ("lars", 2048, 14.1),
            ("sgd_warmup", 1024, 0.8), ("sgd_warmup", 2048, 1.6),
        ]
        for seed in (2, 3)
    ]  # fmt: skip
    # Each ran only after its cell's best was bracketed.
    calls = fake.short_calls()
    assert calls.index("lars_b2048_lr14.1_e2_s2") > max(
        calls.index(f"lars_b2048_lr{lr}_e2_s1") for lr in ("7.07", "14.1", "28.3")
    )
    assert sweep.collect(seeded, tmp_path / "runs" / "seeded").keys() == records.keys()
    page = (tmp_path / "results" / "cifar10_seeded.md").read_text()
    # fake_accuracy + seed / 100: SGD 0.5 - 0.02048 + 0.016 + s / 100, LARS 0.6196 + s / 100.
    assert "| alexnet_bn_small | 2048 | 1.6 | 50.55 / 51.55 / 52.55 | 51.55 ± 1.00 | 14.1 |" in page
    assert "| 62.96 / 63.96 / 64.96 | 63.96 ± 1.00 | +12.41 ± 0.82 |" in page


def test_diverged_runs_are_results_and_crashes_stop_the_sweep(tmp_path):
    runs = sweep.scaling_runs(TINY)
    diverging, crashing = runs[1].name, runs[2].name  # SGD + warm-up and LARS at 2048
    fake = FakeTrain({diverging: 3, crashing: 1})
    # A crash exits 1, as any uncaught Python error does: not to be taken for a divergence.
    with pytest.raises(SystemExit, match="exit status 1"):
        sweep.sweep(TINY, tmp_path / "runs", tmp_path / "results", fake)
    assert fake.calls == [runs[0].name, diverging, crashing]
    # The crash is retried on the next start (train.py resumes it); the divergence is not.
    retry = FakeTrain()
    records = sweep.sweep(TINY, tmp_path / "runs", tmp_path / "results", retry, max_runs=1)
    assert retry.calls == [crashing]
    assert records[diverging]["status"] == "diverged" and records[diverging]["top1"] is None


def test_report_tables_mark_partial_results(tmp_path):
    fake = FakeTrain({sweep.scaling_runs(TINY)[4].name: 3})  # SGD + warm-up, 1024
    sweep.sweep(TINY, tmp_path / "runs", tmp_path / "results", fake, max_runs=6)
    page = (tmp_path / "results" / "cifar10_tiny.md").read_text()
    assert "Runs finished: 5 of 12 batch-scaling runs and 0 of 3 train-longer runs" in page
    assert "**partial**" in page
    # Best per cell: the LARS 1024 cell has one run, LR 10, 0.6 + 0.02 -> 62.00.
    assert "| alexnet_bn_small | LARS + warm-up + poly(2) | 1024 | 62.00 | 10 | 1 / 3 |" in page
    # The SGD + warm-up 1024 run diverged: it counts as done, with no accuracy.
    assert "| 1024 | diverged | - | 1 / 2 (1 diverged) |" in page
    assert "LR 7.07: not run" in page
    assert "| alexnet_bn_small | LARS + warm-up + poly(2) | 2048 | 14.1 | 61.96 | 61.96 |" in page
    assert "| alexnet_bn_small | 2048 | 61.96 | not run | not run | not run |" in page
    for figure in ("accuracy_vs_batch", "accuracy_vs_lr"):
        assert (tmp_path / "results" / f"cifar10_tiny_{figure}.png").stat().st_size > 1000
        assert f"![cifar10_tiny_{figure}](cifar10_tiny_{figure}.png)" in page
    # The LR plot's axis: every batch of a method on the grid's unscaled rates.
    assert sweep.base_rate(TINY, "sgd_warmup", 2048, 1.6) == pytest.approx(0.1)
    assert sweep.base_rate(TINY, "lars", 4096, 20.0) == pytest.approx(10.0)
    assert sweep.base_rate(TINY, "sgd", 128, 0.05) == 0.05
    logs = sorted((tmp_path / "results" / "logs" / "tiny").glob("*.csv"))
    assert len(logs) == 5  # the diverged run wrote no log
    with open(tmp_path / "results" / "cifar10_tiny_runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"done", "diverged"}


def test_train_arguments_parse(tmp_path):
    """The real command line of every kind of run is accepted by train.py's flags."""
    pytest.importorskip("tensorflow")
    from absl import flags

    sys.path.insert(0, str(REPO_ROOT))
    import train_flags

    data_dir = tmp_path / "cifar"
    (data_dir / "train").mkdir(parents=True)
    bn_all = dataclasses.replace(TINY, models=("alexnet_bn_small_bn_all",))
    nesterov = [r for r in sweep.scaling_runs(sweep.PROTOCOLS["claim"]) if r.method == "nesterov"]
    for run in sweep.scaling_runs(TINY)[:3] + sweep.scaling_runs(bn_all)[:1] + nesterov[:1]:
        values = flags.FlagValues()
        train_flags.define_all(values)
        args = run.train_args(TINY, tmp_path / run.name) + [f"--data_dir={data_dir}"]
        cwd = Path.cwd()
        try:
            os.chdir(REPO_ROOT)  # the recipes name each other relative to the repository
            values(["train.py", *args])
        finally:
            os.chdir(cwd)
        assert values.optimizer == ("lars" if run.method == "lars" else "sgd")
        assert values.nesterov == (run.method == "nesterov")
        assert values.learning_rate == pytest.approx(run.lr)
        assert values.global_batch_size == run.batch
        assert values.bn_recalibration_batches == -(-TINY.recalibration_images // run.batch)
        assert values.preprocessing == "cifar" and values.eval_split == "test"
        assert dataclasses.asdict(run)["epochs"] == values.epochs
        assert values.model == "alexnet_bn_small"
        options = train_flags.model_options(values)
        assert options["groups"] == 1 and options["dropout"] == 0
        assert options.get("normalization") == (
            "batch_norm_all" if run.model.endswith("bn_all") else None
        )


def test_protocol_without_longer_runs_or_bn_ablation(tmp_path):
    """The batch-norm-everywhere protocol's shape: scaling cells and repeats only."""
    protocol = dataclasses.replace(
        TINY, models=("alexnet_bn_small_bn_all",), repeat_seeds=(2,), longer=(), bn_ablation=False
    )
    assert sweep.PROTOCOLS["quick_bn_all"].longer == ()
    assert not sweep.PROTOCOLS["quick_bn_all"].bn_ablation
    records = sweep.sweep(protocol, tmp_path / "runs", tmp_path / "results", FakeTrain())
    assert {r["part"] for r in records.values()} == {"scaling", "repeat"}
    assert len([r for r in records.values() if r["part"] == "scaling"]) == 2 + 2 * (2 + 3)
    page = (tmp_path / "results" / "cifar10_tiny.md").read_text()
    assert "## Seeds" in page and "alexnet_bn_small_bn_all" in page
    assert "Train longer" not in page and "moving averages" not in page
    assert "Runs finished: 12 of 12 batch-scaling runs." in page


def test_layer_table_from_trust_ratio_events(tmp_path):
    """tools/layer_table.py reads LayerStatisticsLogger's event layout into Table 2's."""
    tf = pytest.importorskip("tensorflow")
    layer_table = load_tool("layer_table")

    run = tmp_path / "b256"
    writer = tf.summary.create_file_writer(str(run / "tensorboard" / "layers"))
    norms = {"conv1/kernel": (5.76, 1.0), "conv1/bias": (1.61, 0.22), "fc8/kernel": (3.0, 0.5)}
    with writer.as_default():
        for step in range(3):
            for path, (w, g) in norms.items():
                tf.summary.scalar(f"weight_norm/{path}", w + step, step=step)
                tf.summary.scalar(f"grad_norm/{path}", g, step=step)
                tf.summary.scalar(f"local_lr/{path}", 0.001 * (w + step) / g, step=step)
    writer.close()
    (run / "plan.json").write_text(json.dumps({"global_batch_size": 256}))
    names, rows = layer_table.table(layer_table.read_layer_log(run), step=0)
    assert names == ["conv1.b", "conv1.w", "fc8.w"]  # network order, bias first
    assert rows[0] == pytest.approx([1.61, 5.76, 3.0])
    assert rows[2] == pytest.approx([1.61 / 0.22, 5.76, 6.0])
    outputs = layer_table.write_outputs([str(run)], str(tmp_path / "table2"), 0)
    page = outputs[0].read_text()
    assert "Batch 256, update 0" in page and "| ‖w‖ | 1.61 | 5.76 | 3 |" in page
    # The kernels' ratios are 5.76 (conv1) and 6 (fc8); the bias's 7.3 is left out.
    assert "over the 2 kernels: from 5.76 (conv1.w) to 6 (fc8.w), a factor of 1.042" in page
    assert outputs[2].stat().st_size > 1000
    with open(outputs[1]) as f:
        assert len(list(csv.reader(f))) == 1 + 3 * 3 * 3
    with pytest.raises(ValueError, match="update 7 was not logged"):
        layer_table.table(layer_table.read_layer_log(run), step=7)


def test_repeats_run_once_the_best_is_bracketed_before_the_rest_of_the_grid(tmp_path):
    """The repeats carry the LARS - SGD comparison: they run as soon as a cell's best has both
    neighbours, before train longer, the baseline's climb and the far ends of the grid."""
    wide = dataclasses.replace(
        TINY,
        name="wide",
        batches=(2048,),
        baseline_lrs=(0.02, 0.05, 0.1),
        sgd_base_lrs=(0.01, 0.02, 0.05, 0.1, 0.2),
        lars_base_lrs=(2.5, 5.0, 10.0, 20.0, 40.0),
        repeat_seeds=(2,),
    )

    def peaked(run: sweep.Run) -> float:  # every cell's best is its middle rate
        middle = {"sgd": 0.05, "sgd_warmup": 0.8, "lars": 14.1}[run.method]
        return 0.5 - abs(run.lr - middle) / 1000 + run.seed / 1000

    fake = FakeTrain(accuracy=peaked)
    sweep.sweep(wide, tmp_path / "runs", tmp_path / "results", fake)
    assert fake.short_calls() == [
        "sgd_b128_lr0.05_e2_s1",
        "sgd_warmup_b2048_lr0.8_e2_s1",
        "lars_b2048_lr14.1_e2_s1",
        "lars_b2048_lr14.1_e2_s1_movingstats",
        # The large-batch climb: the middle rates stay best, so one step each way.
        "sgd_warmup_b2048_lr0.32_e2_s1",
        "sgd_warmup_b2048_lr1.6_e2_s1",
        "lars_b2048_lr7.07_e2_s1",
        "lars_b2048_lr28.3_e2_s1",
        # Bracketed: the repeats, largest batch first, SGD before LARS as in the cell list.
        "sgd_warmup_b2048_lr0.8_e2_s2",
        "lars_b2048_lr14.1_e2_s2",
        # Train longer (the largest batch's LARS best is bracketed).
        "lars_b2048_lr14.1_e2.5_s1",
        "lars_b2048_lr14.1_e3_s1",
        "lars_b2048_lr14.1_e4_s1",
        # Then the baseline's climb, the rest of the grid.
        "sgd_b128_lr0.02_e2_s1",
        "sgd_b128_lr0.1_e2_s1",
        "sgd_warmup_b2048_lr0.16_e2_s1",
        "sgd_warmup_b2048_lr3.2_e2_s1",
        "lars_b2048_lr3.54_e2_s1",
        "lars_b2048_lr56.6_e2_s1",
    ]


def test_grown_grid_keeps_the_repeats_already_run(tmp_path):
    """A cell whose best sat at the grid's edge is re-opened when the grid grows; once the new
    rate has run and the best stayed, its repeats (and train-longer runs) count as done."""
    protocol = dataclasses.replace(TINY, repeat_seeds=(2,))

    def peaked(run: sweep.Run) -> float:  # SGD's best is 0.05 per 128 images
        if run.method != "sgd_warmup":
            return fake_accuracy(run)
        return 0.5 - abs(run.lr * protocol.baseline_batch / run.batch - 0.05)

    runs, results = tmp_path / "runs", tmp_path / "results"
    first = sweep.sweep(protocol, runs, results, FakeTrain(accuracy=peaked))
    assert "alexnet_bn_small_sgd_warmup_b1024_lr0.4_e2_s2" in first  # the edge's repeat
    grown = dataclasses.replace(protocol, sgd_base_lrs=(0.01, 0.05, 0.1))
    more = FakeTrain(accuracy=peaked)
    second = sweep.sweep(grown, runs, results, more)
    # Only the new rates ran (worse than 0.05 per 128); no repeat or train-longer run again.
    assert sorted(more.short_calls()) == [
        "sgd_warmup_b1024_lr0.08_e2_s1",
        "sgd_warmup_b2048_lr0.16_e2_s1",
    ]
    assert set(first) < set(second)


def test_train_longer_table_follows_the_best_rate_when_the_grid_grows(tmp_path):
    """Train-longer runs at an earlier best stay on disk; the table shows today's best's."""

    def rising(run: sweep.Run) -> float:  # LARS: the larger the rate the better
        return (
            0.3 + run.lr / 1000 + run.epochs / 100 if run.method == "lars" else fake_accuracy(run)
        )

    runs, results = tmp_path / "runs", tmp_path / "results"
    sweep.sweep(TINY, runs, results, FakeTrain(accuracy=rising))
    grown = dataclasses.replace(TINY, lars_base_lrs=(5.0, 10.0, 20.0, 40.0))
    records = sweep.sweep(grown, runs, results, FakeTrain(accuracy=rising))
    longer = sorted((r["lr"], r["epochs"]) for r in records.values() if r["part"] == "longer")
    assert longer == [(28.3, 2.5), (28.3, 3.0), (28.3, 4.0), (56.6, 2.5), (56.6, 3.0), (56.6, 4.0)]
    page = (results / "cifar10_tiny.md").read_text()
    # 0.3 + 56.6 / 1000 + epochs / 100 at 2, 2.5, 3 and 4 epochs, in %.
    assert "| alexnet_bn_small | 2048 | 37.66 | 38.16 | 38.66 | 39.66 |" in page
    assert "Runs finished: 14 of 14 batch-scaling runs and 3 of 3 train-longer runs." in page


def test_claim_protocol_plan():
    """Issue 20's protocol: the AlexNet twin at one budget, batches 128 to 4K, Nesterov at the
    largest batch only (on SGD + warm-up's rates, warm-up and schedule), LARS trained 1.5x
    longer there (2x was cut to fit the budget)."""
    claim, quick = sweep.PROTOCOLS["claim"], sweep.PROTOCOLS["quick"]
    assert claim.models == ("alexnet_bn_small",) and claim.baseline_batch == 128
    assert claim.batches == (1024, 2048, 4096) and claim.longer == (1.5,)
    assert claim.repeat_seeds == (2, 3) and claim.repeat_baseline and not claim.fill_grid
    assert sweep.cells(claim, "alexnet_bn_small") == [
        ("sgd", 128),
        ("sgd_warmup", 1024), ("lars", 1024),
        ("sgd_warmup", 2048), ("lars", 2048),
        ("sgd_warmup", 4096), ("lars", 4096), ("nesterov", 4096),
    ]  # fmt: skip
    runs = sweep.scaling_runs(claim)
    assert {r.epochs for r in runs} == {claim.epochs}
    nesterov = [r for r in runs if r.method == "nesterov"]
    assert nesterov and {r.batch for r in nesterov} == {4096}
    assert sorted(r.lr for r in nesterov) == sweep.cell_lrs(claim, "sgd_warmup", 4096)
    assert {r.warmup_epochs for r in nesterov} == {claim.warmup_epochs} != {0.0}
    for run in nesterov:
        args = run.train_args(claim, Path("/x"))
        twin = dataclasses.replace(run, method="sgd_warmup").train_args(claim, Path("/x"))
        assert "--nesterov" in args and "--flagfile=flags/cifar10_sgd_warmup.cfg" in args
        assert [a for a in args if a != "--nesterov"] == twin  # otherwise SGD + warm-up
    assert all(
        "--nesterov" not in r.train_args(claim, Path("/x")) for r in runs if r not in nesterov
    )
    # The twin's options are the quick protocol's.
    assert sweep.MODEL_FLAGS["alexnet_bn_small"] == (
        "--model=alexnet_bn_small",
        "--groups=1",
        "--dropout=0",
    )
    assert set(claim.models) <= set(quick.models)
    assert not any(r.part == "bn_ablation" for r in runs)
    # The runs' environment turns TensorFlow's oneDNN kernels on.
    assert sweep.RUN_ENVIRONMENT == {"TF_ENABLE_ONEDNN_OPTS": "1"}


def test_claim_sweep_climbs_repeats_every_cell_and_stops(tmp_path):
    """The claim sweep: the climb brackets every cell's best, the baseline and Nesterov
    included; three seeds there; train longer at 1.5x; no rate further than one step
    from a best; the report gives every cell's gap to the baseline with its standard error."""
    claim = sweep.PROTOCOLS["claim"]
    best = {"sgd": 0.02, "sgd_warmup": 0.01, "nesterov": 0.01, "lars": 20.0}  # base rates

    def peaked(run: sweep.Run) -> float:
        rate = sweep.base_rate(claim, run.method, run.batch, run.lr)
        distance = abs(math.log(rate / best[run.method]))
        accuracy = 0.6 - distance / 10 - run.batch / 1e5 + run.seed / 100 + run.epochs / 1000
        return accuracy + (0.05 if run.method == "lars" else 0)

    fake = FakeTrain(accuracy=peaked)
    records = sweep.sweep(claim, tmp_path / "runs", tmp_path / "results", fake)
    scaling = [r for r in records.values() if r["part"] == "scaling"]
    assert claim.settled == tuple((m, b) for b in (1024, 2048) for m in ("sgd_warmup", "lars"))
    for method, batch in sweep.cells(claim, "alexnet_bn_small"):
        cell = sweep.cell_runs(claim, "alexnet_bn_small", method, batch, 1)
        tried = [i for i, r in enumerate(cell) if r.name in records]
        if (method, batch) in claim.settled:  # the middle rate only, no repeats
            assert tried == [len(cell) // 2]
            repeats = [r for r in records.values() if r["part"] == "repeat"]
            assert not [r for r in repeats if (r["method"], r["batch"]) == (method, batch)]
            continue
        top = max(tried, key=lambda i: records[cell[i].name]["top1"])
        assert sweep.base_rate(claim, method, batch, cell[top].lr) == pytest.approx(
            best[method], rel=1e-3
        )
        assert {top - 1, top + 1} & set(range(len(cell))) <= set(tried)  # bracketed
        middle = len(cell) // 2
        assert set(tried) <= set(range(min(middle, top - 1), max(middle, top + 1) + 1))
        seeds = [dataclasses.replace(cell[top], part="repeat", seed=s).name for s in (2, 3)]
        assert all(name in records for name in seeds)
    assert len(scaling) < len(sweep.scaling_runs(claim))  # the far rates did not run
    # Every gap is measured against the baseline's best: its climb and repeats run before
    # the large batches' repeats.
    calls = fake.short_calls()
    baseline = [i for i, name in enumerate(calls) if name.startswith("sgd_b128_")]
    large_repeats = [
        i for i, name in enumerate(calls) if name.endswith(("_s2", "_s3")) and "_b128_" not in name
    ]
    assert max(baseline) < min(large_repeats)
    longer = sorted(r["epochs"] for r in records.values() if r["part"] == "longer")
    assert longer == [1.5 * claim.epochs]
    assert {r["method"] for r in records.values() if r["part"] == "longer"} == {"lars"}
    assert sweep.sweep(claim, tmp_path / "runs", tmp_path / "results", FakeTrain()) == records
    page = (tmp_path / "results" / "cifar10_claim.md").read_text()
    assert "## Against the small-batch baseline" in page and "**partial**" not in page
    # Settled cells say so, and their gap is their one run's minus the baseline's mean.
    assert page.count("; settled, no more runs |") == len(claim.settled)
    at_128 = [r for r in records.values() if r["batch"] == 128]
    best_lr = max((r for r in at_128 if r["part"] == "scaling"), key=lambda r: r["top1"])["lr"]
    baseline_top1 = [r["top1"] for r in at_128 if r["lr"] == best_lr]
    assert len(baseline_top1) == 3
    for method, batch in claim.settled:
        (only,) = [r for r in records.values() if (r["method"], r["batch"]) == (method, batch)]
        gap = 100 * only["top1"] - 100 * statistics.mean(baseline_top1)
        assert f"| {gap:+.2f} (settled: one seed, no error) |" in page
    # The baseline: 0.6 - 128 / 1e5 + e / 1000 + s / 100 at seeds 1-3; Nesterov at 4K is
    # 0.6 - 4096 / 1e5 + ... : 4.096 - 0.128 = 3.97 points below it, with standard error
    # sqrt(1 / 3 + 1 / 3) = 0.82 (both sd 1.00).
    e = claim.epochs / 10
    baseline = f"{60.87 + e:.2f} / {61.87 + e:.2f} / {62.87 + e:.2f} | {61.87 + e:.2f} ± 1.00 | - |"
    assert baseline in page
    assert "| alexnet_bn_small | Nesterov SGD + linear scaling + warm-up | 4096 |" in page
    assert "| -3.97 ± 0.82 |" in page and "| +1.03 ± 0.82 |" in page  # Nesterov; LARS at 4K
    for figure in ("accuracy_vs_batch", "accuracy_vs_lr", "accuracy_vs_epochs"):
        assert (tmp_path / "results" / f"cifar10_claim_{figure}.png").stat().st_size > 1000


def test_runner_starts_the_repositorys_train_py(tmp_path, monkeypatch):
    """`train_py` launches `<repo>/train.py` from the repository root (the split into
    tools/sweeps/ once pointed it at tools/train.py, which no test ran)."""
    from sweeps import runner

    recorder = tmp_path / "python"
    recorder.write_text(f'#!/bin/sh\necho "$PWD" > {tmp_path}/cwd\necho "$1" > {tmp_path}/script\n')
    recorder.chmod(0o755)
    monkeypatch.setattr(runner.sys, "executable", str(recorder))
    run = sweep.scaling_runs(TINY)[0]
    assert runner.train_py(run, TINY, tmp_path / "model", tmp_path / "data") == 0
    assert (tmp_path / "script").read_text().strip() == str(REPO_ROOT / "train.py")
    assert (tmp_path / "cwd").read_text().strip() == str(REPO_ROOT)
    assert REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz" == runner.SHARED_CIFAR
