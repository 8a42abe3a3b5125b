"""One thread count for every framework, and the record of the machine, oneDNN and the versions.

`configure_threads` must run before TensorFlow executes an operation and before JAX is
imported: TensorFlow's pools are sized once, and JAX reads `XLA_FLAGS` at import.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from typing import Any

# Distributions whose versions the report records (import names are not needed for this).
DISTRIBUTIONS = (
    "tensorflow-cpu",
    "tensorflow",
    "keras",
    "numpy",
    "jax",
    "jaxlib",
    "optax",
    "torch",
    "timm",
    "tf-keras",
    "tf-models-official",
    "horovod",
    "lars_tf",
)


def configure_threads(threads: int) -> dict[str, Any]:
    """Gives TensorFlow, JAX (XLA:CPU) and PyTorch the same `threads` for one operation.

    Inter-op parallelism is 1 everywhere: the optimizer update is a chain of small kernels,
    and a second pool would only let frameworks differ in how they overlap them.

    Returns:
        The settings, as recorded in the report.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    # Both XLAs (TensorFlow's and jaxlib's) parse XLA_FLAGS; these two flags are known to both.
    xla_flags = f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}"
    os.environ["XLA_FLAGS"] = xla_flags
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # PyTorch's OpenMP threads otherwise spin after each kernel; beside TensorFlow's and
    # XLA's pools on few cores, that spinning stalled whole PyTorch updates for ~100 ms.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return {
        "threads": threads,
        "tensorflow": {"intra_op": threads, "inter_op": 1},
        "torch": {"num_threads": threads, "num_interop_threads": 1},
        "XLA_FLAGS": xla_flags,
        "OMP_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
    }


# The CPU features for which TensorFlow turns its oneDNN kernels on by default on Linux
# (DefaultOneDnnPolicy in tensorflow/core/util/port.cc); the vendor plays no part.
ONEDNN_DEFAULT_FEATURES = (
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)
ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def _cpuinfo(key: str) -> str | None:
    """The first `key : value` of /proc/cpuinfo, or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's processor string)."""
    return _cpuinfo("model name") or platform.processor() or "unknown"


def cpu_vendor() -> str:
    """The CPU's vendor, e.g. "AuthenticAMD" or "GenuineIntel" ("unknown" off Linux x86)."""
    return _cpuinfo("vendor_id") or "unknown"


def default_onednn_on() -> str:
    """Turns TensorFlow's oneDNN CPU kernels on unless the user chose; says who decided.

    The bench measures what `train.py` runs, and `train.py` does the same (see its module
    docstring): TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it is imported, so this
    must run before.
    """
    if ONEDNN_ENV in os.environ:
        return f"{ONEDNN_ENV}={os.environ[ONEDNN_ENV]} set by the user"
    os.environ[ONEDNN_ENV] = "1"
    return f"{ONEDNN_ENV}=1 set by tools/bench.py, as train.py does"


def onednn_state(origin: str | None = None) -> dict[str, Any]:
    """Whether TensorFlow's oneDNN CPU kernels are on in this process, and why.

    Args:
        origin: Who set TF_ENABLE_ONEDNN_OPTS, when something did (see `default_onednn_on`).
    """
    setting = os.environ.get(ONEDNN_ENV)
    flags = set((_cpuinfo("flags") or "").split())
    features = [f for f in ONEDNN_DEFAULT_FEATURES if f in flags]
    try:
        # TensorFlow has no public query; this is what its start-up log line reads.
        from tensorflow.python.util import _pywrap_util_port

        enabled = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        enabled = None
    default = (
        f"on (the CPU has {', '.join(features)})"
        if features
        else f"off (the CPU has none of {', '.join(ONEDNN_DEFAULT_FEATURES)})"
    )
    decided = origin or f"{ONEDNN_ENV}={setting} set"
    why = f"{ONEDNN_ENV} unset" if setting is None else decided
    why += f"; TensorFlow's default on this CPU: {default}"
    return {
        "enabled": enabled,
        ONEDNN_ENV: setting,
        "default_features": features,
        "why": why,
    }


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the shared machine was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """CPU model, core count, memory, OS and Python of this machine."""
    return {
        "cpu": cpu_model(),
        "cpu_vendor": cpu_vendor(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def versions() -> dict[str, str]:
    """Installed version of each distribution in `DISTRIBUTIONS`, or "not installed"."""
    found = {}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
