"""Benchmarks of lars_tf: `make bench` writes docs/benchmarks.md and docs/benchmarks.json.

    python tools/bench.py --output docs/benchmarks.md     # full, < ~15 min on 2 cores
    python tools/bench.py --quick                         # development: fewer, smaller runs
    python tools/bench.py --smoke --parts 1,5             # tiny models; what the tests run

Parts (`--parts`, default all): 1 optimizer update (LARS vs SGD, with and without XLA, and
the peers that are installed: optax, timm, TF Model Garden); 2 training step (AlexNet-BN,
ResNet-50: LARS vs SGD, gradient accumulation); 3 input pipeline on ImageNet JPEGs against
the decode-only limit; 4 Horovod all-reduce across 2 ranks, tensor fusion on and off;
5 predicted scaling efficiency (needs part 2's compute times, so 5 runs 2); 6 the training
step with TensorFlow's oneDNN CPU kernels off and on. The machinery lives in `tools/bench/`,
one module per part. As `train.py` does, oneDNN is turned on unless TF_ENABLE_ONEDNN_OPTS is
set; the report records its state and why.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
# `bench` is the package tools/bench/ (a package wins over this module of the same name).
sys.path.insert(0, str(TOOLS))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import environment  # noqa: E402
from bench.workloads import WORKLOADS  # noqa: E402

PARTS = ("1", "2", "3", "4", "5", "6")
DEFAULT_IMAGENET = REPO.parent / "shared" / "data" / "mini-ilsvrc2012"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick")
    mode.add_argument("--smoke", action="store_const", dest="mode", const="smoke")
    parser.set_defaults(mode="full")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, e.g. 1,3")
    parser.add_argument(
        "--output",
        help="markdown report (default: docs/benchmarks.md in full mode, else in --work-dir)",
    )
    parser.add_argument("--json", help="raw numbers (default: --output with .json)")
    parser.add_argument(
        "--imagenet-dir",
        default=str(DEFAULT_IMAGENET),
        help="ILSVRC-2012 files (tars or folders) converted to TFRecords for part 3",
    )
    parser.add_argument("--tfrecord-dir", help="already converted TFRecords for part 3")
    parser.add_argument(
        "--work-dir",
        default=os.path.join(tempfile.gettempdir(), "lars_tf_bench"),
        help="caches (converted TFRecords) and Horovod outputs",
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="per framework, per operation"
    )
    parser.add_argument("--no-peers", action="store_true", help="skip optax, timm, Model Garden")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="measure only --parts and keep every other part of the earlier report at --json "
        "(e.g. `--parts 3 --merge --output docs/benchmarks.md`: the input pipeline re-measured "
        "in the full report); each re-measured part records its own command, date and load",
    )
    parser.add_argument(
        "--render",
        metavar="JSON",
        help="measure nothing: write --output from the raw numbers of an earlier run",
    )
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown part(s) {unknown}; choose among {list(PARTS)}")
    args.parts = sorted(set(parts))
    if args.output is None:
        default = "docs/benchmarks.md" if args.mode == "full" else None
        args.output = default or os.path.join(args.work_dir, f"benchmarks-{args.mode}.md")
    if args.json is None:
        args.json = str(Path(args.output).with_suffix(".json"))
    return args


def _tfrecords(args, workload) -> tuple[str | None, str | None]:
    """(TFRecord directory, None) for part 3, or (None, why not)."""
    if args.tfrecord_dir:
        return args.tfrecord_dir, None
    if not os.path.isdir(args.imagenet_dir):
        return None, f"ILSVRC-2012 files not found at {args.imagenet_dir} (--imagenet-dir)"
    from bench import input_pipeline

    return (
        input_pipeline.prepare_tfrecords(
            args.imagenet_dir, args.work_dir, workload.convert_workers
        ),
        None,
    )


def _stored_tfrecords(args, workload) -> str | None:
    """The same images stored at 256 x 256 for part 3 (converted from --imagenet-dir)."""
    if args.tfrecord_dir or not os.path.isdir(args.imagenet_dir):
        return None
    from bench import input_pipeline

    return input_pipeline.prepare_tfrecords(
        args.imagenet_dir, args.work_dir, workload.convert_workers, input_pipeline.STORED_SIZE
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render:
        from bench import report

        with open(args.render, encoding="utf-8") as f:
            results = json.load(f)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(report.render(results))
        return 0
    workload = WORKLOADS[args.mode]
    started = time.perf_counter()
    # Before configure_threads imports TensorFlow, which reads the setting once.
    onednn_origin = environment.default_onednn_on()
    threads = environment.configure_threads(args.threads)
    from bench import (
        allreduce,
        input_pipeline,
        onednn,
        optimizer_update,
        report,
        scaling,
        train_step,
    )

    parts = list(args.parts)
    if "5" in parts and "2" not in parts:
        parts = sorted(parts + ["2"])  # part 5 scales part 2's measured compute
    os.makedirs(args.work_dir, exist_ok=True)
    results = {
        "mode": args.mode,
        "command": shlex.join([os.path.relpath(sys.executable), "tools/bench.py", *argv]),
        "machine": environment.machine(),
        "onednn": environment.onednn_state(onednn_origin),
        "versions": environment.versions(),
        "threads": threads,
        "load_average_start": environment.load_average(),
        "parts": {},
        "skipped_parts": {},
        "json_name": os.path.basename(args.json),
    }
    runners = {
        "1": lambda: optimizer_update.run(
            workload, threads=args.threads, with_peers=not args.no_peers
        ),
        "2": lambda: train_step.run(workload),
        "3": lambda: _part3(args, workload, input_pipeline),
        "4": lambda: allreduce.run(workload, os.path.join(args.work_dir, "horovod")),
        "5": lambda: scaling.run(results["parts"]["2"]),
        "6": lambda: onednn.run(workload, args.threads),
    }
    failed = False
    for part in parts:
        print(f"[bench] part {part} ({args.mode})...", file=sys.stderr, flush=True)
        began = time.perf_counter()
        if part == "5" and "2" not in results["parts"]:
            results["skipped_parts"][part] = "part 2 (its input) did not run"
            continue
        try:
            outcome = runners[part]()
        except Exception as error:  # record and go on: one broken part must not hide the rest
            traceback.print_exc()
            results["skipped_parts"][part] = f"failed: {type(error).__name__}: {error}"
            failed = True
            continue
        if "skipped" in outcome:  # e.g. no ILSVRC-2012 files, no Horovod
            results["skipped_parts"][part] = outcome["skipped"]
        else:
            results["parts"][part] = outcome
        elapsed = time.perf_counter() - began
        print(f"[bench] part {part} done in {elapsed:.0f} s", file=sys.stderr, flush=True)
    results["load_average_end"] = environment.load_average()
    results["duration_s"] = time.perf_counter() - started
    if args.merge:
        results = _merged(args.json, results)
    for path in (args.output, args.json):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=str)
        f.write("\n")
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(report.render(results))
    print(f"[bench] wrote {args.output} and {args.json}", file=sys.stderr)
    return 1 if failed else 0


def _merged(path: str, fresh: dict) -> dict:
    """The earlier results at `path` with the parts just measured in `fresh` replacing theirs;
    each of those records the run that measured it (`remeasured`)."""
    if not os.path.isfile(path):
        raise SystemExit(f"--merge: no earlier report at {path} (--json) to merge into")
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    if results.get("mode") != fresh["mode"]:
        raise SystemExit(
            f"--merge: {path} is a {results.get('mode')!r} report, this run is {fresh['mode']!r}"
        )
    run = {
        key: fresh.get(key)
        for key in ("command", "onednn", "threads", "load_average_start", "load_average_end")
    }
    run["date_utc"] = fresh["machine"]["date_utc"]
    run["duration_s"] = fresh["duration_s"]
    for part, outcome in fresh["parts"].items():
        results["parts"][part] = {**outcome, "remeasured": run}
        results["skipped_parts"].pop(part, None)
    for part, reason in fresh["skipped_parts"].items():
        results["skipped_parts"][part] = reason
        results["parts"].pop(part, None)
    return results


def _part3(args, workload, input_pipeline) -> dict:
    tfrecord_dir, reason = _tfrecords(args, workload)
    if tfrecord_dir is None:
        return {"skipped": reason}
    source = args.tfrecord_dir or os.path.relpath(args.imagenet_dir)
    stored_dir = _stored_tfrecords(args, workload)
    return input_pipeline.run(workload, tfrecord_dir, source, stored_dir)


if __name__ == "__main__":
    sys.exit(main())
