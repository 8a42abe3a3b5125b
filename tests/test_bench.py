"""The benchmark tool (`tools/bench.py`): its statistics, its cost model, and every code path
run for real at tiny sizes (`--smoke`), so the bench cannot rot. The peers (optax, timm, TF
Model Garden) are optional: measured when installed, recorded as skipped otherwise."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jpeg_fixtures import jpeg_bytes, write_ilsvrc

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "tools" / "bench.py"
sys.path.insert(0, str(REPO / "tools"))  # the `bench` package beside tools/bench.py

from bench import environment, peers, report, scaling, timing  # noqa: E402

RESNET50_PARAMETERS = 25_557_032


def load_cli():
    spec = importlib.util.spec_from_file_location("bench_cli", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- timing


def test_summary_matches_numpy_percentiles():
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 100.0]
    stats = timing.summarize(values)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    assert stats["median"] == pytest.approx(median)
    assert stats["q1"] == pytest.approx(q1)
    assert stats["q3"] == pytest.approx(q3)
    assert stats["iqr"] == pytest.approx(q3 - q1)
    assert (stats["n"], stats["min"]) == (6, 1.0)


def test_paired_ratio_is_the_median_of_round_ratios():
    # Round ratios 2, 3, 1: the median is 2, not the ratio of medians (3 / 1).
    stats = timing.paired_ratio([2.0, 3.0, 10.0], [1.0, 1.0, 10.0])
    assert stats["median"] == 2.0
    with pytest.raises(ValueError, match="differ in length"):
        timing.paired_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="not positive"):
        timing.paired_ratio([1.0], [0.0])


class FakeClock:
    """Time advances only when a variant runs, by that variant's cost."""

    def __init__(self):
        self.now = 0.0
        self.calls = []

    def __call__(self):
        return self.now

    def variant(self, name, cost):
        def run():
            self.calls.append(name)
            self.now += cost

        return run


def test_run_interleaved_warms_up_rotates_and_divides_by_inner():
    clock = FakeClock()
    variants = {"a": clock.variant("a", 1.0), "b": clock.variant("b", 3.0)}
    samples = timing.run_interleaved(
        variants, repeats=3, warmup=2, inner={"a": 2, "b": 1}, clock=clock
    )
    assert samples == {"a": [1.0, 1.0, 1.0], "b": [3.0, 3.0, 3.0]}
    warmup, timed = clock.calls[:4], clock.calls[4:]
    assert warmup == ["a", "a", "b", "b"]
    # Rounds: a a b | b a a | a a b  (the first variant of a round rotates).
    assert timed == ["a", "a", "b", "b", "a", "a", "a", "a", "b"]


def test_run_interleaved_self_timed_counts_what_the_call_returns():
    samples = timing.run_interleaved(
        {"x": lambda: 0.25}, repeats=2, warmup=0, inner=2, self_timed=True
    )
    assert samples == {"x": [0.25, 0.25]}


# ---------------------------------------------------------------- scaling model


def test_ring_allreduce_cost():
    # 2 workers, 125 MB = 1 Gbit at 1 Gbit/s: 2 * 1/2 * 1 s.
    assert scaling.ring_allreduce_seconds(125e6, 2, 1.0) == pytest.approx(1.0)
    assert scaling.ring_allreduce_seconds(125e6, 1, 1.0) == 0.0
    resnet_bytes = RESNET50_PARAMETERS * 4
    want = 2 * 1023 / 1024 * resnet_bytes * 8 / 25e9
    assert scaling.ring_allreduce_seconds(resnet_bytes, 1024, 25) == pytest.approx(want)
    assert want == pytest.approx(0.0654, abs=1e-4)  # 65 ms per step at 25 Gbit/s


def test_efficiency_without_and_with_backward_overlap():
    assert scaling.efficiency(1.0, 1.0) == 0.5
    # Backward = 2/3 of 3 s = 2 s hides a 1 s all-reduce entirely, and 2 s of a 3 s one.
    assert scaling.efficiency(3.0, 1.0, overlap=True) == 1.0
    assert scaling.efficiency(3.0, 3.0, overlap=True) == pytest.approx(0.75)


def test_single_factor_prediction_anchors_on_resnet50_and_keeps_the_cpu_ratio():
    times = scaling.single_factor_gpu_seconds({"resnet50": 3.0, "alexnet": 0.6})
    assert times["resnet50"] == pytest.approx(1 / scaling.GPU.images_per_s["resnet50"])
    assert times["alexnet"] / times["resnet50"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="anchor"):
        scaling.single_factor_gpu_seconds({"alexnet": 1.0})


def test_alexnet_scales_worse_than_resnet50():
    published = scaling.GPU.images_per_s
    parameters = {"resnet50": RESNET50_PARAMETERS, "alexnet": 60_965_224}
    models = {
        role: {"parameters": count, "gpu_s_per_image": 1 / published[role]}
        for role, count in parameters.items()
    }
    rows = {
        (r["model"], r["bandwidth_gbit"], r["batch_per_gpu"]): r["efficiency"]
        for r in scaling.table(models)
    }
    assert len(rows) == 2 * len(scaling.BANDWIDTHS_GBIT) * len(scaling.BATCHES)
    for (model, bandwidth, batch), efficiency in rows.items():
        values = [efficiency[n] for n in scaling.WORKERS]
        assert values == sorted(values, reverse=True)  # more workers, more communication
        if model == "alexnet":
            resnet = rows[("resnet50", bandwidth, batch)]
            assert all(efficiency[n] < resnet[n] for n in scaling.WORKERS)
    # Larger batches and faster links help; by hand: AlexNet, batch 256, 25 Gbit/s, N = 8.
    assert rows[("alexnet", 25, 256)][1024] > rows[("alexnet", 25, 32)][1024]
    assert rows[("alexnet", 100, 32)][1024] > rows[("alexnet", 25, 32)][1024]
    compute = 256 / published["alexnet"]
    allreduce = 2 * 7 / 8 * 60_965_224 * 4 * 8 / 25e9
    assert rows[("alexnet", 25, 256)][8] == pytest.approx(compute / (compute + allreduce))


# ---------------------------------------------------------------- peers, report, CLI


def test_import_without_package_init_runs_only_the_module(tmp_path, monkeypatch):
    package = tmp_path / "brokenpeer"
    (package / "optim").mkdir(parents=True)
    (package / "__init__.py").write_text("import a_module_that_does_not_exist\n")
    (package / "optim" / "__init__.py").write_text("raise ImportError('not this either')\n")
    (package / "optim" / "_helpers.py").write_text("SCALE = 3\n")
    (package / "optim" / "lars.py").write_text("from ._helpers import SCALE\nVALUE = 2 * SCALE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ImportError):
            importlib.import_module("brokenpeer.optim.lars")
        assert peers._import_without_package_init("brokenpeer.optim.lars").VALUE == 6
        with pytest.raises(peers.PeerUnavailable, match="not installed"):
            peers._import_without_package_init("no_such_peer_package.optim")
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "brokenpeer"]:
            del sys.modules[name]


def minimal_results(**parts):
    return {
        "mode": "smoke",
        "command": "python tools/bench.py --smoke",
        "machine": {
            "cpu": "test CPU",
            "cores": 2,
            "memory_gib": 1.0,
            "system": "Linux",
            "python": "3.11",
            "date_utc": "today",
        },
        "versions": {"keras": "3"},
        "threads": {
            "threads": 2,
            "tensorflow": {"intra_op": 2, "inter_op": 1},
            "torch": {"num_threads": 2, "num_interop_threads": 1},
            "XLA_FLAGS": "--x",
        },
        "load_average_start": [1.0, 1.0, 1.0],
        "load_average_end": [1.0, 1.0, 1.0],
        "duration_s": 60.0,
        "json_name": "b.json",
        "parts": parts,
        "skipped_parts": {
            "3": "ILSVRC-2012 files not found at /nowhere",
            "4": "horovodrun not found",
        },
    }


def test_report_lists_targets_and_skipped_parts():
    target = {"part": 1, "target": "LARS / SGD <= 1.25", "value": 1.5, "met": False}
    part1_targets_only = {"targets": [target]}
    text = report._targets(minimal_results(**{"1": part1_targets_only}))
    assert "| 1 | LARS / SGD <= 1.25 | 1.500 | **not met** |" in "\n".join(text)
    rendered = report.render(minimal_results())
    assert "Not measured: ILSVRC-2012 files not found at /nowhere." in rendered
    assert "Not measured: horovodrun not found." in rendered
    assert "not the benchmark" in rendered  # a non-full mode says so


def test_report_header_names_the_cpu_vendor_and_the_onednn_state():
    results = minimal_results()
    results["machine"]["cpu_vendor"] = "AuthenticAMD"
    results["onednn"] = {
        "enabled": False,
        "TF_ENABLE_ONEDNN_OPTS": "0",
        "default_features": [],
        "why": "TF_ENABLE_ONEDNN_OPTS=0 set by the user; TensorFlow's default on this CPU: off",
    }
    rendered = report.render(results)
    assert "| CPU | test CPU (AuthenticAMD), 2 cores |" in rendered
    assert "| oneDNN | off: TF_ENABLE_ONEDNN_OPTS=0 set by the user;" in rendered
    # A report of a bench that recorded neither still renders, and says so.
    assert "| oneDNN | not recorded" in report.render(minimal_results())


def test_onednn_state_reports_this_process_and_why(monkeypatch):
    import tensorflow as tf  # noqa: F401  (the state is TensorFlow's, read once it is loaded)

    state = environment.onednn_state()
    assert state["enabled"] in (True, False)
    assert set(state["default_features"]) <= set(environment.ONEDNN_DEFAULT_FEATURES)
    assert "TensorFlow's default on this CPU: " in state["why"]
    assert environment.cpu_vendor()  # e.g. AuthenticAMD, GenuineIntel; "unknown" off Linux
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    assert "set by tools/bench.py" in environment.default_onednn_on()
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert environment.default_onednn_on() == "TF_ENABLE_ONEDNN_OPTS=0 set by the user"
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"


def test_cli_parses_parts_and_default_outputs(tmp_path):
    cli = load_cli()
    args = cli.parse_args(["--quick", "--parts", "5,1", "--work-dir", str(tmp_path)])
    assert (args.mode, args.parts) == ("quick", ["1", "5"])
    assert args.output == str(tmp_path / "benchmarks-quick.md")
    assert args.json == str(tmp_path / "benchmarks-quick.json")
    assert cli.parse_args([]).output == "docs/benchmarks.md"
    with pytest.raises(SystemExit):
        cli.parse_args(["--parts", "1,9"])
    assert cli.parse_args(["--parts", "6"]).parts == ["6"]


def test_merge_replaces_only_the_parts_measured_and_records_their_run(tmp_path):
    cli = load_cli()
    earlier = minimal_results(**{"1": {"targets": [], "kept": True}})
    earlier["parts"]["3"] = {"targets": [], "old": True}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(earlier))
    fresh = minimal_results(**{"3": {"targets": [], "new": True}})
    fresh.update(command="python tools/bench.py --parts 3 --merge", duration_s=60.0)
    fresh["machine"] = dict(fresh["machine"], date_utc="2026-12-01 23:00 UTC")
    fresh["skipped_parts"] = {}
    merged = cli._merged(str(path), fresh)
    assert merged["parts"]["1"] == {"targets": [], "kept": True}
    assert merged["parts"]["3"]["new"] and "old" not in merged["parts"]["3"]
    run = merged["parts"]["3"]["remeasured"]
    assert run["command"] == "python tools/bench.py --parts 3 --merge"
    assert merged["skipped_parts"] == {"4": "horovodrun not found"}  # 3 is measured now
    header = "\n".join(report._header(merged))
    assert "Re-measured since with `--merge`" in header and "part 3 on 2026-12-01" in header
    section = "\n".join(report._remeasured(merged["parts"]["3"]))
    assert "Re-measured on 2026-12-01 23:00 UTC (1.0 min" in section
    assert "python tools/bench.py --parts 3 --merge" in section
    assert report._remeasured(merged["parts"]["1"]) == []
    fresh["mode"] = "full"
    with pytest.raises(SystemExit, match="is a 'smoke' report"):
        cli._merged(str(path), fresh)
    with pytest.raises(SystemExit, match="no earlier report"):
        cli._merged(str(tmp_path / "none.json"), fresh)


# ---------------------------------------------------------------- end to end, tiny sizes


def tiny_ilsvrc(root: Path) -> Path:
    synsets = ["n01440764", "n01443537"]
    train = {
        s: [jpeg_bytes(48 + 8 * i, 64, seed=10 * k + i) for i in range(6)]
        for k, s in enumerate(synsets)
    }
    validation = {1: (synsets[0], jpeg_bytes(40, 56, seed=99))}
    write_ilsvrc(root, train, validation)
    return root


def run_bench(tmp_path: Path, *args: str, timeout: float) -> dict:
    output = tmp_path / "bench.md"
    command = [sys.executable, str(BENCH), "--smoke", "--work-dir", str(tmp_path / "work")]
    command += ["--output", str(output), *args]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    results = json.loads(output.with_suffix(".json").read_text())
    results["markdown"] = output.read_text()
    return results


def all_finite_positive(variants: dict) -> bool:
    return all(math.isfinite(v["median"]) and v["median"] > 0 for v in variants.values())


@pytest.mark.slow
def test_smoke_run_measures_parts_1_2_3_5(tmp_path):
    imagenet = tiny_ilsvrc(tmp_path / "ilsvrc")
    results = run_bench(tmp_path, "--parts", "1,3,5", "--imagenet-dir", str(imagenet), timeout=240)
    assert sorted(results["parts"]) == ["1", "2", "3", "5"]  # 5 brings in 2
    assert results["skipped_parts"] == {}

    update = results["parts"]["1"]
    assert update["tensors"] > 0 and update["parameters"] > 0
    assert all_finite_positive(update["variants"])
    for name in ("lars_tf LARS, XLA", "lars_tf LARS", "Keras SGD, XLA", "Keras SGD"):
        assert len(update["variants"][name]["samples_s"]) == 3
    # Each peer was either timed or recorded with the reason it was not.
    measured = set(update["variants"])
    assert "optax lars" in measured or update["skipped_peers"]["optax"]
    assert "timm Lars" in measured or update["skipped_peers"]["timm"]
    assert any("Model Garden" in n for n in measured) or update["skipped_peers"]["TF Model Garden"]

    cases = results["parts"]["2"]["cases"]
    assert [c["model"] for c in cases] == ["alexnet_bn_small", "resnet20_cifar"]
    for case in cases:
        assert all_finite_positive(case["variants"])
        assert case["compute_s_per_image"] > 0
        assert all(math.isfinite(r["median"]) for r in case["ratios"].values())

    pipeline = results["parts"]["3"]
    assert pipeline["train_examples"] == 12
    assert all_finite_positive(pipeline["variants"])
    before = "as before (shuffle buffer 10,000)"
    keras_cv = "keras-cv crop + flip of uint8 batches (32 px), stored 256 x 256"
    expected = {
        "paper (32 px) / limit (images/s)",
        f"paper (32 px), {before} / limit (images/s)",
        "paper (32 px), normalised in tf.data / limit (images/s)",
        "paper (32 px), stored 256 x 256 / limit (images/s)",
        "paper (32 px), stored 256 x 256, decoded whole / limit (images/s)",
        "paper (32 px), stored 256 x 256, as before (decoded whole, shuffle buffer 10,000)"
        " / limit (images/s)",
        "paper preprocessing alone / limit (images/s)",
        "inception (32 px) / limit (images/s)",
        f"inception (32 px), {before} / limit (images/s)",
        "inception (32 px), normalised in tf.data / limit (images/s)",
        "inception preprocessing alone / limit (images/s)",
    }
    if importlib.util.find_spec("keras_cv") is not None:  # measured where installed
        expected |= {
            f"{keras_cv} / limit (images/s)",
            f"{keras_cv} / inception (32 px) (images/s)",
        }
    else:
        assert "keras-cv not installed" in pipeline["keras_cv"]
    assert set(pipeline["ratios"]) == expected
    assert set(pipeline["speedups"]) == {
        "paper (32 px)",
        "paper (32 px), stored 256 x 256",
        "inception (32 px)",
    }
    assert pipeline["shuffle_buffer"] == 1  # 12 images: 12 / 128 of a buffer, at least 1
    assert "decode only, stored 256 x 256 (limit)" in pipeline["variants"]
    # Targets: train.py's default pipelines (uint8), the stored images' one included.
    assert [t["met"] in (True, False) for t in pipeline["targets"]] == [True, True, True]

    scaling_part = results["parts"]["5"]
    assert set(scaling_part["models"]) == {"alexnet", "resnet50"}
    resnet = scaling_part["models"]["resnet50"]
    assert resnet["gpu_images_per_s"] == scaling.GPU.images_per_s["resnet50"]
    assert resnet["single_factor_gpu_images_per_s"] == pytest.approx(resnet["gpu_images_per_s"])

    text = results["markdown"]
    for heading in (
        "## Targets",
        "## 1. Optimizer update",
        "## 2. Training step",
        "## 3. Input pipeline",
        "## 5. Scaling on paper",
    ):
        assert heading in text
    assert results["machine"]["cores"] == os.cpu_count()
    assert results["versions"]["keras"] != "not installed"


@pytest.mark.slow
@pytest.mark.horovod
def test_smoke_run_measures_horovod_allreduce(tmp_path):
    results = run_bench(tmp_path, "--parts", "4", timeout=300)
    assert "4" in results["parts"], results["skipped_parts"]
    part = results["parts"]["4"]
    assert set(part["launches"]) == {"fusion on", "fusion off"}
    off_env = part["launches"]["fusion off"]["horovod_env"]
    assert off_env.get("HOROVOD_FUSION_THRESHOLD") == "0"
    assert "HOROVOD_FUSION_THRESHOLD" not in part["launches"]["fusion on"]["horovod_env"]
    for launch in part["launches"].values():
        assert launch["size"] == 2
        assert launch["gradients"]["bytes"] == part["bytes"] > 0
        assert all_finite_positive(launch["gradients"]["variants"])
    for row in part["table"].values():
        assert row["bus_gb_per_s"] == pytest.approx(row["algorithm_gb_per_s"])  # 2(N-1)/N = 1
    step = part["step"]
    assert all_finite_positive(step["variants"])
    assert math.isfinite(step["communication_share"]["median"])
    assert "## 4. Horovod all-reduce" in results["markdown"]


@pytest.mark.slow
def test_smoke_run_measures_the_step_with_onednn_off_and_on(tmp_path):
    results = run_bench(tmp_path, "--parts", "6", timeout=300)
    assert "6" in results["parts"], results["skipped_parts"]
    # The bench turns oneDNN on as train.py does, unless the environment chose.
    assert results["onednn"]["enabled"] is (os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") == "1")
    assert results["machine"]["cpu_vendor"]
    (case,) = results["parts"]["6"]["cases"]
    # Each worker process ran with the setting it was given, as TensorFlow reports it.
    assert case["onednn_state"]["oneDNN off"]["enabled"] is False
    assert case["onednn_state"]["oneDNN on"]["enabled"] is True
    assert all_finite_positive(case["variants"])
    (speedup,) = case["ratios"].values()
    assert math.isfinite(speedup["median"]) and speedup["median"] > 0
    assert "## 6. oneDNN off and on" in results["markdown"]
    assert "| oneDNN | " in results["markdown"]
