"""The PyTorch rows of the peer benchmark: torchdeq 0.1.0 and plain PyTorch (`torch.linalg.solve`) on the same
problem as the JAX rows (same data, initial parameters, tolerance, stopping rule and maxiter).

torchdeq treats axis 0 as the batch and stops when the largest per-batch-element residual is below `f_tol`. To get
the same stopping rule as deq_jax and the inline baseline (`|f(z) - z|_2 <= tol * |f(z)|_2` over the whole state,
at the solution), the whole state is one batch element, `z` of shape `(1, n, m)` (or `(1, m_y, m)` transposed),
with `f_stop_mode="abs"` and `f_tol = tol * |z*|` (`checks.equilibrium_norm`, the float64 equilibrium's norm).
torchdeq ignores unknown keys silently, so every setting is read back from the constructed module, and its returned
solver statistics (`nstep`, `abs_lowest`, the trace length, the backward solver's statistics through
`backward_writer`) are recorded with the row.

Optional: `pip install -e '.[peer]'` (torch==2.13.0, torchdeq==0.1.0). Without them the rows are skipped with a
note saying so.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any

from experiments.bench.checks import equilibrium_norm
from experiments.bench.problem import Problem
from experiments.bench.protocol import Case, Check, Prepared

TORCHDEQ_SOLVERS = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}


def availability() -> dict:
    """`{"torch": bool, "torchdeq": bool, "note": str, "versions": {...}}` without raising or importing torch (an
    import costs seconds; a broken installation shows up as an error in the row that uses it)."""
    out = {"torch": False, "torchdeq": False, "note": "", "versions": {}}
    for package in ("torch", "torchdeq"):
        if importlib.util.find_spec(package) is None:
            skipped = "torch and torchdeq rows" if package == "torch" else "torchdeq rows"
            out["note"] = (
                f"{package} is not installed; {skipped} skipped. Install the optional extra: "
                f"pip install -e '.[peer]' (torch==2.13.0, torchdeq==0.1.0)"
            )
            return out
        out[package] = True
        out["versions"][package] = importlib.metadata.version(package)
    return out


def torch_device_info(device: str) -> dict:
    """Threads and device name of the torch side."""
    import torch  # optional ('peer' extra) and seconds to import: only for the torch rows

    info = {
        "num_threads": torch.get_num_threads(),
        "mkl": bool(torch.backends.mkl.is_available()),
        "cuda_available": bool(torch.cuda.is_available()),
    }
    if device == "gpu" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
    return info


def set_precision(precision: str | None) -> None:
    """On GPUs, TF32 matmuls off for "highest" (the JAX rows' precision), PyTorch's default otherwise."""
    import torch  # optional ('peer' extra) and seconds to import: only for the torch rows

    highest = precision in ("highest", "float32")
    torch.backends.cuda.matmul.allow_tf32 = not highest
    torch.backends.cudnn.allow_tf32 = not highest
    torch.set_float32_matmul_precision("highest" if highest else "high")


class _Setup:
    """Tensors of one row on the torch device, the SGD optimizer and a reset to the initial parameters."""

    def __init__(self, p: Problem, params: dict, device: str):
        import torch  # optional ('peer' extra) and seconds to import: only for the torch rows

        self.torch = torch
        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        self.params = {k: torch.tensor(v, device=self.device, requires_grad=True) for k, v in params.items()}
        self.initial = {k: v.detach().clone() for k, v in self.params.items()}
        self.phi = torch.tensor(p.phi, device=self.device)
        self.y = torch.tensor(p.y, device=self.device)
        self.optimizer = torch.optim.SGD(list(self.params.values()), lr=p.learning_rate)

    def reset(self) -> None:
        with self.torch.no_grad():
            for k, v in self.params.items():
                v.copy_(self.initial[k])
        self.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def loss(self, predictions):
        r = predictions - self.y
        return 0.5 * (r * r).sum(-1).mean()

    def step(self, forward) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = forward()[0]
        loss.backward()
        self.optimizer.step()
        self.sync()

    def grads(self) -> dict:
        return {k: v.grad.detach().cpu().numpy() for k, v in self.params.items()}

    def peak(self, forward):
        if self.device.type != "cuda":
            return None

        def measure() -> int | None:
            self.reset()
            self.torch.cuda.reset_peak_memory_stats()
            self.step(forward)
            return int(self.torch.cuda.max_memory_allocated())

        return measure


def _make_deq(p: Problem, solver: str, backward: str, abs_tol: float) -> tuple[Any, dict]:
    """A torchdeq module with our settings, each read back (torchdeq silently ignores unknown keys)."""
    import torchdeq  # optional ('peer' extra): only for the torchdeq rows
    from torchdeq.solver import get_solver

    name = TORCHDEQ_SOLVERS[solver]
    settings = dict(
        f_solver=name,
        b_solver=name,
        f_max_iter=p.maxiter,
        b_max_iter=p.maxiter,
        f_tol=abs_tol,
        f_stop_mode="abs",
        b_tol=p.tol,
        b_stop_mode="rel",
        ift=(backward == "implicit"),
        grad=1,
    )
    deq = torchdeq.get_deq(**settings)
    read_back = {
        "f_solver": deq.f_solver is get_solver(name),
        "b_solver": deq.b_solver is get_solver(name),
        "f_max_iter": deq.f_max_iter == p.maxiter,
        "b_max_iter": deq.b_max_iter == p.maxiter,
        "f_tol": deq.f_tol == abs_tol,
        "b_tol": deq.b_tol == p.tol,
        "f_stop_mode": deq.f_stop_mode == "abs",
        "b_stop_mode": deq.b_stop_mode == "rel",
        "backward": ("func_ift" in deq.produce_grad[-1].__qualname__) == (backward == "implicit"),
        "training_mode": bool(deq.training),
    }
    if not all(read_back.values()):
        bad = [k for k, ok in read_back.items() if not ok]
        raise RuntimeError(f"torchdeq did not take the settings {bad} (asked for {settings})")
    return deq, {
        "settings": {k: (float(v) if isinstance(v, float) else v) for k, v in settings.items()},
        "settings_read_back": "all verified on the module",
    }


def _torchdeq_check(setup: _Setup, forward, abs_tol: float, maxiter: int, writer_box: dict, config: dict) -> Check:
    setup.reset()
    loss, state, info = forward()
    loss.backward()
    grads = setup.grads()
    setup.reset()
    nstep = int(info["nstep"].max().item())  # the step of the returned (lowest-residual) estimate
    abs_lowest = float(info["abs_lowest"].max().item())
    if not 0 < nstep <= maxiter:
        raise RuntimeError(f"torchdeq reports nstep={nstep} with f_max_iter={maxiter}: the setting was not used")
    extra = dict(config, torchdeq_nstep=nstep, torchdeq_abs_lowest=abs_lowest, torchdeq_abs_tol=abs_tol)
    back = writer_box.get("info")
    if back is not None:
        extra["backward_iterations"] = int(back["nstep"].max().item())
        extra["backward_rel_residual"] = float(back["rel_lowest"].max().item())
        extra["backward_converged"] = bool(extra["backward_rel_residual"] < config["settings"]["b_tol"])
    return Check(
        iterations=nstep, converged=abs_lowest < abs_tol, state=state.detach().cpu().numpy(), grads=grads, extra=extra
    )


def torchdeq_delm(p: Problem, formulation: str, solver: str, backward: str, *, device: str) -> Case:
    """The DELM step through `torchdeq.get_deq` (forward under no_grad, then IFT or one-step gradient)."""

    def prepare() -> Prepared:
        setup = _Setup(p, p.delm, device)
        torch, A, B, phi = setup.torch, setup.params["A"], setup.params["B"], setup.phi
        transposed = formulation == "transposed"
        abs_tol = p.tol * equilibrium_norm(p, "delm", formulation)  # deq_jax's rule at the solution
        deq, config = _make_deq(p, solver, backward, abs_tol)
        box: dict = {}

        def forward():
            S = torch.softmax(A, dim=0)
            if transposed:
                f = lambda W: B + p.gamma * W @ S
                z0 = torch.zeros(1, p.m_y, p.m, device=setup.device)
            else:
                f = lambda z: p.gamma * z @ S.T + phi
                z0 = torch.zeros(1, p.n, p.m, device=setup.device)
            z_out, info = deq(f, z0, backward_writer=lambda i: box.__setitem__("info", i))
            z = z_out[-1][0]
            return setup.loss(phi @ z.T if transposed else z @ B.T), z, info

        return Prepared(
            run=lambda: setup.step(forward),
            reset=setup.reset,
            peak_memory=setup.peak(forward),
            check=lambda: _torchdeq_check(setup, forward, abs_tol, p.maxiter, box, config),
        )

    return Case("torchdeq", "delm", formulation, solver, backward, prepare)


def torchdeq_tanh(p: Problem, solver: str, backward: str, *, device: str) -> Case:
    """The tanh DEQ step through torchdeq (injection `U x + b` computed once, as deq_jax's TanhMap defines it)."""

    def prepare() -> Prepared:
        setup = _Setup(p, p.tanh, device)
        torch, prm, phi = setup.torch, setup.params, setup.phi
        abs_tol = p.tol * equilibrium_norm(p, "tanh", "per_sample")  # deq_jax's rule at the solution
        deq, config = _make_deq(p, solver, backward, abs_tol)
        box: dict = {}

        def forward():
            W = prm["W"]
            Wc = W * torch.clamp(p.contraction / torch.sqrt((W * W).sum()), max=1.0)
            injection = phi @ prm["U"].T + prm["b"]
            f = lambda z: torch.tanh(z @ Wc.T + injection)
            z_out, info = deq(
                f, torch.zeros(1, p.n, p.m, device=setup.device), backward_writer=lambda i: box.__setitem__("info", i)
            )
            z = z_out[-1][0]
            return setup.loss(z @ prm["B"].T), z, info

        return Prepared(
            run=lambda: setup.step(forward),
            reset=setup.reset,
            peak_memory=setup.peak(forward),
            check=lambda: _torchdeq_check(setup, forward, abs_tol, p.maxiter, box, config),
        )

    return Case("torchdeq", "tanh", "per_sample", solver, backward, prepare)


def torch_direct_delm(p: Problem, formulation: str, *, device: str) -> Case:
    """The DELM step in plain PyTorch with `torch.linalg.solve` (autograd through the LU solve)."""

    def prepare() -> Prepared:
        setup = _Setup(p, p.delm, device)
        torch, A, B, phi = setup.torch, setup.params["A"], setup.params["B"], setup.phi
        eye = torch.eye(p.m, device=setup.device)

        def forward():
            U = eye - p.gamma * torch.softmax(A, dim=0)
            if formulation == "transposed":
                W = torch.linalg.solve(U.T, B.T).T
                return setup.loss(phi @ W.T), W, None
            Z = torch.linalg.solve(U, phi.T).T
            return setup.loss(Z @ B.T), Z, None

        def check() -> Check:
            setup.reset()
            loss, state, _ = forward()
            loss.backward()
            grads = setup.grads()
            setup.reset()
            return Check(iterations=0, converged=None, state=state.detach().cpu().numpy(), grads=grads)

        return Prepared(
            run=lambda: setup.step(forward), reset=setup.reset, peak_memory=setup.peak(forward), check=check
        )

    return Case("torch", "delm", formulation, "direct", "autodiff", prepare)
