"""Shared pieces of the benchmarks (`python -m experiments bench`): the problem, its float64 references, the
row protocol, and the measurement helpers.

The problem is one training step of the DELM of docs/theory.md (and of one nonlinear DEQ, `TanhMap`) on `n`
samples of width `m` with `m_y` classes, square loss on one-hot targets, plain SGD:

- DELM: `W = B U^{-1}`, `U = I - gamma sigma(A)`, `sigma` the column softmax, predictions `phi W^T`.
- Tanh DEQ: `z_i = tanh(W_c z_i + U x_i + b)` (`W_c` = `W` scaled to Frobenius norm <= 0.9), predictions `z B^T`.

Every implementation (deq_jax, the inline plain-JAX + jaxopt baseline, torchdeq, plain PyTorch) gets the same data,
the same initial parameters and the same stopping rule: stop when `|f(z) - z|_2 <= tol * |f(0)|_2` over the whole
state (the relative residual of `deq_jax.solve`), at most `maxiter` iterations. The bench then measures, outside
the timed step and independently of each implementation's own bookkeeping, the relative residual of the returned
equilibrium (in float64) and the gradient's relative error against a float64 reference: the DELM's closed form
(numpy, section 3 of docs/theory.md) or, for the tanh DEQ, a float64 solve to tolerance 1e-12.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from typing import Any, Callable, Optional

import numpy as np


# ----------------------------------------------------------------------------- the problem

@dataclasses.dataclass
class Problem:
    """Data and initial parameters shared by every row (float32 numpy arrays, samples as rows)."""

    n: int
    m: int
    m_y: int
    gamma: float
    tol: float
    maxiter: int
    learning_rate: float
    phi: np.ndarray  # (n, m) features
    y: np.ndarray  # (n, m_y) one-hot targets
    delm: dict  # {"A": (m, m), "B": (m_y, m)}
    tanh: dict  # {"W": (m, m), "U": (m, m), "b": (m,), "B": (m_y, m)}
    contraction: float
    data: str  # where phi came from, in words
    references: dict = dataclasses.field(default_factory=dict)  # problem name -> reference (filled lazily)


def _fashion_mnist(n: int) -> Optional[tuple[np.ndarray, np.ndarray, str]]:
    """The first `n` of a seeded permutation of Fashion-MNIST's training set (raw pixels in [0, 1]), if on disk."""
    from experiments.common.datasets import DatasetNotFoundError, load_dataset, preprocess

    try:
        ds = load_dataset("fashion_mnist", download=False)
    except DatasetNotFoundError:  # not on this machine: the caller falls back to random data (and says so)
        return None
    if n > ds.x_train.shape[0]:
        raise ValueError(f"--n must be at most the {ds.x_train.shape[0]} Fashion-MNIST training images; got {n}")
    pp = preprocess(ds, n_train=n, n_test=1, features="raw", add_bias=False, seed=0)
    return pp.x_train, pp.y_train, f"Fashion-MNIST train, {n} images (seeded permutation), raw pixels in [0, 1]"


def make_problem(*, n: int, width: int, classes: int, gamma: float, tol: float, maxiter: int,
                 learning_rate: float, data: str, seed: int = 0, contraction: float = 0.9) -> Problem:
    """Build the shared problem. `data`: "auto" (Fashion-MNIST if on disk, else random), "fashion_mnist", "random".

    Fashion-MNIST pixels are 784 wide; another `width` uses a fixed random projection with entries
    `N(0, 1/784)` (the distribution of `deq_jax.maps.random_projection`). Parameters are drawn with numpy (seeded)
    from the distributions of `deq_jax.models.DELM.init` (`A, B ~ 0.1 N(0, 1)`) and `deq_jax.maps.TanhMap.init`;
    numpy because eager JAX random calls compile one small program each (seconds per problem).
    """
    for name, value in (("n", n), ("width", width), ("classes", classes), ("maxiter", maxiter)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"--{name} must be a positive integer; got {value!r}")
    if data not in ("auto", "fashion_mnist", "random"):
        raise ValueError(f"--data must be 'auto', 'fashion_mnist' or 'random'; got {data!r}")
    rng = np.random.default_rng(seed)
    loaded = None if data == "random" else _fashion_mnist(n)
    if loaded is None and data == "fashion_mnist":
        raise ValueError("--data fashion_mnist: Fashion-MNIST is not on disk (apt-get install dataset-fashion-mnist, "
                         "or put the IDX files in the deq_jax cache); use --data random")
    if loaded is not None:
        x, labels, description = loaded
        if classes != 10:
            labels = labels % classes
            description += f", labels mod {classes}"
    else:
        x = rng.random((n, 784))
        labels = rng.integers(0, classes, n)
        description = f"random: {n} samples, 784 uniform [0, 1) inputs, {classes} random labels (seed {seed})"
    x = np.asarray(x, np.float32)
    if width != x.shape[1]:
        in_dim = x.shape[1]
        projection = rng.standard_normal((in_dim, width)) / np.sqrt(in_dim)
        x = np.asarray(x.astype(np.float64) @ projection, np.float32)
        description += f", fixed random projection {in_dim} -> {width}"
    y = np.eye(classes, dtype=np.float32)[labels]
    f32 = lambda a: np.asarray(a, np.float32)
    delm = {"A": f32(0.1 * rng.standard_normal((width, width))), "B": f32(0.1 * rng.standard_normal((classes, width)))}
    tanh = {"W": f32(rng.standard_normal((width, width)) / np.sqrt(width)),
            "U": f32(rng.standard_normal((width, width)) / np.sqrt(width)),
            "b": f32(0.1 * rng.standard_normal(width)), "B": delm["B"]}
    return Problem(n=n, m=width, m_y=classes, gamma=gamma, tol=tol, maxiter=maxiter, learning_rate=learning_rate,
                   phi=x, y=y, delm=delm, tanh=tanh, contraction=contraction, data=description)


# ----------------------------------------------------------------------------- float64 references

def _softmax0(A: np.ndarray) -> np.ndarray:
    e = np.exp(A - A.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def delm_reference(p: Problem) -> dict:
    """The DELM's loss and gradients in float64 from the closed form (docs/theory.md sections 3 and 8), in numpy.

    `W = B U^{-1}`, `G = dL/dW = (phi W^T - Y)^T phi / n`, `dL/dB = G U^{-T}`, `dL/dS = gamma W^T dL/dB`,
    `dL/dA = S * (dL/dS - 1 1^T (S * dL/dS))` (the column softmax's Jacobian, column by column).
    """
    if "delm" in p.references:
        return p.references["delm"]
    A, B = p.delm["A"].astype(np.float64), p.delm["B"].astype(np.float64)
    phi, y = p.phi.astype(np.float64), p.y.astype(np.float64)
    S = _softmax0(A)
    U = np.eye(p.m) - p.gamma * S
    W = np.linalg.solve(U.T, B.T).T
    R = phi @ W.T - y
    loss = 0.5 * np.mean(np.sum(R * R, axis=1))
    G = R.T @ phi / p.n
    dB = np.linalg.solve(U, G.T).T
    dS = p.gamma * W.T @ dB
    dA = S * (dS - np.sum(S * dS, axis=0, keepdims=True))
    p.references["delm"] = {"loss": float(loss), "grads": {"A": dA, "B": dB}}
    return p.references["delm"]


def tanh_reference(p: Problem) -> dict:
    """The tanh DEQ's loss and gradients in float64: fixed-point iteration to relative residual 1e-12 with the
    implicit backward (GMRES to 1e-12), computed by deq_jax under `jax.enable_x64`."""
    if "tanh" in p.references:
        return p.references["tanh"]
    import jax
    import jax.numpy as jnp

    from deq_jax.maps import TanhMap
    from deq_jax.solve import Implicit, solve

    with jax.enable_x64(True):
        params = {k: jnp.asarray(v, jnp.float64) for k, v in p.tanh.items()}
        phi, y = jnp.asarray(p.phi, jnp.float64), jnp.asarray(p.y, jnp.float64)

        def loss(params):
            inner = {k: params[k] for k in ("W", "U", "b")}
            sol = solve(TanhMap(p.contraction), jnp.zeros((p.n, p.m), jnp.float64), inner, phi,
                        solver="fixed_point", backward=Implicit("gmres", tol=1e-12), tol=1e-12, maxiter=5000)
            r = sol.value @ params["B"].T - y
            return 0.5 * jnp.mean(jnp.sum(r * r, axis=1)), sol.stats

        (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        if not bool(stats.converged):
            raise RuntimeError(f"the float64 tanh reference did not converge: {stats}")
        p.references["tanh"] = {"loss": float(value), "grads": {k: np.asarray(v) for k, v in grads.items()}}
    return p.references["tanh"]


def reference(p: Problem, problem: str) -> dict:
    return delm_reference(p) if problem == "delm" else tanh_reference(p)


def relative_residual(p: Problem, problem: str, formulation: str, state: np.ndarray, device: Any = None) -> float:
    """`|f(z) - z| / |f(0)|` in float64 for the returned equilibrium `state` (deq_jax's definition).

    Computed with JAX under `jax.enable_x64` on `device` (the full-batch GPU problem's products are large).
    """
    import jax

    with jax.enable_x64(True):
        put = lambda a: jax.device_put(np.asarray(a, np.float64), device)
        if problem == "delm":
            transposed = formulation == "transposed"
            args = (put(state), put(p.delm["A"]), put(p.delm["B"] if transposed else p.phi), p.gamma)
            return float(_residual_function("delm_transposed" if transposed else "delm_per_sample")(*args))
        args = (put(state), put(p.tanh["W"]), put(p.tanh["U"]), put(p.tanh["b"]), put(p.phi), p.contraction)
        return float(_residual_function("tanh")(*args))


@functools.lru_cache(maxsize=None)
def _residual_function(kind: str):
    """The jitted relative residual of each map (one compilation per kind and shape, shared by the rows)."""
    import jax
    import jax.numpy as jnp

    def delm(z, A, c, gamma, transposed):
        S = jax.nn.softmax(A, axis=0)
        return jnp.linalg.norm(c + gamma * (z @ S if transposed else z @ S.T) - z) / jnp.linalg.norm(c)

    def tanh(z, W, U, b, x, contraction):
        Wc = W * jnp.minimum(1.0, contraction / jnp.linalg.norm(W))
        injection = x @ U.T + b
        return jnp.linalg.norm(jnp.tanh(z @ Wc.T + injection) - z) / jnp.linalg.norm(jnp.tanh(injection))

    functions = {"delm_transposed": functools.partial(delm, transposed=True),
                 "delm_per_sample": functools.partial(delm, transposed=False), "tanh": tanh}
    return jax.jit(functions[kind])


def relative_errors(grads: dict, ref: dict) -> dict:
    """`|g - g_ref|_F / |g_ref|_F` per parameter (float64)."""
    out = {}
    for k, r in ref.items():
        g = np.asarray(grads[k], np.float64)
        out[k] = float(np.linalg.norm(g - r) / max(np.linalg.norm(r), np.finfo(np.float64).tiny))
    return out


# ----------------------------------------------------------------------------- the row protocol

@dataclasses.dataclass
class Check:
    """What one row's computation returned, gathered outside the timed step."""

    iterations: Optional[int]  # forward iterations (0 for direct solves)
    converged: Optional[bool]  # the implementation's own verdict (None where it has none)
    state: np.ndarray  # the equilibrium (z for per-sample, W for transposed)
    grads: dict  # parameter name -> gradient (numpy)
    extra: dict = dataclasses.field(default_factory=dict)  # e.g. torchdeq's backward iterations


@dataclasses.dataclass
class Prepared:
    """A row ready to time: `run()` performs one full training step and waits for it to finish."""

    run: Callable[[], Any]
    check: Callable[[], Check]
    compile_s: Optional[float] = None  # jax: trace + XLA compile of the whole step
    temp_bytes: Optional[int] = None  # XLA temporary memory of the compiled step
    reset: Optional[Callable[[], None]] = None  # untimed, before each timed step (torch: restore the parameters)
    peak_memory: Optional[Callable[[], Optional[int]]] = None  # device peak bytes after a step, where measurable
    notes: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Case:
    """One row of a benchmark table; `prepare()` builds (and, for JAX, compiles) it."""

    impl: str  # "deq_jax" | "inline" | "torchdeq" | "torch"
    problem: str  # "delm" | "tanh"
    formulation: str  # "transposed" | "per_sample"
    solver: str  # "direct" | "anderson" | "fixed_point" | "broyden"
    backward: str  # "implicit" | "one_step" | "unrolled" | "autodiff"
    prepare: Callable[[], Prepared]
    label: str = ""  # extra words for the row name (e.g. "100 it")
    note: str = ""
    tol: Optional[float] = None  # the row's relative tolerance if not the problem's

    @property
    def name(self) -> str:
        parts = [self.impl, self.problem, self.formulation, self.solver, self.backward, self.label]
        return " ".join(part for part in parts if part)


# ----------------------------------------------------------------------------- measurement helpers

def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Samples the process's resident memory every ~0.5 ms while active; `.delta` = peak minus the start.

    A coarse, implementation-neutral measure of the memory one step touches on the CPU (allocators may keep
    freed memory, so it is taken on the first run after building the row).
    """

    def __init__(self):
        self.delta: Optional[int] = None

    def __enter__(self):
        if not os.path.exists("/proc/self/statm"):
            return self
        self._start = _rss_bytes()
        self._peak = self._start
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, _rss_bytes())
                time.sleep(0.0005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.delta = self._peak - self._start
        return False


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"
