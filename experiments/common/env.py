"""The applications' one environment record: what machine, which versions, which settings changed the numbers.

Every result file (the main job's summary, a sweep's manifest, a benchmark's JSON) embeds `environment()`, so a
number can always be traced to the hardware and software that produced it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Iterable
from typing import Any

import jax

#: packages whose versions are recorded (missing ones are recorded as None)
PACKAGES = ("deq_jax", "jax", "jaxlib", "jaxopt", "optax", "chex", "numpy", "scipy", "scikit-learn", "matplotlib")

#: environment variables that change speed or numerics
VARIABLES = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "XLA_FLAGS",
    "JAX_PLATFORMS",
    "JAX_ENABLE_X64",
    "JAX_DEFAULT_MATMUL_PRECISION",
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "CUDA_VISIBLE_DEVICES",
)


def version(package: str) -> str | None:
    """The installed version of `package`, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else `platform.processor()`."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment(extra_packages: Iterable[str] = ()) -> dict[str, Any]:
    """`{"machine", "devices", "versions", "variables"}`: JSON-able, recorded with every result.

    Asks jax for its devices (call it after `jax.distributed.initialize()` where that is used)."""
    devices = jax.devices()
    kinds = sorted({str(getattr(d, "device_kind", d.platform)) for d in devices})
    versions = {"python": platform.python_version()}
    versions.update({name: version(name) for name in (*PACKAGES, *extra_packages)})
    variables = {name: os.environ.get(name) for name in VARIABLES}
    variables["jax_enable_x64"] = bool(jax.config.jax_enable_x64)
    variables["jax_default_matmul_precision"] = jax.config.jax_default_matmul_precision
    return {
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_cores": os.cpu_count(),
            "platform": platform.platform(),
            "architecture": platform.machine(),
            "load_average_1_5_15": load_average(),
        },
        "devices": {
            "platform": devices[0].platform,
            "kinds": kinds,
            "count": len(devices),
            "local_count": jax.local_device_count(),
            "process_count": jax.process_count(),
            "names": [str(d) for d in devices[:16]],
            "description": f"{len(devices)} x {', '.join(kinds)} (jax {jax.__version__}; {os.cpu_count()} CPU cores)",
        },
        "versions": versions,
        "variables": variables,
    }
