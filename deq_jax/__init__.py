"""deq_jax: deep equilibrium models in JAX, built around the deep equilibrium linear model (DELM).

    from deq_jax import DELM, solve, DELMMap
    model = DELM(width=64, out_dim=10, gamma=0.8)          # transposed formulation, direct solve by default
    params = model.init(jax.random.PRNGKey(0))
    predictions, stats = model.apply(params, phi)           # stats: iterations, residual, converged
"""

from deq_jax.losses import LOSSES, cross_entropy, get_loss, logistic, square
from deq_jax.maps import (SIGMAS, DELMMap, DELMTransposedMap, TanhMap, column_softmax, features, get_sigma,
                          random_projection, row_softmax, scaled_tanh)
from deq_jax.models import DELM, DeepLinear, Linear
from deq_jax.solve import (BACKWARDS, LINEAR_SOLVERS, SOLVERS, Anderson, BackwardStats, Broyden, Direct, FixedPoint,
                           Implicit, OneStep, Solution, SolveStats, Unrolled, solve, value_and_grad)
from deq_jax.train import (NonConvergenceError, NonConvergenceWarning, check_converged, full_batch_gd, make_step,
                           minibatch_train, objective)

__version__ = "0.1.0"
