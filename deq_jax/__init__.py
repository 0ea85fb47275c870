"""deq_jax: deep equilibrium models in JAX, built around the deep equilibrium linear model (DELM).

    from deq_jax import DELM, solve, DELMMap
    model = DELM(width=64, out_dim=10, gamma=0.8)          # transposed formulation, direct solve by default
    params = model.init(jax.random.PRNGKey(0))
    predictions, stats = model.apply(params, phi)           # stats: iterations, residual, converged
"""

from deq_jax.losses import LOSSES, cross_entropy, get_loss, logistic, square
from deq_jax.maps import (SIGMAS, DELMMap, DELMTransposedMap, TanhMap, column_softmax, features, get_sigma,
                          random_projection, row_softmax, scaled_tanh)
from deq_jax.loop import ChunkEnd, FitResult, fit, stop_on_divergence
from deq_jax.models import DELM, DELM_SOLVERS, FORMULATIONS, MODELS, REFINE_FROM_WIDTH, DeepLinear, Linear, Model
from deq_jax.parallel import ParallelMap, parallel_map
from deq_jax.refine import Refine
from deq_jax.solve import (BACKWARDS, LINEAR_SOLVERS, SOLVERS, Anderson, BackwardStats, Broyden, Direct, FixedPoint,
                           Implicit, OneStep, Solution, SolveStats, Unrolled, solve, value_and_grad)
from deq_jax.train import (DivergenceError, DivergenceWarning, GramData, NonConvergenceError, NonConvergenceWarning,
                           TrainState, TrainStep, check_converged, full_batch_gd, gram_square_loss, make_chunk,
                           make_step, minibatch_train, objective, square_gram)
from deq_jax.warm import DELMWarm, ImplicitStart, StepStats, implicit_value_and_grad

__version__ = "0.1.0"
