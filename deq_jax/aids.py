"""Training aids for deep equilibrium models: Jacobian regularisation, phantom gradients, fixed-point correction.

Each aid is a pure function over pytrees that any loss can call, under `jit`, `vmap` and `grad`. They take the
equilibrium map `f(z, params, x)` (the convention of `deq_jax.solve`) and a state, typically the equilibrium
`z* = solve(f, z0, params, x, ...).value`; the state is a constant of the aid (its gradient is stopped), and the
gradients flow through `f`'s dependence on `params` and `x`:

- `jacobian_penalty` estimates `|J|_F^2 / D`, `J = df/dz` at `z*` (Bai, Koltun and Kolter 2021, "Stabilizing
  Equilibrium Models by Jacobian Regularization"); `jacobian_regulariser` applies it with a weight every k-th step;
- `phantom` takes k damped steps `z <- (1 - lambda) z + lambda f(z)` from the stopped `z*` (Geng et al. 2021,
  "On Training Implicit Models"): a cheap approximation of the implicit gradient, exact as k grows;
- `fixed_point_correction` adds the loss at every selected iterate of a trajectory, each through its own phantom
  gradient, with weights `gamma^(N - i)` (Bai et al. 2022, "Deep Equilibrium Optical Flow Estimation");
  `iterates` records such a trajectory.

Example (a DEQ layer trained with the exact implicit gradient, a Jacobian penalty every 4th step):

    regulariser = jacobian_regulariser(weight=0.1, every=4, batch_axis=0)

    def loss(params, x, y, step, key):
        z = deq_jax.solve(f, jnp.zeros_like(x), params, x, batch_axis=0).value
        return jnp.mean((z - y) ** 2) + regulariser(step, f, z, params, x, key)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax import _checks

Array = jax.Array
Map = Callable[[Any, Any, Any], Any]
PROBES = ("rademacher", "gaussian")


# ----------------------------------------------------------------------------- argument checks


def _check_map(f: Any) -> None:
    if not callable(f):
        raise TypeError(f"f must be a callable f(z, params, x); got {f!r}")


def _number(value: Any) -> float | None:
    """A real number from a Python number or a concrete 0-d array, else None."""
    if isinstance(value, (jax.Array, np.ndarray)) and value.shape == ():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        return None
    return float(value)


def _check_range(name: str, value: Any, low: float, high: float, *, low_open: bool, expected: str) -> None:
    """`low < value` (or `<=` unless `low_open`) and `value <= high`; a traced value (e.g. vmapped over in a sweep)
    is checked where it was concrete."""
    if isinstance(value, jax.core.Tracer):
        return
    number = _number(value)
    if number is None or not (low < number if low_open else low <= number) or not number <= high:
        raise ValueError(f"{name} must be a number in {expected}; got {value!r}")


def _check_damping(damping: Any) -> None:
    _check_range("damping", damping, 0.0, 1.0, low_open=True, expected="(0, 1]")


def _check_state(name: str, z: Any) -> list:
    leaves = jax.tree_util.tree_leaves(z)
    if not leaves:
        raise ValueError(f"{name} must contain at least one array; got an empty pytree {z!r}")
    _checks.check_float_array(name, z)
    return leaves


# ----------------------------------------------------------------------------- Jacobian regularisation


def jacobian_penalty(
    f: Map,
    z: Any,
    params: Any,
    x: Any,
    key: Array,
    *,
    samples: int = 1,
    probe: str = "rademacher",
    batch_axis: int | None = None,
) -> Array:
    """A Hutchinson estimate of `|J|_F^2 / D`, `J = df/dz (z, params, x)`, the Jacobian regulariser of Bai, Koltun
    and Kolter (2021).

    Definition: with `D` the number of entries of the state `z` (all leaves, batch included) and `S = samples`
    independent probes `eps_s` shaped like `z`,

        R(z, params, x) = 1/(S D) sum_s |eps_s^T J|^2,     E[R] = tr(J J^T) / D = |J|_F^2 / D,

    one vector-Jacobian product per probe (`eps^T J` is the VJP of `f` at `z` with cotangent `eps`). This is the
    paper's normalisation: its reference code divides by the number of entries of `z`, batch included. With
    `batch_axis=k` the result is the vector of per-sample estimates `R_i = (1/(S d)) sum_s |(eps_s^T J)_i|^2`,
    `d = D / n` entries per sample, whose mean is the unbatched estimate from the same probes; this assumes, as
    `solve(..., batch_axis=k)` does, that `f` maps each sample independently (a block-diagonal `J`).

    Probes and variance (per probe; divide by `S` for the average), with `G = J J^T`:
      - `"rademacher"` (the default): entries +-1; variance `2 sum_{i != j} G_ij^2 / D^2`, never larger than the
        Gaussian's, and zero when `G` is diagonal (e.g. an elementwise map, or orthogonal rows of `J`): then every
        probe gives `|J|_F^2 / D` exactly.
      - `"gaussian"`: entries `N(0, 1)`, as in the paper's code; variance `2 |G|_F^2 / D^2`.

    The state `z` is a constant here (its gradient is stopped, as in the paper, where `z*` comes from a solver run
    without gradient); the estimate is differentiable with respect to `params` and `x` (`jax.grad` differentiates
    the VJPs, reverse over reverse through `f`), and its gradient is an unbiased estimate of the gradient of
    `|J|_F^2 / D`.

    Cost: one evaluation of `f` (its linearisation) and `samples` VJPs; its gradient costs a small multiple of that.

    Args:
      f: the equilibrium map `f(z, params, x)`, returning a state like `z`.
      z: the state at which to take the Jacobian, typically the equilibrium `solve(...).value`: a pytree of
        floating arrays.
      params: the map's parameters (pytree).
      x: the map's input (pytree).
      key: a PRNG key for the probes.
      samples: the number of probes `S`, a positive integer.
      probe: `"rademacher"` or `"gaussian"`.
      batch_axis: None for one estimate over the whole state, or an axis of every leaf of `z` that indexes
        independent samples, for per-sample estimates.

    Returns:
      A scalar, or with `batch_axis` a vector with one estimate per sample, in the result dtype of `z`'s leaves.

    Example:
      >>> f = deq_jax.TanhMap(contraction=0.9)
      >>> z = deq_jax.solve(f, jnp.zeros_like(h), params, h, batch_axis=0).value
      >>> loss = task_loss(z) + 0.1 * jacobian_penalty(f, z, params, h, key)
    """
    _check_map(f)
    _checks.check_positive("samples", samples, integer=True)
    _checks.check_choice("probe", probe, PROBES)
    leaves = _check_state("z", z)
    batch_axis = _checks.check_batch_axis(batch_axis, z, name="z")
    z = jax.lax.stop_gradient(z)
    total = sum(int(np.prod(leaf.shape)) for leaf in leaves)
    per_sample = total if batch_axis is None else total // leaves[0].shape[batch_axis]

    _, vjp = jax.vjp(lambda state: f(state, params, x), z)
    treedef = jax.tree_util.tree_structure(z)
    keys = jax.random.split(key, len(leaves))
    draw = jax.random.rademacher if probe == "rademacher" else jax.random.normal
    probes = [draw(k, (samples, *leaf.shape), dtype=leaf.dtype) for k, leaf in zip(keys, leaves, strict=True)]

    def squared_norm(eps_leaves: list) -> Array:
        (u,) = vjp(jax.tree_util.tree_unflatten(treedef, eps_leaves))
        if batch_axis is None:
            return sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree_util.tree_leaves(u))  # type: ignore[return-value]
        return sum(  # type: ignore[return-value]
            jnp.sum(jnp.square(jnp.moveaxis(leaf, batch_axis, 0)).reshape(leaf.shape[batch_axis], -1), axis=1)
            for leaf in jax.tree_util.tree_leaves(u)
        )

    return jnp.mean(jax.vmap(squared_norm)(probes), axis=0) / per_sample


def jacobian_regulariser(
    weight: float,
    every: int = 1,
    *,
    samples: int = 1,
    probe: str = "rademacher",
    batch_axis: int | None = None,
) -> Callable[..., Array]:
    """`jacobian_penalty` with a weight, applied every `every`-th training step.

    Returns `penalty(step, f, z, params, x, key) -> weight * mean(jacobian_penalty(f, z, params, x, key, ...))` on
    the steps with `step % every == 0` (step 0, `every`, `2 every`, ...), and zero on the others. The choice is a
    `lax.cond` on the (possibly traced) `step`, so the penalty lives inside a jitted training step and the other
    steps evaluate no VJP: they cost nothing but the branch (its value and gradient are exactly zero), and
    neither does any step with a (concrete) zero weight. Under `vmap`
    with a batched `step`, JAX turns the `cond` into a select and both branches run.

    Cost on the steps it applies: one evaluation of `f` and `samples` VJPs (a small multiple with its gradient).

    Args:
      weight: the penalty's weight, a number >= 0 (a traced weight, e.g. a schedule's, is accepted).
      every: apply it on every `every`-th step, a positive integer (1: every step).
      samples, probe, batch_axis: passed to `jacobian_penalty`; with `batch_axis` the per-sample estimates are
        averaged, so the penalty is a scalar either way.

    Returns:
      The function `penalty(step, f, z, params, x, key)`, with `step` an integer (Python or traced).

    Example:
      >>> regulariser = jacobian_regulariser(weight=0.1, every=4)
      >>> def loss(params, x, y, step, key):
      ...     z = deq_jax.solve(f, jnp.zeros_like(x), params, x).value
      ...     return jnp.mean((z - y) ** 2) + regulariser(step, f, z, params, x, key)
    """
    _check_range("weight", weight, 0.0, float("inf"), low_open=False, expected="[0, inf)")
    _checks.check_positive("every", every, integer=True)
    _checks.check_positive("samples", samples, integer=True)
    _checks.check_choice("probe", probe, PROBES)
    off_always = _number(weight) == 0.0  # a concrete zero weight: no VJP on any step

    def penalty(step: Any, f: Map, z: Any, params: Any, x: Any, key: Array) -> Array:
        """`weight * jacobian_penalty(...)` where `step % every == 0`, else zero (see `jacobian_regulariser`)."""
        _check_map(f)

        def on(z: Any, params: Any, x: Any, key: Array) -> Array:
            estimate = jacobian_penalty(f, z, params, x, key, samples=samples, probe=probe, batch_axis=batch_axis)
            return weight * jnp.mean(estimate)

        if every == 1 and not off_always:
            return on(z, params, x, key)
        shape = jax.eval_shape(on, z, params, x, key)
        if off_always:
            return jnp.zeros(shape.shape, shape.dtype)
        off = lambda *_: jnp.zeros(shape.shape, shape.dtype)
        return jax.lax.cond(jnp.asarray(step) % every == 0, on, off, z, params, x, key)

    return penalty


# ----------------------------------------------------------------------------- phantom gradients


def phantom(f: Map, z_star: Any, params: Any, x: Any, *, steps: int = 1, damping: float = 1.0) -> Any:
    """The phantom gradient of Geng et al. (2021): `steps` damped iterations from the stopped equilibrium.

    Definition: with `lambda = damping`, `z_0 = stop_gradient(z*)` and

        z_{j+1} = (1 - lambda) z_j + lambda f(z_j, params, x),      j = 0, ..., k - 1 (k = steps),

    the result is `z_k`, differentiated through the `k` steps only. Its value is `z*` up to the solve's residual
    (for a map that is non-expansive in z, `|z_k - z*| <= k lambda |f(z*) - z*|`). For an affine map
    `f(z) = M z + c` (`z @ M.T + c` on rows of `z`) its Jacobian with respect to `c` is `(I - M)^{-1} (I - B^k)`,
    `B = (1 - lambda) I + lambda M`, against the implicit gradient `(I - M)^{-1}`: the phantom gradient converges
    to it geometrically in `k`, as `|B^k|` (for `|M| < 1`). `steps=1, damping=1` is the one-step (Jacobian-free)
    gradient, `f(z*)` differentiated at the stopped `z*` (`deq_jax.OneStep`).

    The gradient of `z*` is stopped, so the solve that produced it contributes nothing to the gradient: its
    backward strategy does not matter, and no backward linear solve runs. `f` runs under JAX's current matmul
    precision (`solve` traces its map at `"highest"`): on GPUs, where float32's default is TF32, call it inside
    `jax.default_matmul_precision("highest")` for a value within the solve's tolerance of `z*`.

    Cost: `steps` evaluations of `f`, and `steps` VJPs of `f` in the backward pass (memory: `steps` states).

    Args:
      f: the equilibrium map `f(z, params, x)`.
      z_star: the equilibrium (pytree of floating arrays); its gradient is stopped.
      params: the map's parameters (pytree), differentiable.
      x: the map's input (pytree), differentiable.
      steps: the number of damped steps `k`, a positive integer.
      damping: `lambda` in `(0, 1]` (a traced value is accepted).

    Returns:
      `z_k`, a state like `z_star`.

    Example:
      >>> z_star = deq_jax.solve(f, z0, params, x).value
      >>> z = phantom(f, z_star, params, x, steps=5, damping=0.5)   # gradient: 5 steps, no linear solve
      >>> loss = jnp.mean((z - y) ** 2)
    """
    _check_map(f)
    _checks.check_positive("steps", steps, integer=True)
    _check_damping(damping)
    _check_state("z_star", z_star)
    z = jax.lax.stop_gradient(z_star)
    step = _damped_step(f, params, x, damping)
    if steps == 1:
        return step(z)
    return jax.lax.fori_loop(0, steps, lambda _, state: step(state), z)


def _damped_step(f: Map, params: Any, x: Any, damping: Any) -> Callable[[Any], Any]:
    def step(z: Any) -> Any:
        fz = f(z, params, x)
        if isinstance(damping, (int, float)) and damping == 1:
            return jax.tree_util.tree_map(lambda a, b: b.astype(a.dtype), z, fz)  # the state keeps its dtypes
        return jax.tree_util.tree_map(lambda a, b: ((1 - damping) * a + damping * b).astype(a.dtype), z, fz)

    return step


# ----------------------------------------------------------------------------- fixed-point correction


def iterates(f: Map, z0: Any, params: Any, x: Any, *, steps: int, damping: float = 1.0) -> Any:
    """The trajectory `z_1, ..., z_N` of the damped iteration `z_i = (1 - lambda) z_{i-1} + lambda f(z_{i-1})` from
    `z_0 = z0`, without gradient (its input to `fixed_point_correction`).

    Cost: `steps` evaluations of `f`, no gradient; memory: `steps` states.

    Args:
      f: the equilibrium map `f(z, params, x)`.
      z0: the start (pytree of floating arrays).
      params, x: the map's parameters and input.
      steps: `N`, a positive integer.
      damping: `lambda` in `(0, 1]`.

    Returns:
      A pytree like `z0` whose leaves have a new leading axis of length `N`: entry `i - 1` holds `z_i`.

    Example:
      >>> trajectory = iterates(f, jnp.zeros_like(x), params, x, steps=12)
    """
    _check_map(f)
    _checks.check_positive("steps", steps, integer=True)
    _check_damping(damping)
    _check_state("z0", z0)
    step = _damped_step(f, jax.lax.stop_gradient(params), jax.lax.stop_gradient(x), damping)

    def body(z: Any, _: Any) -> tuple[Any, Any]:
        z = step(z)
        return z, z

    return jax.lax.scan(body, jax.lax.stop_gradient(z0), None, length=steps)[1]


def fixed_point_correction(
    loss_fn: Callable[[Any], Array],
    f: Map,
    trajectory: Any,
    params: Any,
    x: Any,
    *,
    every: int = 1,
    indices: Sequence[int] | None = None,
    gamma: float = 0.8,
    phantom_steps: int = 1,
    damping: float = 1.0,
) -> Array:
    """The fixed-point correction loss of Bai et al. (2022): the loss at selected iterates of a trajectory, each
    differentiated through its own phantom gradient, weighted towards the last.

    Definition: with the trajectory `z_1, ..., z_N` (leading axis of every leaf of `trajectory`, e.g. from
    `iterates`), the selected set `S` (1-based: `i = N, N - every, N - 2 every, ... >= 1`, or `indices` given as
    0-based positions `i - 1`, negative ones counting from the end), and
    `zhat_i = phantom(f, z_i, params, x, steps=phantom_steps, damping=damping)`,

        L = sum_{i in S} gamma^(N - i) loss_fn(zhat_i).

    The weights are not normalised (the last iterate has weight 1, as in the paper's sequence loss with
    `gamma = 0.8`); the trajectory is a constant (its gradient is stopped), so every term's gradient is that of its
    phantom steps. With the trajectory from `iterates` and the same damping, `zhat_i` has the value of
    `z_{i + phantom_steps}` and is differentiated through those last `phantom_steps` steps (with the defaults,
    `zhat_i = f(z_i)`).

    Cost: `|S| * phantom_steps` evaluations of `f`, and as many VJPs in the backward pass (plus the trajectory's `N`
    evaluations when it comes from `iterates`). `loss_fn` and `f` are `vmap`ped over the selected iterates.

    Args:
      loss_fn: `loss_fn(z) -> scalar`, the task loss of a state (close over labels and other data).
      f: the equilibrium map `f(z, params, x)`.
      trajectory: the iterates, a pytree like the state whose leaves have a leading axis of length `N >= 1`.
      params, x: the map's parameters and input, differentiable.
      every: select every `every`-th iterate counting back from the last, a positive integer.
      indices: instead of `every`, the 0-based positions of the selected iterates (distinct, in `[-N, N)`).
      gamma: the decay of the weights `gamma^(N - i)`, in `[0, 1]`.
      phantom_steps: the phantom steps per selected iterate, a positive integer.
      damping: the phantom steps' `lambda`, in `(0, 1]`.

    Returns:
      The scalar `L`.

    Example (`N = 12` iterates, the loss at iterates 12, 9, 6, 3 with weights 1, 0.8^3, 0.8^6, 0.8^9):
      >>> trajectory = iterates(f, jnp.zeros_like(x), params, x, steps=12)
      >>> loss = fixed_point_correction(lambda z: jnp.mean((z - y) ** 2), f, trajectory, params, x, every=3)
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable loss_fn(z) -> scalar; got {loss_fn!r}")
    _check_map(f)
    _checks.check_positive("every", every, integer=True)
    _checks.check_positive("phantom_steps", phantom_steps, integer=True)
    _check_damping(damping)
    _check_range("gamma", gamma, 0.0, 1.0, low_open=False, expected="[0, 1]")
    leaves = _check_state("trajectory", trajectory)
    lengths = {leaf.shape[0] if leaf.ndim else 0 for leaf in leaves}
    if len(lengths) != 1 or 0 in lengths:
        shapes = [tuple(leaf.shape) for leaf in leaves]
        raise ValueError(
            f"trajectory must have a leading axis of one length N >= 1 in every leaf (the iterates); "
            f"got shapes {shapes}"
        )
    (n,) = lengths
    if indices is None:
        selected = list(range(n - 1, -1, -every))[::-1]
    else:
        if every != 1:
            raise ValueError(f"give either every or indices, not both; got every={every!r} and indices={indices!r}")
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n]
        selected = sorted({int(i) % n for i in indices}) if not bad else []
        if bad or not selected or len(selected) != len(indices):
            raise ValueError(
                f"indices must be distinct integer positions in [-{n}, {n}) (the trajectory has N = {n} iterates), "
                f"at least one; got {indices!r}"
            )
    positions = np.asarray(selected)
    chosen = jax.tree_util.tree_map(lambda leaf: jax.lax.stop_gradient(leaf)[positions], trajectory)

    def term(z: Any) -> Array:
        return jnp.asarray(loss_fn(phantom(f, z, params, x, steps=phantom_steps, damping=damping)))

    losses = jax.vmap(term)(chosen)
    if losses.ndim != 1:
        raise ValueError(f"loss_fn must return a scalar; got shape {losses.shape[1:]}")
    w = jnp.asarray(gamma, losses.dtype) ** jnp.asarray(n - 1 - positions, losses.dtype)
    return jnp.sum(w * losses)


__all__ = ["jacobian_penalty", "jacobian_regulariser", "phantom", "iterates", "fixed_point_correction", "PROBES"]
