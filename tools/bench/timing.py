"""Interleaved timing and robust summaries of repeated runs.

Two variants timed one after the other on a shared machine see different noise: another
process may start between them. So every round runs each variant once (the starting variant
rotates from round to round), and ratios are taken within a round (`paired_ratio`), where both
variants saw the same minute of the machine, before the median over rounds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def quantile(values: Sequence[float], q: float) -> float:
    """The `q` quantile with linear interpolation between order statistics (NumPy's default).

    Raises:
        ValueError: `values` is empty or `q` is outside [0, 1].
    """
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    ordered = sorted(float(v) for v in values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, interquartile range, minimum and count of repeated measurements."""
    q1, median, q3 = (quantile(values, q) for q in (0.25, 0.5, 0.75))
    return {
        "n": len(values),
        "median": median,
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": min(float(v) for v in values),
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, float]:
    """Summary of the round-by-round ratios `numerator[i] / denominator[i]`.

    Raises:
        ValueError: The sequences differ in length or a denominator is not positive.
    """
    if len(numerator) != len(denominator):
        raise ValueError(f"paired samples differ in length: {len(numerator)} vs {len(denominator)}")
    if any(d <= 0 for d in denominator):
        raise ValueError("a denominator sample is not positive")
    return summarize([a / b for a, b in zip(numerator, denominator, strict=True)])


def run_interleaved(
    variants: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    inner: int | Mapping[str, int] = 1,
    clock: Callable[[], float] = time.perf_counter,
    before_each: Callable[[], Any] | None = None,
    self_timed: bool = False,
) -> dict[str, list[float]]:
    """Times each variant `repeats` times, interleaved, after `warmup` untimed calls each.

    Args:
        variants: name -> a call that runs the work once and returns when it is done.
        repeats: rounds; each round times every variant once.
        warmup: untimed calls per variant first (tracing, compilation, caches).
        inner: calls per timed sample (one int, or per variant); the sample is their total
            time divided by the count.
        clock: the time source, seconds.
        before_each: called, untimed, before each timed sample (e.g. a barrier).
        self_timed: each call returns the seconds to count itself (it times only its
            steady-state part), instead of being timed whole.

    Returns:
        name -> `repeats` samples, seconds per call, in round order.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    names = list(variants)
    counts = {n: inner[n] if isinstance(inner, Mapping) else inner for n in names}
    for name in names:
        for _ in range(warmup):
            variants[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        # Rotate the order so that no variant always runs right after the same other one.
        start = round_index % len(names)
        for name in names[start:] + names[:start]:
            if before_each is not None:
                before_each()
            began, counted = clock(), 0.0
            for _ in range(counts[name]):
                result = variants[name]()
                counted += float(result) if self_timed else 0.0
            elapsed = counted if self_timed else clock() - began
            samples[name].append(elapsed / counts[name])
    return samples
