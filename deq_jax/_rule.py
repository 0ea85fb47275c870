"""The convergence rule, written once: every solver, route and statistic of deq_jax judges a state with it.

    |f(z) - z| <= tol * scale + atol,     scale = |f(z)|   (or a fixed scale: |v| for a backward solve)

with 2-norms over the whole pytree state, or per sample along `batch_axis` (every sample must satisfy it).
A state is `diverged` when it or its image is not finite, or when its largest entry exceeds `eps^(-3/4)` times the
scale of the start; a diverged state never satisfies the rule (`inf <= tol * inf` must not pass).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from deq_jax._solution import SampleStats, SolveStats, result_code

Array = jax.Array


def _wide(leaf: Array) -> Array:
    return leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))  # norms of bfloat16 states in float32


def norms(tree: Any, batch_axis: int | None = None) -> Array:
    """2-norm over the pytree, or per sample along `batch_axis` (shape `(n,)`)."""

    def sq(leaf: Array) -> Array:
        leaf = jnp.abs(_wide(leaf)) ** 2
        if batch_axis is None:
            return jnp.sum(leaf)
        return jnp.sum(jnp.moveaxis(leaf, batch_axis, 0).reshape(leaf.shape[batch_axis], -1), axis=1)

    return jnp.sqrt(sum(sq(leaf) for leaf in jax.tree_util.tree_leaves(tree)))


def subtract(a: Any, b: Any) -> Any:
    """`a - b` leaf by leaf."""
    return jax.tree_util.tree_map(jnp.subtract, a, b)


def max_abs(tree: Any, batch_axis: int | None = None) -> Array:
    """Largest absolute entry over a pytree (0 for an empty one), in float32 or wider; per sample along
    `batch_axis` (shape `(n,)`)."""

    def largest(leaf: Array) -> Array:
        leaf = jnp.abs(_wide(leaf))
        if batch_axis is None:
            return jnp.max(leaf)
        return jnp.max(jnp.moveaxis(leaf, batch_axis, 0).reshape(leaf.shape[batch_axis], -1), axis=1, initial=0)

    leaves = [largest(leaf) for leaf in jax.tree_util.tree_leaves(tree) if leaf.size]
    return functools.reduce(jnp.maximum, leaves) if leaves else jnp.zeros((), jnp.float32)


def growth_limit(tree: Any) -> float:
    """`eps^(-3/4)` of the state's dtype: the growth beyond the start's scale that counts as divergence."""
    dtype = jnp.result_type(*[leaf.dtype for leaf in jax.tree_util.tree_leaves(tree)])
    return float(jnp.finfo(dtype).eps) ** -0.75


def holds(residual: Array, scale: Array, tol: Any, atol: Any) -> Array:
    """The rule on measured norms: finite, and `residual <= tol * scale + atol` (False for NaN and inf)."""
    return jnp.isfinite(residual) & jnp.isfinite(scale) & (residual <= tol * scale + atol)


@dataclasses.dataclass(frozen=True)
class Rule:
    """The rule with its parameters. `tol`/`atol` may be tracers (e.g. vmapped over); `scale`, if given, replaces
    `|f(z)|` (a backward solve is judged against `|v|`, the norm of its right-hand side). `view` maps a solver's
    representation of the state (e.g. its flattening) back to the pytree that the rule and `batch_axis` describe,
    and `to` maps a pytree into it again (None: the solver works on the pytree itself)."""

    tol: Any
    atol: Any
    batch_axis: int | None
    growth: float
    scale: Any = None
    view: Callable[[Any], Any] | None = None
    to: Callable[[Any], Any] | None = None

    def _tree(self, t: Any) -> Any:
        return t if self.view is None else self.view(t)

    def measure(self, r: Any, fz: Any) -> tuple[Array, Array, Array]:
        """`(|r|, scale, rule holds)` per sample (or scalars), for the residual `r = f(z) - z` and `f(z)`."""
        r, fz = self._tree(r), self._tree(fz)
        res = norms(r, self.batch_axis)
        scale = norms(fz, self.batch_axis) if self.scale is None else self.scale
        return res, scale, holds(res, scale, self.tol, self.atol)

    def verdicts(self, r: Any, fz: Any, ref: Array) -> tuple[Array, Array]:
        """`(rule holds, diverged)` per sample (or scalars): diverged is not finite, or grown beyond `growth` times
        the start's scale `ref`."""
        ok = self.measure(r, fz)[2]
        r, fz = self._tree(r), self._tree(fz)
        grown = max_abs(fz, self.batch_axis)
        big = jnp.maximum(max_abs(r, self.batch_axis), grown)
        return ok, ~jnp.isfinite(big) | (grown > self.growth * ref)

    def diverged(self, r: Any, fz: Any, ref: Array) -> Array:
        """Not finite, or grown beyond `growth` times the start's scale `ref` (any sample)."""
        return jnp.any(self.verdicts(r, fz, ref)[1])

    def check(self, r: Any, fz: Any, ref: Array) -> tuple[Array, Array]:
        """`(rule holds for every sample, some sample diverged)`."""
        ok, diverged = self.verdicts(r, fz, ref)
        return jnp.all(ok), jnp.any(diverged)

    def keep(self, frozen: Array, old: Any, new: Any) -> Any:
        """`new`, except for the samples marked `frozen` (shape `(n,)`, or a scalar), which keep `old`."""
        if self.batch_axis is None or jnp.ndim(frozen) == 0:
            return jax.tree_util.tree_map(lambda a, b: jnp.where(frozen, a, b), old, new)
        axis = self.batch_axis

        def pick(a: Array, b: Array) -> Array:
            shape = [1] * a.ndim
            shape[axis] = a.shape[axis]
            return jnp.where(frozen.reshape(shape), a, b)

        kept = jax.tree_util.tree_map(pick, self._tree(old), self._tree(new))
        return kept if self.to is None else self.to(kept)

    def stats(
        self, z: Any, fz: Any, iterations: Any, ref: Array | None, factorisations: Any = 0, steps: Any = None
    ) -> tuple[SolveStats, Array, SampleStats | None]:
        """The statistics, the `Result` code and (with `batch_axis`) the per-sample statistics of the returned value
        `z` with image `fz`, measured independently of the solver's bookkeeping. `steps`: the solver steps each
        sample took (None: `iterations` for every sample)."""
        z, fz = jax.lax.stop_gradient((z, fz))
        r = jax.tree_util.tree_map(jnp.subtract, fz, z)
        res, scale, ok = self.measure(r, fz)
        relative = res / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)
        _, diverged = self.verdicts(r, fz, jnp.asarray(jnp.inf if ref is None else ref))
        finite = jnp.isfinite(max_abs(r)) & jnp.isfinite(max_abs(fz))
        converged = jnp.all(ok) & ~jnp.any(diverged)
        stats = SolveStats(
            iterations=jnp.asarray(iterations, jnp.int32),
            residual=jnp.max(res),
            relative_residual=jnp.max(relative),
            converged=converged,
            diverged=jnp.any(diverged),
            factorisations=jnp.asarray(factorisations, jnp.int32),
        )
        samples = None
        if self.batch_axis is not None:
            n = res.shape[0]
            steps = jnp.broadcast_to(jnp.asarray(iterations if steps is None else steps, jnp.int32), (n,))
            samples = SampleStats(
                iterations=steps,
                residual=res,
                relative_residual=relative,
                converged=ok & ~diverged,
                diverged=diverged,
                result=result_code(ok & ~diverged, diverged, jnp.isfinite(res) & jnp.isfinite(scale)),
            )
        return stats, result_code(converged, jnp.any(diverged), finite), samples
