"""deq_jax: deep equilibrium models in JAX, built around the deep equilibrium linear model (DELM).

    import deq_jax as dj
    sol = dj.solve(dj.TanhMap(0.9), z0, params, x, solver=dj.Anderson(), backward=dj.Implicit())
    sol.value, sol.stats.converged, dj.Result(int(sol.result)).message

    model = dj.DELM(width=64, out_dim=10, gamma=0.8)
    step = dj.make_step(model, dj.square, learning_rate=0.1)
    state = step.init(model.init(jax.random.PRNGKey(0)), phi)
    state, metrics = step.update(state, phi, y)

The public surface is this namespace, `deq_jax.minibatch` and `deq_jax.theory`; every name below is documented in
the API reference.
"""

from deq_jax import minibatch as minibatch
from deq_jax import theory as theory
from deq_jax._adjoint import Implicit as Implicit
from deq_jax._adjoint import OneStep as OneStep
from deq_jax._adjoint import Unrolled as Unrolled
from deq_jax._adjoint import value_and_grad as value_and_grad
from deq_jax._diagnose import DataError as DataError
from deq_jax._diagnose import DataWarning as DataWarning
from deq_jax._diagnose import DivergenceError as DivergenceError
from deq_jax._diagnose import DivergenceWarning as DivergenceWarning
from deq_jax._diagnose import NonConvergenceError as NonConvergenceError
from deq_jax._diagnose import NonConvergenceWarning as NonConvergenceWarning
from deq_jax._diagnose import check_converged as check_converged
from deq_jax._solution import BackwardStats as BackwardStats
from deq_jax._solution import Result as Result
from deq_jax._solution import SampleStats as SampleStats
from deq_jax._solution import Solution as Solution
from deq_jax._solution import SolveStats as SolveStats
from deq_jax._solve import solve as solve
from deq_jax._solver._base import AbstractSolver as AbstractSolver
from deq_jax._solver.anderson import Anderson as Anderson
from deq_jax._solver.broyden import Broyden as Broyden
from deq_jax._solver.direct import Direct as Direct
from deq_jax._solver.fixed_point import FixedPoint as FixedPoint
from deq_jax._solver.refine import Refine as Refine
from deq_jax._solver.relaxed import Relaxed as Relaxed
from deq_jax.aids import fixed_point_correction as fixed_point_correction
from deq_jax.aids import iterates as iterates
from deq_jax.aids import jacobian_penalty as jacobian_penalty
from deq_jax.aids import jacobian_regulariser as jacobian_regulariser
from deq_jax.aids import phantom as phantom
from deq_jax.loop import ChunkEnd as ChunkEnd
from deq_jax.loop import fit as fit
from deq_jax.losses import cross_entropy as cross_entropy
from deq_jax.losses import logistic as logistic
from deq_jax.losses import square as square
from deq_jax.maps import DELMMap as DELMMap
from deq_jax.maps import DELMTransposedMap as DELMTransposedMap
from deq_jax.maps import TanhMap as TanhMap
from deq_jax.maps import column_softmax as column_softmax
from deq_jax.maps import random_projection as random_projection
from deq_jax.maps import row_softmax as row_softmax
from deq_jax.maps import scaled_tanh as scaled_tanh
from deq_jax.minibatch import MinibatchEvent as MinibatchEvent
from deq_jax.minibatch import MinibatchResult as MinibatchResult
from deq_jax.minibatch import MinibatchState as MinibatchState
from deq_jax.minibatch import fit_minibatches as fit_minibatches
from deq_jax.models import DELM as DELM
from deq_jax.models import DeepLinear as DeepLinear
from deq_jax.models import Linear as Linear
from deq_jax.models import Model as Model
from deq_jax.models import Warm as Warm
from deq_jax.train import GramData as GramData
from deq_jax.train import TrainState as TrainState
from deq_jax.train import TrainStep as TrainStep
from deq_jax.train import full_batch_gd as full_batch_gd
from deq_jax.train import make_chunk as make_chunk
from deq_jax.train import make_step as make_step
from deq_jax.train import square_gram as square_gram

__all__ = [
    "solve",
    "Solution",
    "SampleStats",
    "SolveStats",
    "Result",
    "value_and_grad",
    "BackwardStats",
    "AbstractSolver",
    "Anderson",
    "Broyden",
    "Direct",
    "FixedPoint",
    "Refine",
    "Relaxed",
    "Implicit",
    "OneStep",
    "Unrolled",
    "DELMMap",
    "DELMTransposedMap",
    "TanhMap",
    "column_softmax",
    "row_softmax",
    "scaled_tanh",
    "random_projection",
    "square",
    "cross_entropy",
    "logistic",
    "Model",
    "Warm",
    "DELM",
    "Linear",
    "DeepLinear",
    "make_step",
    "TrainState",
    "TrainStep",
    "make_chunk",
    "fit",
    "ChunkEnd",
    "fit_minibatches",
    "MinibatchState",
    "MinibatchEvent",
    "MinibatchResult",
    "full_batch_gd",
    "GramData",
    "square_gram",
    "jacobian_penalty",
    "jacobian_regulariser",
    "phantom",
    "iterates",
    "fixed_point_correction",
    "check_converged",
    "NonConvergenceError",
    "NonConvergenceWarning",
    "DivergenceError",
    "DivergenceWarning",
    "DataError",
    "DataWarning",
    "minibatch",
    "theory",
]

__version__ = "0.1.0"
