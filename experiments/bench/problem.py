"""The problem every benchmark row solves: one training step of the DELM of docs/theory.md (and of one nonlinear
DEQ, `TanhMap`) on `n` samples of width `m` with `m_y` classes, square loss on one-hot targets, plain SGD.

- DELM: `W = B U^{-1}`, `U = I - gamma sigma(A)`, `sigma` the column softmax, predictions `phi W^T`.
- Tanh DEQ: `z_i = tanh(W_c z_i + U x_i + b)` (`W_c` = `W` scaled to Frobenius norm <= 0.9), predictions `z B^T`.

Every implementation (deq_jax, the inline plain-JAX + jaxopt baseline, torchdeq, plain PyTorch) gets the same data,
the same initial parameters and the same stopping rule: stop when `|f(z) - z|_2 <= tol * |f(0)|_2` over the whole
state (the relative residual of `deq_jax.solve`), at most `maxiter` iterations.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from experiments.common.cli import UserError


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
    references: dict = dataclasses.field(default_factory=dict)  # problem name -> float64 reference (filled lazily)

    def describe(self) -> dict:
        """The JSON record of the problem (what the goals' applicability is judged on)."""
        return {"n": self.n, "m": self.m, "m_y": self.m_y, "gamma": self.gamma, "tol": self.tol,
                "maxiter": self.maxiter, "learning_rate": self.learning_rate, "dtype": "float32", "data": self.data,
                "loss": "square (one-hot targets)", "sigma": "column softmax",
                "stopping_rule": "|f(z) - z|_2 <= tol * |f(0)|_2 over the whole state",
                "tanh_contraction": self.contraction,
                "reference": "float64: DELM closed form (numpy); tanh DEQ solved to 1e-12"}


def _fashion_mnist(n: int) -> Optional[tuple[np.ndarray, np.ndarray, str]]:
    """The first `n` of a seeded permutation of Fashion-MNIST's training set (raw pixels in [0, 1]), if on disk."""
    from experiments.common.datasets import DatasetNotFoundError, load_dataset, preprocess

    try:
        ds = load_dataset("fashion_mnist", download=False)
    except DatasetNotFoundError:  # not on this machine: the caller falls back to random data (and says so)
        return None
    if n > ds.x_train.shape[0]:
        raise UserError(f"--n must be at most the {ds.x_train.shape[0]} Fashion-MNIST training images; got {n} "
                        f"(or pass --data random)")
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
            raise UserError(f"--{name} must be a positive integer; got {value!r}")
    if data not in ("auto", "fashion_mnist", "random"):
        raise UserError(f"--data must be 'auto', 'fashion_mnist' or 'random'; got {data!r}")
    rng = np.random.default_rng(seed)
    loaded = None if data == "random" else _fashion_mnist(n)
    if loaded is None and data == "fashion_mnist":
        raise UserError("--data fashion_mnist: Fashion-MNIST is not on disk (apt-get install dataset-fashion-mnist, "
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
