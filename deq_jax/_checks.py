"""Argument checks at the public boundary: each error names the argument, the expected and the received value.

Checks on values (finiteness) run only on concrete arrays: under `jit`/`vmap`/`grad` the values are tracers and
only shapes and dtypes can be checked, which these functions still do.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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


def _number(value: Any) -> Any:
    """A concrete 0-d array as a Python number (e.g. a step size computed with jax.numpy); anything else as is."""
    if isinstance(value, (jax.Array, np.ndarray)) and value.shape == () and _is_real(value.dtype):
        return value.item()
    return value


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.floating, np.integer))


def check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    """A positive integer (`integer=True`), or a positive finite number; a tracer (e.g. a learning rate vmapped
    over in a sweep) passes: it was checked where it was concrete."""
    if integer:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
        return
    if isinstance(value, jax.core.Tracer):
        return
    value = _number(value)
    if not _is_number(value) or not value > 0:  # NaN fails the comparison
        raise ValueError(f"{name} must be a positive number; got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be a finite positive number; got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """A finite number >= 0 (e.g. an absolute tolerance); a tracer passes."""
    if isinstance(value, jax.core.Tracer):
        return
    value = _number(value)
    if not _is_number(value) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0; got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")


def check_finite(name: str, value: Any) -> None:
    """A finite real number of either sign (e.g. an initial inverse-Jacobian scale); a tracer passes."""
    if isinstance(value, jax.core.Tracer):
        return
    value = _number(value)
    if not _is_number(value) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")


def _is_real(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)


def check_open_unit(name: str, value: Any) -> None:
    """A number in the open interval (0, 1); a tracer (e.g. gamma vmapped over in a sweep) passes."""
    if isinstance(value, jax.core.Tracer):
        return
    value = _number(value)
    if not (_is_number(value) and 0.0 < float(value) < 1.0):
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
    if not isinstance(leaf, jax.Array):  # host data (numpy, Python numbers): numpy, no compiled program per shape
        return bool(np.all(np.isfinite(leaf)))
    try:  # on the device: only a boolean comes back to the host
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
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape, strict=False))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        extra = f" ({explanation})" if explanation else ""
        raise ValueError(f"{name} must have shape {want}{extra}; got shape {shape}")


# ----------------------------------------------------------------------------- equilibrium-solve inputs


def _leaf_kind(leaf: Any) -> str:
    """'float', 'int' or 'bool' for arrays and NumPy scalars (by dtype); 'scalar' for Python numbers; else 'other'."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        if isinstance(leaf, bool):
            return "bool"
        return "scalar" if isinstance(leaf, (int, float)) else "other"
    if not hasattr(leaf, "shape"):
        return "other"
    if jnp.issubdtype(dtype, jnp.bool_):
        return "bool"
    if jnp.issubdtype(dtype, jnp.floating):
        return "float"
    if jnp.issubdtype(dtype, jnp.integer):
        return "int"
    return "other"


def as_state(name: str, tree: Any) -> Any:
    """The initial state `z0` with the cast rule of `deq_jax.solve`: floating arrays keep their dtype; Python numbers
    and integer arrays become arrays of JAX's default floating dtype (float32, or float64 with x64 enabled), as
    `jnp.asarray(z0, float)` would; booleans, complex numbers and non-arrays are refused with the reason."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if not leaves:
        raise ValueError(f"{name} must contain at least one array; got an empty pytree {tree!r}")
    out = []
    for path, leaf in leaves:
        where = name + jax.tree_util.keystr(path)
        kind = _leaf_kind(leaf)
        if kind in ("scalar", "int"):
            array = jnp.asarray(leaf, dtype=jnp.result_type(float))
        elif kind == "float":
            array = jnp.asarray(leaf)
        elif kind == "bool":
            raise TypeError(
                f"{where} must be a real number or a floating-point array; got a boolean "
                f"({_describe(leaf)}): an equilibrium state is iterated, so it must be real-valued"
            )
        else:
            raise TypeError(
                f"{where} must be a real number or a floating-point array (the state is iterated, "
                f"so it must be real-valued; split complex states into real and imaginary parts); "
                f"got {_describe(leaf)}"
            )
        if array.size == 0:  # shapes are static: refused under jit too
            raise ValueError(
                f"{where} has no entries ({_describe(array)}): an empty state or an empty batch has no equilibrium "
                f"to solve for; every leaf needs at least one entry (a batch at least one sample)"
            )
        if is_concrete(array) and not _all_finite(array):
            raise ValueError(f"{where} contains NaN or infinite values ({_describe(array)})")
        out.append(array)
    return jax.tree_util.tree_unflatten(treedef, out)


def as_arguments(name: str, tree: Any) -> Any:
    """`params` or `x` of a solve: every leaf an array or a Python number (made an array, weakly typed, as JAX
    does). Floating leaves are differentiable and, where concrete, must be finite; integer leaves (indices, counts)
    are passed to the map unchanged and, as in JAX, get no gradient."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in leaves:
        where = name + jax.tree_util.keystr(path)
        kind = _leaf_kind(leaf)
        if kind == "other":
            raise TypeError(
                f"{where} must be an array or a number (the solve differentiates through {name}); got "
                f"{_describe(leaf) if hasattr(leaf, 'dtype') else type(leaf).__name__}. Pass configuration "
                f"through the map itself (a dataclass field or a closure) instead"
            )
        array = jnp.asarray(leaf)
        if kind in ("float", "scalar") and is_concrete(array) and not _all_finite(array):
            raise ValueError(f"{where} contains NaN or infinite values ({_describe(array)})")
        out.append(array)
    return jax.tree_util.tree_unflatten(treedef, out)


def check_batch_axis(batch_axis: Any, state: Any, name: str = "z0") -> Any:
    """A valid axis of every leaf of `state` (called `name` in the messages), of one size in all of them."""
    if batch_axis is None:
        return None
    if isinstance(batch_axis, bool) or not isinstance(batch_axis, (int, np.integer)):
        raise TypeError(f"batch_axis must be an integer axis or None; got {batch_axis!r}")
    sizes = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not -leaf.ndim <= batch_axis < leaf.ndim:
            raise ValueError(
                f"batch_axis={batch_axis} is not an axis of {name}{jax.tree_util.keystr(path)} "
                f"({_describe(leaf)}); every leaf of the state needs the batch axis"
            )
        sizes.add(leaf.shape[batch_axis])
    if len(sizes) > 1:
        raise ValueError(
            f"batch_axis={batch_axis} must have the same size in every leaf of {name}; got sizes {sorted(sizes)}"
        )
    return int(batch_axis)


#: the finest relative tolerance a state can be judged at, in units of its dtype's machine epsilon: the residual
#: `f(z) - z` is computed in the state's dtype, so below a few roundings of `|f(z)|` it measures rounding, not
#: distance to the equilibrium (a float16 solve at tol 1e-5 stopped at a float16 fixed point whose float32 residual
#: was 3.9e-4). float32: 4.8e-7, float64: 8.9e-16, float16: 3.9e-3, bfloat16: 3.1e-2.
TOL_EPS = 4

#: floating dtypes that JAX's LU factorisation refuses (and with it its GMRES, the implicit backward's default)
LOW_PRECISION = ("float16", "bfloat16")


def _state_dtypes(state: Any) -> list[Any]:
    return [jnp.dtype(leaf.dtype) for leaf in jax.tree_util.tree_leaves(state)]


def finest_tolerance(state: Any) -> float:
    """`TOL_EPS` times the machine epsilon of the coarsest floating dtype among the leaves of `state`."""
    return TOL_EPS * max(float(jnp.finfo(dtype).eps) for dtype in _state_dtypes(state))


def check_tolerance(name: str, tol: Any, state: Any) -> None:
    """A relative tolerance that the state's dtype can measure: a positive finite number no finer than
    `finest_tolerance(state)`. A tracer passes (e.g. tol vmapped over): only concrete values can be checked."""
    check_positive(name, tol)
    if isinstance(tol, jax.core.Tracer):
        return
    tol = _number(tol)
    finest = finest_tolerance(state)
    if tol < finest:
        coarse = max(_state_dtypes(state), key=lambda d: float(jnp.finfo(d).eps))
        raise ValueError(
            f"{name}={tol:g} is finer than a {coarse} state can measure: its residual f(z) - z is computed in "
            f"{coarse} (machine epsilon {float(jnp.finfo(coarse).eps):.3g}), so the finest tolerance it can be "
            f"judged at is {finest:.3g} ({TOL_EPS} eps); pass {name} >= {finest:.3g} or a wider dtype "
            f"(e.g. z0.astype(jnp.float32))"
        )


def check_factorisable(what: str, state: Any, advice: str, name: str = "z0") -> None:
    """Refuse float16/bfloat16 leaves of `state` (called `name`) for `what`, a route through a dense LU
    factorisation, which JAX does not implement in those dtypes (its error would come from deep inside)."""
    low = sorted({d.name for d in _state_dtypes(state) if d.name in LOW_PRECISION})
    if low:
        raise TypeError(
            f"{what} needs float32 or float64: it factorises a matrix, which JAX does not do in "
            f"{' or '.join(low)}; got {name} with dtype {' and '.join(low)}. {advice}"
        )
