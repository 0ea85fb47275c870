"""The theory's quantities, computed so that the paper's claims can be checked numerically (docs/theory.md).

Conventions: samples are rows, as everywhere in deq_jax. `phi` is `(n, m)`, targets `y` are `(n, m_y)`, the
end-to-end matrix `W` is `(m_y, m)` and predictions are `phi @ W.T`. In docs/theory.md's column notation
`Phi = phi.T`, so `Phi Phi^T / n = phi.T @ phi / n = C` and, for the square loss
`L = (1/n) sum_i 1/2 |W phi_i - y_i|^2`, `G = dL/dW = (phi W^T - y)^T phi / n`. DELM parameters are
`{"A": (m, m), "B": (m_y, m)}` with `U = I - gamma sigma(A)` and `W = B U^{-1}`.

Modules (all names are re-exported here: `from deq_jax import theory; theory.<name>`):
- `closed_form`: `u_matrix`, `end_to_end`, `spectral_norm`, `u_norms`, `u_inverse_norm`, `u_inverse_norm_bound`;
- `shallow`: the square-loss optimum and spectrum from `m x m` Gram matrices (`feature_gram`, `feature_spectrum`,
  `min_norm_solution`, `shallow_optimum_square`, `square_loss_gradient`): `O(n m^2)` time, no `n x n` workspace;
- `cross_entropy`: `shallow_optimum_cross_entropy` (failure is data: `info["status"]`), `cross_entropy_gradient`;
- `rates`: the section-4 bound per step (`gd_rate_bound`, `flow_bound`) and `fit_log_linear`;
- `step_size`: `learning_rate_limit`, `preconditioner_norm_bound`, `sigma_derivative_bound` (section 12);
- `dynamics`: the induced dynamics of `W` (`delm_w_velocity`, `induced_preconditioner`, `preconditioner_matrix`,
  `parameter_gradient`) and the per-step prediction of the W-path (`predict_w_step`, `w_step_check`);
- `trust_region`: `trust_region_check` (section 5).

`sigma` is a name from `deq_jax.maps.SIGMAS` or a callable; it is a static argument of the jit-compiled cores, so
pass the same function object (not a fresh lambda per call) to reuse compilations. Array functions are pure and work
under `jit`; `fit_log_linear`, `trust_region_check` and `shallow_optimum_cross_entropy` are measurements on concrete
values and return plain Python numbers (the last with arrays). Quantities that need float64 (optima, spectra) are
computed in float64 where `jax_enable_x64` is on and warn with `PrecisionWarning` where it is off.
"""

from deq_jax.theory._common import PrecisionWarning
from deq_jax.theory.closed_form import (
    end_to_end,
    spectral_norm,
    u_inverse_norm,
    u_inverse_norm_bound,
    u_matrix,
    u_norms,
)
from deq_jax.theory.cross_entropy import (
    STATUSES,
    OptimumNotConverged,
    cross_entropy_gradient,
    shallow_optimum_cross_entropy,
)
from deq_jax.theory.dynamics import (
    delm_w_velocity,
    induced_preconditioner,
    parameter_gradient,
    preconditioner_matrix,
    predict_w_step,
    w_step_check,
)
from deq_jax.theory.rates import fit_log_linear, flow_bound, gd_rate_bound
from deq_jax.theory.shallow import (
    default_rtol,
    feature_gram,
    feature_spectrum,
    min_norm_solution,
    shallow_optimum_square,
    square_loss_gradient,
)
from deq_jax.theory.step_size import learning_rate_limit, preconditioner_norm_bound, sigma_derivative_bound
from deq_jax.theory.trust_region import trust_region_check

# grouped by module, in the API reference's order
__all__ = [
    # warnings and results
    "PrecisionWarning",
    "OptimumNotConverged",
    "STATUSES",
    # closed_form
    "u_matrix",
    "end_to_end",
    "spectral_norm",
    "u_norms",
    "u_inverse_norm",
    "u_inverse_norm_bound",
    # shallow
    "default_rtol",
    "feature_gram",
    "feature_spectrum",
    "min_norm_solution",
    "shallow_optimum_square",
    "square_loss_gradient",
    # cross_entropy
    "shallow_optimum_cross_entropy",
    "cross_entropy_gradient",
    # rates
    "gd_rate_bound",
    "flow_bound",
    "fit_log_linear",
    # step_size
    "learning_rate_limit",
    "preconditioner_norm_bound",
    "sigma_derivative_bound",
    # dynamics
    "delm_w_velocity",
    "induced_preconditioner",
    "preconditioner_matrix",
    "parameter_gradient",
    "predict_w_step",
    "w_step_check",
    # trust_region
    "trust_region_check",
]
