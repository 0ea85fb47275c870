"""Where a benchmark runs: the JAX device asked for, its memory limit, and what the run records about it beyond
`experiments.common.env.environment()` (the device's kind, the BLAS thread pools that the LU runs on, torch's
threads and GPU)."""

from __future__ import annotations

import os
from typing import Any

import jax

from experiments.common.cli import UserError
from experiments.common.env import version


def resolve(kind: str) -> Any:
    """The JAX device for `kind` ("cpu" or "gpu"); `UserError` naming what JAX sees when no GPU is there."""

    if kind == "cpu":
        return jax.devices("cpu")[0]
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        raise UserError(
            f"--device gpu: JAX finds no GPU on this machine (jax.devices() = {jax.devices()}, jaxlib "
            f"{version('jaxlib')}). Run on a machine with an NVIDIA GPU and a CUDA build of jax "
            f"(pip install 'jax[cuda12]' or 'jax[cuda13]'), or pass --device cpu (with a small --n) to exercise the "
            f"same code path on the CPU."
        )
    return gpus[0]


def default_max_temp_gb(device: Any) -> float:
    """4 GiB on a CPU (a shared 2-core machine); half of the accelerator's memory elsewhere (40 if unknown)."""
    if device.platform == "cpu":
        return 4.0
    try:
        return 0.5 * device.memory_stats()["bytes_limit"] / 2**30
    except (AttributeError, KeyError, TypeError, RuntimeError):
        return 40.0


def blas_threadpools() -> Any:
    """The BLAS/LAPACK thread pools loaded in this process (jaxlib's LU runs on scipy's OpenBLAS)."""
    try:
        import threadpoolctl  # optional: recorded where installed, never required
    except ImportError:
        return "threadpoolctl not installed"
    return [
        {
            "api": d.get("internal_api"),
            "threads": d.get("num_threads"),
            "library": os.path.basename(d.get("filepath", "")),
        }
        for d in threadpoolctl.threadpool_info()
    ]


def record(device: Any, torch_info: dict) -> dict:
    """What a result records about where it ran, next to the common environment record."""
    out = {
        "jax_device": str(device),
        "jax_device_kind": getattr(device, "device_kind", str(device)),
        "platform": device.platform,
        "blas_threadpools": blas_threadpools(),
    }
    if torch_info:
        out["torch"] = torch_info
    return out
