"""The theory's quantities, computed so that the paper's claims can be checked numerically (docs/theory.md).

Conventions: samples are rows, as everywhere in deq_jax. `phi` is `(n, m)`, targets `y` are `(n, m_y)`, the
end-to-end matrix `W` is `(m_y, m)` and predictions are `phi @ W.T`. In theory.md's column notation
`Phi = phi.T`, so `Phi Phi^T / n = phi.T @ phi / n` and, for the square loss `L = (1/n) sum_i 1/2 |W phi_i - y_i|^2`,
`G = dL/dW = (phi W^T - y)^T phi / n`. DELM parameters are `{"A": (m, m), "B": (m_y, m)}` with
`U = I - gamma sigma(A)` and `W = B U^{-1}`.

What is here:
- the closed form (`u_matrix`, `end_to_end`) and the shallow problem's optimum (`shallow_optimum_square`,
  `min_norm_solution`, `shallow_optimum_cross_entropy`), its spectrum (`feature_spectrum`) and gradient;
- the convergence bound of section 4 in its per-step form (`gd_rate_bound`, `flow_bound`) and a log-linear fit of
  a measured gap over an explicit window (`fit_log_linear`);
- the induced dynamics of `W` (section 5): the velocity of `W` along the DELM's gradient (`delm_w_velocity`,
  forward mode through the closed form), the induced preconditioner `P` (`induced_preconditioner`,
  `preconditioner_matrix`) and the trust-region Newton check (`trust_region_check`).

`sigma` is a name from `deq_jax.maps.SIGMAS` or a callable; it is a static argument of the jit-compiled cores, so
pass the same function object (not a fresh lambda per call) to reuse compilations.
Array functions are pure and work under `jit` and in float64; `fit_log_linear` and `trust_region_check` are
measurements on concrete values (NumPy / dense eigenvalues) and return plain Python numbers.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from deq_jax import _checks
from deq_jax.losses import cross_entropy, square
from deq_jax.maps import Sigma, get_sigma

Array = jax.Array
Params = dict


class OptimumNotConverged(RuntimeError):
    """`shallow_optimum_cross_entropy` stopped before its gradient norm reached `tol`."""


# ----------------------------------------------------------------------------- argument checks

def _check_params(params: Any) -> tuple[Array, Array]:
    if not isinstance(params, dict) or not {"A", "B"} <= set(params):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"params must be a dict with keys 'A' and 'B' (the DELM's parameters); got {got}")
    A, B = params["A"], params["B"]
    _check_AB(A, B)
    return A, B


def _check_AB(A: Any, B: Optional[Any] = None) -> None:
    _checks.check_float_array("A", A)
    _checks.check_ndim("A", A, (2,))
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be square (m, m); got shape {tuple(A.shape)}")
    if B is not None:
        _checks.check_float_array("B", B)
        _checks.check_ndim("B", B, (2,))
        _checks.check_shape("B", B, (None, A.shape[0]), f"B is (m_y, m) with m = {A.shape[0]} from A")


def _check_phi_y(phi: Any, y: Any, *, y_name: str = "y") -> None:
    _checks.check_float_array("phi", phi)
    _checks.check_ndim("phi", phi, (2,))
    _checks.check_float_array(y_name, y)
    _checks.check_ndim(y_name, y, (2,))
    if y.shape[0] != phi.shape[0]:
        raise ValueError(f"{y_name} must have one row per row of phi (n = {phi.shape[0]}); got shape {tuple(y.shape)}")


def _check_W(W: Any, phi: Any, y: Any) -> None:
    _checks.check_float_array("W", W)
    _checks.check_shape("W", W, (y.shape[1], phi.shape[1]), "W is (m_y, m): y's columns by phi's columns")


def _as_float64(x: Any, name: str) -> Array:
    """Float64 where x64 is enabled; otherwise the input dtype, with a warning that optima are then imprecise."""
    if jax.config.jax_enable_x64:
        return jnp.asarray(x, jnp.float64)
    warnings.warn(f"jax_enable_x64 is off, so {name} is computed in {jnp.asarray(x).dtype}: gaps L - L* below "
                  f"~1e-6 relative are rounding noise. Enable it with jax.config.update('jax_enable_x64', True)",
                  RuntimeWarning, stacklevel=3)
    return jnp.asarray(x)


# ----------------------------------------------------------------------------- closed form

def u_matrix(A: Array, gamma: Union[float, Array], sigma: Union[str, Sigma] = "column_softmax") -> Array:
    """`U = I - gamma sigma(A)`, so that `z* = U^{-1} phi(x)` and `W = B U^{-1}` (theory.md section 1).

    For column-stochastic `sigma(A)`: `1^T U = (1 - gamma) 1^T`, `rho(I - U) = gamma` and
    `|U|_2 <= 1 + gamma |sigma(A)|_2 <= 1 + gamma sqrt(m)`.
    """
    _check_AB(A)
    _checks.check_open_unit("gamma", gamma)
    return _u(A, gamma, get_sigma(sigma))


# the checks above run eagerly; the array math goes through jit-compiled cores (one compile per shape and sigma,
# instead of one per primitive in eager mode)
@jax.jit(static_argnames=("sigma",))
def _u(A: Array, gamma: Any, sigma: Sigma) -> Array:
    return jnp.eye(A.shape[0], dtype=A.dtype) - gamma * sigma(A)


@jax.jit(static_argnames=("sigma",))
def _w(A: Array, B: Array, gamma: Any, sigma: Sigma) -> Array:
    return jnp.linalg.solve(_u(A, gamma, sigma).T, B.T).T


def end_to_end(A: Array, B: Array, gamma: Union[float, Array], sigma: Union[str, Sigma] = "column_softmax") -> Array:
    """The end-to-end matrix `W = B U^{-1}`, `(m_y, m)`, by one LU solve `U^T W^T = B^T` (`jnp.linalg.solve`).

    Plain autodiff (forward and reverse) goes through the solve, which is what `delm_w_velocity` relies on.
    """
    _check_AB(A, B)
    _checks.check_open_unit("gamma", gamma)
    return _w(A, B, gamma, get_sigma(sigma))


def spectral_norm(M: Array) -> Array:
    """`|M|_2`, the largest singular value; batched over leading axes (`(..., p, q) -> (...)`)."""
    _checks.check_float_array("M", M)
    if jnp.ndim(M) < 2:
        raise ValueError(f"M must have rank >= 2 (a matrix or a batch of matrices); got shape {jnp.shape(M)}")
    return _spectral_norm(M)


@jax.jit
def _spectral_norm(M: Array) -> Array:
    return jnp.linalg.svd(M, compute_uv=False)[..., 0]


# ----------------------------------------------------------------------------- the shallow problem

def _default_rcond(phi: Array) -> float:
    # numpy's matrix_rank / pinv convention on singular values: max(n, m) * eps
    return max(phi.shape) * float(jnp.finfo(phi.dtype).eps)


def feature_spectrum(phi: Array, rtol: Optional[float] = None) -> dict:
    """Extreme eigenvalues of `C = Phi Phi^T / n = phi.T @ phi / n` (the shallow square loss's Hessian per output).

    Computed from the singular values `s` of `phi` (`lambda = s^2 / n`), which are accurate to `eps * s_max`, so
    the zero eigenvalues of a rank-deficient `phi` come out near `eps^2 lambda_max` rather than `eps lambda_max`.
    Returns `{"lambda_max", "lambda_min_plus", "rank"}`: `lambda_min_plus` is the smallest eigenvalue
    `> rtol * lambda_max` (the `lambda_min^+` of the PL inequality, theory.md section 4) and `rank` how many there are.
    Default `rtol = (max(n, m) * eps)^2`: numpy's rank cutoff `max(n, m) * eps * s_max` on singular values, the
    same cutoff `shallow_optimum_square`'s pseudo-inverse uses, so `rank` is the rank that `W*` sees.
    A zero `phi` gives rank 0 and `lambda_min_plus = nan`.
    """
    _checks.check_float_array("phi", phi)
    _checks.check_ndim("phi", phi, (2,))
    if rtol is None:
        rtol = _default_rcond(phi) ** 2
    elif isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0.0 <= rtol < 1.0:
        raise ValueError(f"rtol must be a number in [0, 1); got {rtol!r}")
    return _spectrum(phi, rtol)


@jax.jit
def _spectrum(phi: Array, rtol: Any) -> dict:
    eig = jnp.linalg.svd(phi, compute_uv=False) ** 2 / phi.shape[0]  # descending
    lambda_max = eig[0]
    above = eig > rtol * lambda_max
    lambda_min_plus = jnp.min(jnp.where(above, eig, jnp.inf))
    return {"lambda_max": lambda_max,
            "lambda_min_plus": jnp.where(jnp.isfinite(lambda_min_plus), lambda_min_plus, jnp.nan),
            "rank": jnp.sum(above).astype(jnp.int32)}


def min_norm_solution(phi: Array, y: Array) -> Array:
    """`W* = (pinv(phi) y)^T`, `(m_y, m)`: the minimum-Frobenius-norm minimiser of the square loss.

    The pseudo-inverse drops singular values `<= max(n, m) * eps * s_max` (as `feature_spectrum`'s default), so
    `W*`'s rows lie in the row space of `phi` (orthogonal to its null space). Computed in float64 where x64 is on.
    """
    _check_phi_y(phi, y)
    phi = _as_float64(phi, "min_norm_solution")
    return _min_norm(phi, jnp.asarray(y, phi.dtype))


@jax.jit
def _min_norm(phi: Array, y: Array) -> Array:
    U, s, Vt = jnp.linalg.svd(phi, full_matrices=False)
    keep = s > _default_rcond(phi) * s[0]
    s_inv = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)
    return ((Vt.T * s_inv) @ (U.T @ y)).T


def shallow_optimum_square(phi: Array, y: Array) -> tuple[Array, Array]:
    """`(W*, L*)` of the convex shallow problem `min_W (1/n) sum_i 1/2 |W phi_i - y_i|^2` (the project's scaling).

    `W*` is the minimum-norm minimiser (`min_norm_solution`); `L* = (1/2n) |phi W*^T - y|_F^2` is the DELM's
    global optimum too (same function class, theory.md section 1). Float64 where x64 is enabled; `L*` is a 0-d
    array (use `float(L)` outside `jit`).
    """
    W = min_norm_solution(phi, y)
    return W, _square_at(W, jnp.asarray(phi, W.dtype), jnp.asarray(y, W.dtype))


@jax.jit
def _square_at(W: Array, phi: Array, y: Array) -> Array:
    return square(phi @ W.T, y)


def square_loss_gradient(W: Array, phi: Array, y: Array) -> Array:
    """`G = dL/dW = (phi W^T - y)^T phi / n` for the square loss `L = (1/n) sum_i 1/2 |W phi_i - y_i|^2`."""
    _check_phi_y(phi, y)
    _check_W(W, phi, y)
    return _sq_grad(W, phi, y)


@jax.jit
def _sq_grad(W: Array, phi: Array, y: Array) -> Array:
    return (phi @ W.T - y).T @ phi / phi.shape[0]


def _ce_objective(W: Array, phi: Array, targets: Array, l2: float) -> Array:
    return cross_entropy(phi @ W.T, targets) + 0.5 * l2 * jnp.sum(W * W)


def _cg(hvp, b: Array, atol: Array, maxiter: int) -> tuple[Array, Array]:
    """Conjugate gradients for `H x = b`, H symmetric positive definite; stops at `|r| <= atol`. `(x, iterations)`."""

    def cond(state):
        _, _, _, rs, i = state
        return (jnp.sqrt(rs) > atol) & (i < maxiter)

    def body(state):
        x, r, p, rs, i = state
        Hp = hvp(p)
        alpha = rs / jnp.vdot(p, Hp)
        x, r = x + alpha * p, r - alpha * Hp
        rs_new = jnp.vdot(r, r)
        return x, r, r + (rs_new / rs) * p, rs_new, i + 1

    x, *_, i = jax.lax.while_loop(cond, body, (jnp.zeros_like(b), b, b, jnp.vdot(b, b), jnp.zeros((), jnp.int32)))
    return x, i


def _newton_cg(phi, targets, l2, tol, maxiter, cg_maxiter):
    """Truncated Newton with Armijo backtracking from `W = 0`; stops at `|grad|_F <= tol`."""
    fun = lambda W: _ce_objective(W, phi, targets, l2)  # noqa: E731
    value_and_grad = jax.value_and_grad(fun)
    eps = jnp.finfo(phi.dtype).eps

    def cond(state):
        _, _, g, k, _, failed = state
        return (jnp.linalg.norm(g) > tol) & (k < maxiter) & ~failed

    def body(state):
        W, f, g, k, cg_total, _ = state
        gnorm = jnp.linalg.norm(g)
        hvp = lambda v: jax.jvp(jax.grad(fun), (W,), (v,))[1]  # noqa: E731
        # forcing term min(0.5, sqrt|g|) |g|: superlinear convergence; the floor 0.1 tol lets |g| reach tol
        d, cg_iters = _cg(hvp, -g, jnp.maximum(jnp.minimum(0.5, jnp.sqrt(gnorm)) * gnorm, 0.1 * tol), cg_maxiter)
        slope = jnp.vdot(g, d)
        slack = 8 * eps * jnp.maximum(jnp.abs(f), 1.0)  # near the optimum f's changes are rounding: take full steps

        def ls_cond(ls):
            t, f_new, j = ls
            return (f_new > f + 1e-4 * t * slope + slack) & (j < 40)

        def ls_body(ls):
            t, _, j = ls
            return t / 2, fun(W + (t / 2) * d), j + 1

        t, f_new, j = jax.lax.while_loop(ls_cond, ls_body, (jnp.ones((), phi.dtype), fun(W + d), 0))
        failed = (f_new > f + 1e-4 * t * slope + slack) | ~jnp.isfinite(f_new)
        W_new = jnp.where(failed, W, W + t * d)
        f_new, g_new = value_and_grad(W_new)
        return W_new, f_new, g_new, k + 1, cg_total + cg_iters, failed

    W0 = jnp.zeros((targets.shape[1], phi.shape[1]), phi.dtype)
    f0, g0 = value_and_grad(W0)
    state = (W0, f0, g0, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    W, f, g, k, cg_total, failed = jax.lax.while_loop(cond, body, state)
    return W, f, jnp.linalg.norm(g), k, cg_total, failed


_newton_cg_jit = jax.jit(_newton_cg)


def shallow_optimum_cross_entropy(phi: Array, labels: Array, num_classes: int, l2: float = 1e-4, tol: float = 1e-10,
                                  maxiter: int = 10000, *, cg_maxiter: Optional[int] = None,
                                  on_failure: str = "raise") -> tuple[Array, Array, dict]:
    """`(W*, L*, info)` of `min_W (1/n) sum_i CE(W phi_i, label_i) + (l2/2) |W|_F^2`.

    `l2 > 0` makes the problem strongly convex, so the minimiser is unique (without it, separable data have no
    minimiser at all). Solved by truncated Newton (conjugate gradients on Hessian-vector products, Armijo
    backtracking) from `W = 0` until `|grad|_F <= tol`, in float64 where x64 is enabled. `maxiter` caps the Newton
    steps, `cg_maxiter` (default `2 m_y m`) the CG steps within each. `labels` are integers `(n,)` in
    `[0, num_classes)` or one-hot / probability rows `(n, num_classes)`.

    `L*` is the regularised objective at `W*`. `info`: `iterations` (Newton steps), `cg_iterations` (Hessian-vector
    products), `grad_norm`, `converged`, `cross_entropy` (the unregularised mean CE at `W*`), `l2`, `tol`, `method`.
    If not converged: `on_failure="raise"` (default) raises `OptimumNotConverged`, `"warn"` warns, `"ignore"` only
    sets `info["converged"] = False`.
    """
    _checks.check_float_array("phi", phi)
    _checks.check_ndim("phi", phi, (2,))
    _checks.check_positive("num_classes", num_classes, integer=True)
    _checks.check_positive("l2", l2)
    _checks.check_positive("tol", tol)
    _checks.check_positive("maxiter", maxiter, integer=True)
    _checks.check_choice("on_failure", on_failure, ("raise", "warn", "ignore"))
    n, m = phi.shape
    if cg_maxiter is None:
        cg_maxiter = max(2 * num_classes * m, 100)
    _checks.check_positive("cg_maxiter", cg_maxiter, integer=True)
    labels = jnp.asarray(labels)
    phi = _as_float64(phi, "shallow_optimum_cross_entropy")
    if jnp.issubdtype(labels.dtype, jnp.integer):
        _checks.check_shape("labels", labels, (n,), "integer labels, one per row of phi")
        if _checks.is_concrete(labels) and n and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
            raise ValueError(f"labels must lie in [0, num_classes={num_classes}); got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        targets = jax.nn.one_hot(labels, num_classes, dtype=phi.dtype)
    else:
        _checks.check_float_array("labels", labels)
        _checks.check_shape("labels", labels, (n, num_classes), "one-hot rows, one per row of phi")
        targets = labels.astype(phi.dtype)

    W, f, gnorm, k, cg_total, failed = _newton_cg_jit(phi, targets, float(l2), float(tol), jnp.int32(maxiter),
                                                       jnp.int32(cg_maxiter))
    info = {"iterations": int(k), "cg_iterations": int(cg_total), "grad_norm": float(gnorm),
            "converged": bool(gnorm <= tol), "line_search_failed": bool(failed),
            "cross_entropy": float(_ce_objective(W, phi, targets, 0.0)), "l2": float(l2), "tol": float(tol),
            "method": "newton-cg"}
    if not info["converged"] and on_failure != "ignore":
        message = (f"shallow_optimum_cross_entropy stopped at |grad| = {info['grad_norm']:.3g} > tol = {tol:g} after "
                   f"{info['iterations']} Newton steps ({info['cg_iterations']} CG steps"
                   f"{', line search failed' if info['line_search_failed'] else ''}); raise maxiter/cg_maxiter, "
                   f"loosen tol or increase l2")
        if on_failure == "raise":
            raise OptimumNotConverged(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return W, f, info


# ----------------------------------------------------------------------------- convergence bound (section 4)

def gd_rate_bound(learning_rate: Union[float, Array], lambda_min_plus: Union[float, Array],
                  U_norm2: Union[float, Array]) -> Array:
    """Per-step contraction factor of the gap `L - L*`: `1 - 2 eta lambda_min^+ / |U|_2^2` (theory.md 4 and 9).

    The discrete form of `dL/dt <= -|G|^2 / |U|_2^2 <= -2 lambda_min^+ (L - L*) / |U|_2^2`; the claim checked is
    `gap_{t+1} / gap_t <= gd_rate_bound(eta, lambda_min^+, |U_t|_2)`. Broadcasts over all arguments.
    """
    lr = jnp.asarray(learning_rate)
    lam = jnp.asarray(lambda_min_plus)
    u = jnp.asarray(U_norm2)
    return 1.0 - 2.0 * lr * lam / (u * u)


def flow_bound(gap0: Union[float, Array], lambda_min_plus: Union[float, Array], U_norm2_history: Array,
               learning_rate: Union[float, Array]) -> Array:
    """The gap bound along a run, aligned with its history: `bound[t] = gap0 prod_{s<t} (1 - 2 eta lambda / |U_s|^2)`.

    `U_norm2_history[t]` is `|U_t|_2` at the parameters *before* step t (where `history["loss"][t]` is evaluated),
    so `bound[0] = gap0` and `bound` has the history's length T (the factor of the last step is not used).
    Computed as `exp(cumsum(log factor))`; a factor `<= 0` (a step size beyond the bound's range) gives 0 after it.
    """
    u = jnp.asarray(U_norm2_history)
    if u.ndim != 1:
        raise ValueError(f"U_norm2_history must be a 1-D array over steps; got shape {u.shape}")
    factors = gd_rate_bound(learning_rate, lambda_min_plus, u)
    log_f = jnp.log(jnp.maximum(factors, 0.0))
    cum = jnp.concatenate([jnp.zeros((1,), log_f.dtype), jnp.cumsum(log_f)[:-1]])
    return jnp.asarray(gap0) * jnp.exp(cum)


def fit_log_linear(gaps: Any, start: Optional[int] = None, stop: Optional[int] = None,
                   lo: Optional[float] = None, hi: Optional[float] = None, *, steps: Optional[Any] = None) -> dict:
    """Least-squares fit of `log(gap_t) = log(c) + slope * t` over an explicit window (theory.md section 9).

    Window: the index range `[start, stop)` (Python slice semantics, default all), narrowed, when `lo` and/or `hi`
    are given, to the gap band `lo < gap < hi`: it starts at the first index whose gap is `< hi` and ends before the
    first later index whose gap is `<= lo` (or not positive or not finite), so it is one contiguous stretch.
    `steps` gives the x values (default `0, 1, ...`; e.g. when gaps were logged every k steps).
    Returns `{"rate": exp(slope)` (the per-step factor), `"slope"`, `"intercept"`, `"r2"`, `"window": (i0, i1)`,
    `"points"}`; at least 3 points are required.
    """
    g = np.asarray(gaps, dtype=np.float64)
    if g.ndim != 1:
        raise ValueError(f"gaps must be a 1-D sequence; got shape {g.shape}")
    x_all = np.arange(g.size, dtype=np.float64) if steps is None else np.asarray(steps, dtype=np.float64)
    if x_all.shape != g.shape:
        raise ValueError(f"steps must have the shape of gaps {g.shape}; got {x_all.shape}")
    i0, i1, _ = slice(start, stop).indices(g.size)
    if lo is not None and hi is not None and not lo < hi:
        raise ValueError(f"the gap band needs lo < hi; got lo={lo!r}, hi={hi!r}")
    if hi is not None:
        below = np.flatnonzero(g[i0:i1] < hi)
        i0 = i1 if below.size == 0 else i0 + int(below[0])
    usable = np.isfinite(g[i0:i1]) & (g[i0:i1] > (0.0 if lo is None else lo))
    bad = np.flatnonzero(~usable)
    if bad.size:
        i1 = i0 + int(bad[0])
    points = i1 - i0
    if points < 3:
        raise ValueError(f"fit_log_linear needs at least 3 positive, finite gaps in the window; the window "
                         f"(start={start}, stop={stop}, lo={lo}, hi={hi}) selected indices [{i0}, {i1}) of {g.size}")
    x, z = x_all[i0:i1], np.log(g[i0:i1])
    slope, intercept = np.polyfit(x, z, 1)
    ss_res = float(np.sum((z - (intercept + slope * x)) ** 2))
    ss_tot = float(np.sum((z - z.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    return {"rate": float(np.exp(slope)), "slope": float(slope), "intercept": float(intercept), "r2": r2,
            "window": (int(i0), int(i1)), "points": int(points)}


# ----------------------------------------------------------------------------- induced dynamics of W (section 5)

def delm_w_velocity(params: Params, grads: Params, gamma: Union[float, Array],
                    sigma: Union[str, Sigma] = "column_softmax") -> Array:
    """`dW/dt = d/dt W(A - t dL/dA, B - t dL/dB) at t = 0`: the velocity of `W = B U^{-1}` along the DELM's
    gradient flow, by `jax.jvp` through the closed form (`end_to_end`). `grads = {"A": dL/dA, "B": dL/dB}`."""
    A, B = _check_params(params)
    gA, gB = _check_params(grads)
    _checks.check_shape("grads['A']", gA, A.shape)
    _checks.check_shape("grads['B']", gB, B.shape)
    _checks.check_open_unit("gamma", gamma)
    return _velocity(A, B, gA, gB, gamma, get_sigma(sigma))


@jax.jit(static_argnames=("sigma",))
def _velocity(A: Array, B: Array, gA: Array, gB: Array, gamma: Any, sigma: Sigma) -> Array:
    return jax.jvp(lambda a, b: _w(a, b, gamma, sigma), (A, B), (-gA, -gB))[1]


def induced_preconditioner(params: Params, G: Array, gamma: Union[float, Array],
                           sigma: Union[str, Sigma] = "column_softmax") -> Array:
    """`P(G) = G (U U^T)^{-1} + K(K^*(G))`, so that the DELM's gradient flow moves `W` by `dW/dt = -P(G)`.

    `K(S) = gamma W Dsigma_A[S] U^{-1}` (`W = B U^{-1}`) is the change of W along a change S of A (a `jvp` of
    sigma) and `K^*(G) = Dsigma_A^*[gamma W^T G U^{-T}] = dL/dA` its adjoint (a `vjp` of sigma). The first term is
    `dL/dB U^{-1}` with `dL/dB = G U^{-T}`: `(U U^T)^{-1} = U^{-T} U^{-1}`, not `(U^T U)^{-1}` (theory.md section 5).
    """
    A, B = _check_params(params)
    _checks.check_float_array("G", G)
    _checks.check_shape("G", G, B.shape, "G = dL/dW has the shape of B, (m_y, m)")
    _checks.check_open_unit("gamma", gamma)
    return _precondition(A, B, G, gamma, get_sigma(sigma))


@jax.jit(static_argnames=("sig",))
def _precondition(A: Array, B: Array, G: Array, gamma: Any, sig: Sigma) -> Array:
    U = _u(A, gamma, sig)
    W = jnp.linalg.solve(U.T, B.T).T
    GUt = jnp.linalg.solve(U, G.T).T  # G U^{-T}
    first = jnp.linalg.solve(U.T, GUt.T).T  # G U^{-T} U^{-1}
    _, sigma_vjp = jax.vjp(sig, A)
    (S,) = sigma_vjp(gamma * W.T @ GUt)  # K^*(G) = dL/dA
    dsigma = jax.jvp(sig, (A,), (S,))[1]
    second = gamma * jnp.linalg.solve(U.T, (W @ dsigma).T).T  # K(S) = gamma W Dsigma[S] U^{-1}
    return first + second


def preconditioner_matrix(params: Params, gamma: Union[float, Array],
                          sigma: Union[str, Sigma] = "column_softmax") -> Array:
    """`P` as a dense `(m_y m) x (m_y m)` matrix acting on row-major `vec(G) = G.ravel()` (small problems only).

    Column k is `vec(P(E_k))` for the k-th basis matrix; `P` is symmetric positive definite.
    """
    A, B = _check_params(params)
    _checks.check_open_unit("gamma", gamma)
    return _preconditioner_matrix(A, B, gamma, get_sigma(sigma))


@jax.jit(static_argnames=("sigma",))
def _preconditioner_matrix(A: Array, B: Array, gamma: Any, sigma: Sigma) -> Array:
    d = B.size
    basis = jnp.eye(d, dtype=B.dtype).reshape(d, *B.shape)
    cols = jax.vmap(lambda E: _precondition(A, B, E, gamma, sigma).ravel())(basis)
    return cols.T


@jax.jit(static_argnames=("sigma",))
def _square_velocities(A: Array, B: Array, phi: Array, y: Array, gamma: Any, sigma: Sigma) -> tuple:
    """Loss, G, P(G) and the jvp velocity of W at the reverse-mode gradient, for the square loss."""

    def loss_fn(a, b):
        return square(phi @ _w(a, b, gamma, sigma).T, y)

    loss, (gA, gB) = jax.value_and_grad(loss_fn, argnums=(0, 1))(A, B)
    G = _sq_grad(_w(A, B, gamma, sigma), phi, y)
    return loss, G, _precondition(A, B, G, gamma, sigma), _velocity(A, B, gA, gB, gamma, sigma)


def trust_region_check(params: Params, phi: Array, y: Array, learning_rate: float, gamma: Union[float, Array],
                       sigma: Union[str, Sigma] = "column_softmax", *, lam: Union[float, str] = 1.0) -> dict:
    """Check at `params` that one DELM gradient step is a trust-region Newton step of the shallow square-loss model.

    With `G = dL/dW`, `P` the induced preconditioner and `eta` the learning rate: the step `v = -eta P(G)` solves
    `min_v <G, v> + 1/2 <v, H v>` s.t. `|v|_M <= delta` with `H(V) = V Phi Phi^T / n` (the shallow Hessian),
    multiplier `lam`, norm `M = ((eta P)^{-1} - H) / lam` and radius `delta = |v|_M`; the KKT condition
    `(H + lam M) v = -G` holds by construction, and the content is that M is positive definite (theory.md 5).
    `lam`: any `lam > 0` gives the same M up to scale (so the same definiteness); default `1.0`. `"balanced"` picks
    `lam = mean eigenvalue of (eta P)^{-1} - H`, so M's eigenvalues average 1.

    Measured on concrete values with dense `(m_y m)^2` matrices (small problems only). Returns plain floats:
    `velocity_rel_error` (`|velocity_jvp + P(G)| / |P(G)|`, where `velocity_jvp` is `delm_w_velocity` at the
    gradient from reverse-mode autodiff through the closed form), `P_min_eig`, `P_max_eig`, `P_asymmetry`,
    `H_max_eig`, `M_min_eig`, `M_positive_definite`, `kkt_residual` (`|(H + lam M) v + G| / |G|`), `delta`
    (`|v|_M`, nan where M is indefinite along v), `cosine_vs_gd` (`cos(-P(G), -G)`), `lambda`, `eta`, `loss`,
    `grad_norm` (`|G|_F`).
    """
    A, B = _check_params(params)
    _check_phi_y(phi, y)
    _checks.check_shape("phi", phi, (None, A.shape[0]), f"phi's columns are the width m = {A.shape[0]}")
    _checks.check_shape("y", y, (None, B.shape[0]), f"y's columns are the outputs m_y = {B.shape[0]}")
    _checks.check_positive("learning_rate", learning_rate)
    _checks.check_open_unit("gamma", gamma)
    sigma = get_sigma(sigma)
    if not (lam == "balanced" or (isinstance(lam, (int, float)) and not isinstance(lam, bool) and lam > 0)):
        raise ValueError(f"lam must be a positive number or 'balanced'; got {lam!r}")
    n, m = phi.shape
    m_y = B.shape[0]

    loss, G, PG, velocity = _square_velocities(A, B, phi, y, gamma, sigma)
    velocity_rel_error = jnp.linalg.norm(velocity + PG) / jnp.linalg.norm(PG)

    P = np.asarray(preconditioner_matrix(params, gamma, sigma), dtype=np.float64)
    P_asymmetry = np.linalg.norm(P - P.T) / np.linalg.norm(P)
    p_eig, p_vec = np.linalg.eigh(0.5 * (P + P.T))
    C = np.asarray(phi.T @ phi, dtype=np.float64) / n
    H = np.kron(np.eye(m_y), C)  # H[(i,j),(i,k)] = C[k,j] on row-major vec(V): vec(V C)
    eta = float(learning_rate)
    etaP_inv = (p_vec / (eta * p_eig)) @ p_vec.T  # (eta P)^{-1} from the symmetric eigendecomposition
    lam_value = float(np.mean(np.linalg.eigvalsh(etaP_inv - H))) if lam == "balanced" else float(lam)
    M = (etaP_inv - H) / lam_value
    M = 0.5 * (M + M.T)
    m_min = float(np.linalg.eigvalsh(M)[0])
    g = np.asarray(G, dtype=np.float64).ravel()
    pg = np.asarray(PG, dtype=np.float64).ravel()
    v = -eta * pg
    kkt = np.linalg.norm((H + lam_value * M) @ v + g) / np.linalg.norm(g)
    vMv = float(v @ M @ v)
    return {
        "velocity_rel_error": float(velocity_rel_error),
        "P_min_eig": float(p_eig[0]),
        "P_max_eig": float(p_eig[-1]),
        "P_asymmetry": float(P_asymmetry),
        "H_max_eig": float(np.linalg.eigvalsh(C)[-1]),
        "M_min_eig": m_min,
        "M_positive_definite": bool(m_min > 0),
        "kkt_residual": float(kkt),
        "delta": float(np.sqrt(vMv)) if vMv >= 0 else float("nan"),
        "cosine_vs_gd": float(pg @ g / (np.linalg.norm(pg) * np.linalg.norm(g))),
        "lambda": lam_value,
        "eta": eta,
        "loss": float(loss),
        "grad_norm": float(np.linalg.norm(g)),
    }
