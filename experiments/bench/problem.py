"""The problem every benchmark row solves: one training step of the DELM of docs/theory.md (and of one nonlinear
DEQ, `TanhMap`) on `n` samples of width `m` with `m_y` classes, square loss on one-hot targets, plain SGD.

- DELM: `W = B U^{-1}`, `U = I - gamma sigma(A)`, `sigma` the column softmax, predictions `phi W^T`.
- Tanh DEQ: `z_i = tanh(W_c z_i + U x_i + b)` (`W_c` = `W` scaled to Frobenius norm <= 0.9), predictions `z B^T`.

Every implementation (deq_jax, the inline plain-JAX + jaxopt baseline, torchdeq, plain PyTorch) gets the same data,
the same initial parameters and the same stopping rule: stop when `|f(z) - z|_2 <= tol * |f(z)|_2` (deq_jax's
start-independent rule; the baselines, which take an absolute tolerance, get `tol * |z*|_2`), at most `maxiter`
iterations.

The SGD step size is, unless given, `1 / lambda_max(J^T H J)` at the initial parameters: `J` the Jacobian of
`(A, B) -> W`, `H(V) = V C` with `C = phi^T phi / n` (the Gauss-Newton matrix of the square loss, docs/theory.md
section 9), by power iteration in float64. GD is linearly unstable above twice that, so training at it is a real
run (the loss falls) that moves as fast as a stable step size allows: the honest setting for warm starts, which
gain from small moves. (At m = 784 on Fashion-MNIST a fixed 1e-3 diverges in the first steps.)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from experiments.common.cli import UserError
from experiments.common.datasets import DatasetNotFoundError, Setting, load_dataset, preprocess


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
    learning_rate_rule: str = "given (--learning-rate)"
    gauss_newton_lambda_max: float | None = None  # lambda_max(J^T H J) at the initial parameters, if computed
    references: dict = dataclasses.field(default_factory=dict)  # problem name -> float64 reference (filled lazily)

    def describe(self) -> dict:
        """The JSON record of the problem (what the goals' applicability is judged on)."""
        return {
            "n": self.n,
            "m": self.m,
            "m_y": self.m_y,
            "gamma": self.gamma,
            "tol": self.tol,
            "maxiter": self.maxiter,
            "learning_rate": self.learning_rate,
            "learning_rate_rule": self.learning_rate_rule,
            "gauss_newton_lambda_max": self.gauss_newton_lambda_max,
            "dtype": "float32",
            "data": self.data,
            "loss": "square (one-hot targets)",
            "sigma": "column softmax",
            "stopping_rule": "|f(z) - z|_2 <= tol * |f(z)|_2 (deq_jax: over the whole state, per sample in the "
            "per-sample form; jaxopt and torchdeq: absolute tolerance tol * |z*|_2, |z*| the "
            "float64 equilibrium's norm)",
            "tanh_contraction": self.contraction,
            "reference": "float64: DELM closed form (numpy); tanh DEQ solved to 1e-12",
        }


def _settings() -> dict:
    """How the loader's messages name its settings here: the bench's flags, not function arguments."""

    return {"data_dir": Setting(flag="--data-dir"), "n_train": Setting(flag="--n")}


def _fashion_mnist(n: int, data_dir: str | None, required: bool) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The first `n` of a seeded permutation of Fashion-MNIST's training set (raw pixels in [0, 1]), if on disk.

    Searched in `data_dir` (--data-dir) first, then the cache and /usr/share/datasets. A file that is there but
    corrupt, or a --data-dir that does not exist, is a `UserError` (one line); files that are simply absent give
    None, unless `required`."""

    try:
        ds = load_dataset("fashion_mnist", data_dir=data_dir, download=False, settings=_settings())
    except DatasetNotFoundError as err:
        if err.setting == "data_dir":  # a --data-dir that is not there: its own message names the flag
            raise
        if required:
            raise UserError(
                "--data fashion_mnist: Fashion-MNIST is not on disk (apt-get install "
                "dataset-fashion-mnist, or pass --data-dir with its four IDX files); or use --data "
                "random"
            ) from None
        return None  # not on this machine: the caller falls back to random data (and says so)
    if n > ds.x_train.shape[0]:
        raise UserError(
            f"--n must be at most the {ds.x_train.shape[0]} Fashion-MNIST training images; got {n} "
            f"(or pass --data random)"
        )
    pp = preprocess(ds, n_train=n, n_test=1, features="raw", add_bias=False, seed=0)
    return pp.x_train, pp.y_train, f"Fashion-MNIST train, {n} images (seeded permutation), raw pixels in [0, 1]"


def make_problem(
    *,
    n: int,
    width: int,
    classes: int,
    gamma: float,
    tol: float,
    maxiter: int,
    learning_rate: float | None,
    data: str,
    seed: int = 0,
    contraction: float = 0.9,
    data_dir: str | None = None,
) -> Problem:
    """Build the shared problem. `data`: "auto" (Fashion-MNIST if on disk, else random), "fashion_mnist", "random".
    `learning_rate=None`: `1 / lambda_max` of the Gauss-Newton matrix at the initial parameters (module docstring).

    Fashion-MNIST pixels are 784 wide; another `width` uses a fixed random projection with entries
    `N(0, 1/784)` (the distribution of `deq_jax.maps.random_projection`). Parameters are drawn with numpy (seeded)
    from the distributions of `deq_jax.models.DELM.init` (`A, B ~ 0.1 N(0, 1)`) and `deq_jax.maps.TanhMap.init`;
    numpy because eager JAX random calls compile one small program each (seconds per problem).
    """
    for name, value in (("n", n), ("width", width), ("classes", classes), ("maxiter", maxiter)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"--{name} must be a positive integer; got {value!r}")
    if data not in ("auto", "fashion_mnist", "random"):
        raise UserError(f"--data must be 'auto', 'fashion_mnist' or 'random'; got {data!r}")
    rng = np.random.default_rng(seed)
    loaded = None if data == "random" else _fashion_mnist(n, data_dir, required=data == "fashion_mnist")
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
    tanh = {
        "W": f32(rng.standard_normal((width, width)) / np.sqrt(width)),
        "U": f32(rng.standard_normal((width, width)) / np.sqrt(width)),
        "b": f32(0.1 * rng.standard_normal(width)),
        "B": delm["B"],
    }
    p = Problem(
        n=n,
        m=width,
        m_y=classes,
        gamma=gamma,
        tol=tol,
        maxiter=maxiter,
        learning_rate=0.0 if learning_rate is None else learning_rate,
        phi=x,
        y=y,
        delm=delm,
        tanh=tanh,
        contraction=contraction,
        data=description,
    )
    if learning_rate is None:
        lam = gauss_newton_lambda_max(p)
        p.learning_rate, p.gauss_newton_lambda_max = 1.0 / lam, lam
        p.learning_rate_rule = (
            "1 / lambda_max(J^T H J) at the initial parameters (the Gauss-Newton matrix of the "
            "square loss; GD is linearly unstable above twice this)"
        )
    return p


class ClosedForm(NamedTuple):
    """`S = sigma(A)` (the column softmax), `U = I - gamma S` and the end-to-end matrix `W = B U^{-1}`."""

    S: np.ndarray
    U: np.ndarray
    W: np.ndarray


def closed_form(p: Problem, A: np.ndarray, B: np.ndarray) -> ClosedForm:
    """The DELM's closed form in NumPy float64: the benchmark's one end-to-end matrix for its references, which
    share no code with the library they check (`deq_jax.theory.end_to_end` is the library's own)."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    e = np.exp(A - A.max(axis=0, keepdims=True))
    S = e / e.sum(axis=0, keepdims=True)
    U = np.eye(p.m) - p.gamma * S
    return ClosedForm(S, U, np.linalg.solve(U.T, B.T).T)


def gauss_newton_lambda_max(p: Problem, iterations: int = 300, rtol: float = 1e-9) -> float:
    """`lambda_max(J^T H J)` at the problem's DELM parameters, by power iteration in float64 (numpy), read off as the
    Rayleigh quotient (the operator is symmetric positive semi-definite: the quotient's error is the square of the
    iterate's), stopped when it changes by less than `rtol` relative.

    `J(dA, dB) = dW = (dB + gamma W dS) U^{-1}` with `dS = S * (dA - 1 1^T (S * dA))` (the column softmax's
    Jacobian), `H(dW) = dW C`, `C = phi^T phi / n`; `J^T(Q) = (S * (dS' - 1 1^T (S * dS')), Q')` with
    `Q' = Q U^{-T}`, `dS' = gamma W^T Q'`. Each product costs `O(m^2 m_y)` once `U^{-1}` is known."""
    phi = p.phi.astype(np.float64)
    S, U, W = closed_form(p, p.delm["A"], p.delm["B"])
    U_inv = np.linalg.inv(U)
    C = phi.T @ phi / p.n
    softmax_t = lambda dS: S * (dS - np.sum(S * dS, axis=0, keepdims=True))  # symmetric per column
    dot = lambda a, b: sum(float(np.sum(x * y)) for x, y in zip(a, b, strict=True))

    def operator(v):
        dA, dB = v
        Q = ((dB + p.gamma * W @ softmax_t(dA)) @ U_inv) @ C
        Qp = Q @ U_inv.T
        return softmax_t(p.gamma * W.T @ Qp), Qp

    rng = np.random.default_rng(1)
    v = (rng.standard_normal(p.delm["A"].shape), rng.standard_normal(p.delm["B"].shape))
    lam = 0.0
    for _ in range(iterations):
        v = tuple(x / np.sqrt(dot(v, v)) for x in v)
        w = operator(v)
        new = dot(v, w)  # the Rayleigh quotient of the unit vector v
        if abs(new - lam) <= rtol * new:
            return new
        lam, v = new, w
    return lam
