"""Argument checks at the public boundary: each error names the argument, the expected and the received value.

Checks on values (finiteness) run only on concrete arrays: under `jit`/`vmap`/`grad` the values are tracers and
only shapes and dtypes can be checked, which these functions still do.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"array of shape {tuple(shape)} and dtype {dtype}"
    return repr(value)


def is_concrete(x: Any) -> bool:
    """True for a value that can be inspected now (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    if integer:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    else:
        if isinstance(value, jax.core.Tracer):  # e.g. a learning rate vmapped over in a sweep
            return
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not value > 0:
            raise ValueError(f"{name} must be a positive number; got {value!r}")


def check_open_unit(name: str, value: Any) -> None:
    if isinstance(value, jax.core.Tracer):  # e.g. gamma vmapped over in a sweep: checked where it was concrete
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number in the open interval (0, 1); got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices are {', '.join(map(repr, choices))}")


def check_float_array(name: str, x: Any) -> None:
    """Floating dtype and, where concrete, finite values, for every leaf of `x`."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(x)
    for path, leaf in leaves:
        where = name + jax.tree_util.keystr(path)
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            raise TypeError(f"{where} must be a floating-point array; got {_describe(leaf)}")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{where} must be a floating-point array (float32 or float64); got dtype {dtype}. "
                f"Cast it first, e.g. x.astype(jnp.float32)"
            )
        if is_concrete(leaf) and not _all_finite(leaf):
            raise ValueError(f"{where} contains NaN or infinite values ({_describe(leaf)})")


def _all_finite(leaf: Any) -> bool:
    try:
        return bool(jnp.all(jnp.isfinite(leaf)))
    except jax.errors.ConcretizationTypeError:  # a constant captured inside a trace: only traced checks apply
        return True


def check_ndim(name: str, x: Any, ndims: Iterable[int]) -> None:
    ndims = tuple(ndims)
    nd = np.ndim(x)
    if nd not in ndims:
        want = " or ".join(str(d) for d in ndims)
        raise ValueError(f"{name} must have rank {want}; got {_describe(x)}")


def check_shape(name: str, x: Any, expected: tuple, explanation: str = "") -> None:
    """`expected` may hold None for an axis of any size."""
    shape = tuple(np.shape(x))
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        extra = f" ({explanation})" if explanation else ""
        raise ValueError(f"{name} must have shape {want}{extra}; got shape {shape}")
