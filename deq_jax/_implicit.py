"""Implicit differentiation with a backward pass that measures itself (private; `deq_jax.solve` is the front door).

`implicit(...)` wraps a forward loop in a `jax.custom_vjp` whose backward pass solves `(I - J^T) u = v` on the
flattened state, measures `|(I - J^T) u - v| / |v|`, and reports a failure either as `BackwardStats` (inside
`value_and_grad`) or as an error raised at run time. See `deq_jax.solve` for the contract.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from deq_jax import _jaxopt

Array = jax.Array
FAILURE_MARGIN = 10.0  # a backward solve fails above FAILURE_MARGIN * tol (see deq_jax.solve)


def precision_scope(precision: Optional[str]):
    return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)


class BackwardStats(NamedTuple):
    """What the implicit backward passes of one `deq_jax.value_and_grad` call did (sums over the solves: vmapped
    solves each count once per sample)."""

    solves: Array  # int32: backward linear solves run
    failures: Array  # int32: solves whose relative residual exceeded 10 x their tol (or whose solution was not finite)
    nonfinite: Array  # int32: solves whose cotangent or equilibrium was not finite (divergence upstream)
    relative_residual: Array  # sum of |(I - J^T) u - v| / |v| (one solve: its residual; inf if u is not finite)

    def metrics(self, prefix: str = "backward_") -> dict:
        """The fields as a flat metrics dict: `backward_solves`, `backward_failures`, ..."""
        return {prefix + k: v for k, v in self._asdict().items()}


_PROBES: list = []  # trace-time stack: the probe of the innermost deq_jax.value_and_grad being traced
_PROBE_SIZE = 4


def value_and_grad(fun: Callable, argnums: Union[int, Sequence[int]] = 0, has_aux: bool = False) -> Callable:
    """`jax.value_and_grad` that also returns the implicit backward passes' `BackwardStats`.

    `value_and_grad(fun, argnums, has_aux)(*args) -> (value, grads, backward_stats)` where `value` is
    `(loss, aux)` with has_aux. Inside it, a failed backward solve is recorded (never raised): read
    `backward_stats.failures` (make_step puts it in its metrics). Works under jit and vmap.

    How: every `solve` with `Implicit` traced inside `fun` takes a zero "probe" array as an extra input; its
    backward pass writes its statistics as the probe's cotangent, which this function differentiates for too.
    Whether statistics are collected is decided when `fun` is traced, so jit the result
    (`jax.jit(deq_jax.value_and_grad(loss))`), not `fun` alone: JAX reuses the first trace of a function that was
    `jax.jit`-compiled on its own (and then errs about a leaked tracer, or raises instead of recording).
    """
    single = isinstance(argnums, (int, np.integer))
    positions = (int(argnums),) if single else tuple(argnums)

    def wrapped(*args):
        def with_probe(probe, *args):
            _PROBES.append(probe)
            try:
                return fun(*args)
            finally:
                _PROBES.pop()

        probe = jnp.zeros((_PROBE_SIZE,), jnp.float32)
        inner = jax.value_and_grad(with_probe, argnums=(0,) + tuple(p + 1 for p in positions), has_aux=has_aux)
        value, grads = inner(probe, *args)
        ct = grads[0]
        stats = BackwardStats(solves=jnp.round(ct[0]).astype(jnp.int32), failures=jnp.round(ct[1]).astype(jnp.int32),
                              nonfinite=jnp.round(ct[2]).astype(jnp.int32), relative_residual=ct[3])
        return value, (grads[1] if single else grads[1:]), stats

    return wrapped


def _raise_backward_failure(failed, residual, limit, description):
    failed, residual = np.asarray(failed), np.asarray(residual)
    if np.any(failed):
        worst = float(np.max(np.where(failed, residual, -np.inf)))
        raise FloatingPointError(
            f"deq_jax.solve: the implicit backward did not solve (I - J^T) u = v: relative residual {worst:.2e} "
            f"> {float(np.max(limit)):.1e} (10 x tol = {float(np.max(limit)) / 10:.1e}) with {description}, so the gradient through this equilibrium "
            f"would be wrong. Raise Implicit(maxiter=...), use linear_solver='lu' (small states) or 'gmres', or "
            f"loosen Implicit(tol=...) (float32 cannot reach much below 1e-6); a map that barely contracts at the "
            f"equilibrium (gamma near 1) makes I - J^T ill-conditioned. To record failures as data instead of "
            f"raising, differentiate with deq_jax.value_and_grad (make_step's metrics carry them), or pass "
            f"Implicit(check=False) to skip the check.")


def _backward_solve(spec: Any, fz: Callable, z: Any, v: Any, tol: Any) -> tuple[Any, Array, Array, Array]:
    """`u` with `(I - J^T) u = v` on the flattened state, its relative residual, failed and non-finite flags."""
    flat_v, unravel = jax.flatten_util.ravel_pytree(v)
    flat_z = jax.flatten_util.ravel_pytree(z)[0]
    _, vjp = jax.vjp(fz, z)
    matvec = lambda w: w - jax.flatten_util.ravel_pytree(vjp(unravel(w))[0])[0]
    if spec.linear_solver == "lu":
        g = lambda w: jax.flatten_util.ravel_pytree(fz(unravel(w)))[0]
        A_T = jnp.eye(flat_v.size, dtype=flat_v.dtype) - jax.jacfwd(g)(flat_z).T
        u = jnp.linalg.solve(A_T, flat_v)
        r = A_T @ u - flat_v if spec.check else None
    else:
        u = _jaxopt.linear_solve(spec.linear_solver, matvec, flat_v, tol, spec.maxiter)
        r = matvec(u) - flat_v if spec.check else None
    upstream = jnp.all(jnp.isfinite(flat_v)) & jnp.all(jnp.isfinite(flat_z))
    if r is None:
        relative, failed = jnp.zeros((), flat_v.dtype), jnp.asarray(False)
    else:
        relative = jnp.linalg.norm(r) / jnp.maximum(jnp.linalg.norm(flat_v), jnp.finfo(flat_v.dtype).tiny)
        failed = upstream & ~(relative <= FAILURE_MARGIN * tol)  # a non-finite u with finite inputs fails too
    return unravel(u), relative, failed, ~upstream


def implicit(spec: Any, kind: str, options: dict, fz: Callable, rule: Any, maxiter: int, tol_b: Any,
              precision: Optional[str], z0: Any, params: Any, x: Any):
    """The forward loop wrapped in a custom VJP whose backward solves, measures and reports `(I - J^T) u = v`."""
    f_conv, consts = jax.closure_convert(fz, z0, params, x)  # closed-over tracers become explicit inputs
    collected = bool(_PROBES)
    probe = _PROBES[-1] if collected else jnp.zeros((_PROBE_SIZE,), jnp.float32)
    description = f"Implicit(linear_solver={spec.linear_solver!r}, tol={spec.tol}, maxiter={spec.maxiter})"

    def forward(z0, consts, params, x, tols):
        r = dataclasses.replace(rule, tol=tols[0], atol=tols[1])
        return _jaxopt.run(kind, options, lambda z: f_conv(z, params, x, *consts), z0, r.check, maxiter)

    @jax.custom_vjp
    def layer(z0, consts, params, x, tols, probe):
        return forward(z0, consts, params, x, tols)

    def layer_fwd(z0, consts, params, x, tols, probe):
        out = forward(z0, consts, params, x, tols)
        return out, (out[0], consts, params, x, tols, probe)

    def layer_bwd(res, cts):
        z, consts, params, x, tols, probe = res
        with precision_scope(precision):  # the backward is traced after solve() returns: set the precision again
            u, relative, failed, nonfinite = _backward_solve(
                spec, lambda w: f_conv(w, params, x, *consts), z, cts[0], tols[2])
            _, vjp = jax.vjp(lambda c, p, xx: f_conv(z, p, xx, *c), consts, params, x)
            g_consts, g_params, g_x = vjp(u)
        # a residual that is not finite (u overflowed) counts as inf; divergence upstream adds nothing
        relative = jnp.where(nonfinite, 0, jnp.where(jnp.isnan(relative), jnp.inf, relative))
        if spec.check and not collected:
            jax.debug.callback(_raise_backward_failure, failed, relative, FAILURE_MARGIN * tols[2], description)
        stat = jnp.stack([jnp.ones((), jnp.float32), failed.astype(jnp.float32), nonfinite.astype(jnp.float32),
                          relative.astype(jnp.float32)])
        zeros = lambda t: jax.tree_util.tree_map(jnp.zeros_like, t)
        return zeros(z), g_consts, g_params, g_x, zeros(tols), stat.astype(probe.dtype)

    layer.defvjp(layer_fwd, layer_bwd)
    dtype = jnp.promote_types(jnp.result_type(*[leaf.dtype for leaf in jax.tree_util.tree_leaves(z0)]), jnp.float32)
    tols = jnp.stack([jnp.asarray(t, dtype) for t in (rule.tol, rule.atol, tol_b)])
    return layer(z0, consts, params, x, tols, probe)


