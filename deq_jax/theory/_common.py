"""Argument checks and precision handling shared by the theory modules (private)."""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from deq_jax import _checks

Array = jax.Array
Params = dict


class PrecisionWarning(RuntimeWarning):
    """A theory quantity that needs float64 is computed in float32 because `jax_enable_x64` is off."""


def check_params(params: Any, name: str = "params") -> tuple[Array, Array]:
    if not isinstance(params, dict) or not {"A", "B"} <= set(params):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"{name} must be a dict with keys 'A' and 'B' (the DELM's parameters); got {got}")
    A, B = params["A"], params["B"]
    check_AB(A, B)
    return A, B


def check_AB(A: Any, B: Any | None = None) -> None:
    """`A (m, m)` and, when given, `B (m_y, m)`."""
    _checks.check_float_array("A", A)
    _checks.check_ndim("A", A, (2,))
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be square (m, m); got shape {tuple(A.shape)}")
    if B is not None:
        _checks.check_float_array("B", B)
        _checks.check_ndim("B", B, (2,))
        _checks.check_shape("B", B, (None, A.shape[0]), f"B is (m_y, m) with m = {A.shape[0]} from A")


def check_A_batched(A: Any) -> None:
    """`A (..., m, m)`: one matrix or a batch (e.g. a run's history of A)."""
    _checks.check_float_array("A", A)
    if jnp.ndim(A) < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be square matrices (..., m, m); got shape {tuple(jnp.shape(A))}")


def check_phi(phi: Any) -> None:
    _checks.check_float_array("phi", phi)
    _checks.check_ndim("phi", phi, (2,))


def check_phi_y(phi: Any, y: Any, *, y_name: str = "y") -> None:
    check_phi(phi)
    _checks.check_float_array(y_name, y)
    _checks.check_ndim(y_name, y, (2,))
    if y.shape[0] != phi.shape[0]:
        raise ValueError(f"{y_name} must have one row per row of phi (n = {phi.shape[0]}); got shape {tuple(y.shape)}")


def check_W(W: Any, phi: Any, y: Any) -> None:
    _checks.check_float_array("W", W)
    _checks.check_shape("W", W, (y.shape[1], phi.shape[1]), "W is (m_y, m): y's columns by phi's columns")


def check_rtol(rtol: Any) -> None:
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0.0 <= rtol < 1.0:
        raise ValueError(f"rtol must be a number in [0, 1); got {rtol!r}")


def x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


def as_float64(x: Any, what: str, *, stacklevel: int = 3) -> Array:
    """Float64 where x64 is enabled; otherwise the input's float dtype, with a `PrecisionWarning` saying so."""
    if x64_enabled():
        return jnp.asarray(x, jnp.float64)
    x = jnp.asarray(x)
    warnings.warn(
        f"jax_enable_x64 is off, so {what} is computed in {x.dtype} (about 7 digits): gaps L - L* below "
        f"~1e-6 relative, eigenvalues below ~1e-6 lambda_max and gradient norms below ~1e-6 are rounding "
        f"noise there. Enable float64 with jax.config.update('jax_enable_x64', True)",
        PrecisionWarning,
        stacklevel=stacklevel,
    )
    return x


def float_dtype(*xs: Any) -> Any:
    """The widest floating dtype among the arguments (float32 at least)."""
    return jnp.result_type(*[jnp.asarray(x).dtype for x in xs], jnp.float32)


# ----------------------------------------------------------------------------- compiled programs

#: XLA options for every theory program: no YNNPACK library fusions on the CPU backend. XLA:CPU (jaxlib 0.10.2)
#: builds the YNNPACK runtime of such a fusion lazily and keeps it with the executable; compiled while another thread
#: compiles (the main job's background precompile), about 1 executable in 20 kept a corrupt one, and then returned
#: NaN on every call (docs/theory.md section 13). XLA's own CPU emitters do the same arithmetic.
SAFE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_options_lock = threading.Lock()


@functools.cache
def _options_supported() -> bool:
    """Whether this jaxlib knows `SAFE_COMPILER_OPTIONS`, by a tiny compile (once: the answer is cached)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=SAFE_COMPILER_OPTIONS).lower(1.0).compile()
    except Exception:
        return False
    return True


def _compiler_options() -> dict:
    """`SAFE_COMPILER_OPTIONS` where this jaxlib knows them (probed once with a tiny compile), else none."""
    with _options_lock:  # one probe, even when several threads compile their first program at once
        supported = _options_supported()
    return SAFE_COMPILER_OPTIONS if supported else {}


class program:
    """`jax.jit` with `SAFE_COMPILER_OPTIONS` for a top-level call, plain `jax.jit` inside another trace (JAX takes
    compiler options on the outermost program only; a nested one is inlined into it anyway). Options are resolved at
    the first call (no backend work at import). Use as `@program` or `@program(static_argnames=(...))`."""

    def __init__(self, fn: Callable[..., Any] | None = None, *, static_argnames: tuple[str, ...] = ()) -> None:
        self._fn, self._static = fn, static_argnames
        self._top: Any = None  # a jax.jit wrapper (it has .lower), made at the first top-level call
        self._plain: Callable[..., Any] | None = None if fn is None else jax.jit(fn, static_argnames=static_argnames)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._plain is None:  # used as @program(static_argnames=...): this call decorates the function
            return program(args[0], static_argnames=self._static)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((args, kwargs))):
            return self._plain(*args, **kwargs)
        try:
            return self.top(*args, **kwargs)
        except ValueError as err:  # called inside a trace on constants only: no tracer to tell us
            if "compiler_options" not in str(err):
                raise
            return self._plain(*args, **kwargs)

    @property
    def top(self) -> Any:
        """The function compiled with `SAFE_COMPILER_OPTIONS`, for top-level calls (made at the first use)."""
        if self._fn is None:
            raise TypeError("program(static_argnames=...) must first be applied to a function")
        if self._top is None:
            self._top = jax.jit(self._fn, static_argnames=self._static, compiler_options=_compiler_options())
        return self._top

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """`jax.jit(...).lower` of the top-level program, for ahead-of-time compilation and memory analysis."""
        return self.top.lower(*args, **kwargs)
