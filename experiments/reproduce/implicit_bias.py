"""Experiment 3: implicit bias, where the square loss has many minimisers (docs/theory.md section 6).

For each seed, `n_train < m` training samples are drawn from the training features, so `phi` (n x m) has a
null space and every `W = W_mn + V (I - P_row)` interpolates (`W_mn` = the minimum-norm solution,
`deq_jax.theory.min_norm_solution`; `P_row` = the projector on phi's row space). Every model trains by full-batch GD
from its seeded init until its training loss first falls to `target_loss` (matched training loss); at that step:
test loss and accuracy on the whole test split, the distance of W from `W_mn`, and W's null-space component
`|W (I - P_row)|`, which the data do not determine and which is exactly where the models differ. Two mechanisms are
checked: linear GD never changes that component (its gradient's rows lie in phi's row space), while the DELM moves W
by `-eta P_t(G_t)` (checked at every step on the update training applied), whose preconditioner P reaches into the
null space: that is where its different minimiser comes from.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from deq_jax import theory
from experiments.reproduce import compiling, dynamics
from experiments.reproduce.common import (
    Claim,
    Context,
    Features,
    build_models,
    checked,
    dtype_of,
    finite_max,
    fold,
    heldout_metrics,
    slug,
    spectrum_of,
)
from experiments.reproduce.config import ConfigError, ReproduceConfig
from experiments.reproduce.runs import RunSpec, Trace, run_gd

NAME = "implicit_bias"


@dataclasses.dataclass
class BiasRun:
    seed: int
    model: str
    reached: bool
    step: int
    train_loss: float
    learning_rate: float
    test: dict
    distance_to_min_norm: float
    null_space_norm: float
    null_space_change: float
    norm: float
    loss_history: np.ndarray
    velocity_error: np.ndarray | None = None  # DELM: per step, up to the stop


@dataclasses.dataclass
class BiasReference:
    seed: int
    rank: int
    learning_rate: float
    lambda_max: float
    lambda_min_plus: float
    test: dict
    norm: float


@dataclasses.dataclass
class ImplicitBiasResult:
    runs: list
    references: list
    table: list
    claims: list
    n_train: int
    width: int
    target_loss: float
    seeds: list
    features: Any
    pca_dim: Any
    normalize_rows: bool
    title: str = "Implicit bias"

    def metric_rows(self) -> Iterator[dict]:
        for r in self.runs:
            for t, value in enumerate(r.loss_history):
                yield {
                    "experiment": NAME,
                    "run": f"{NAME}/seed{r.seed}/{r.model}",
                    "loss_fn": "square",
                    "model": r.model,
                    "seed": r.seed,
                    "step": t,
                    "loss": value,
                }


def _capture_at(target: float):
    def stop(history: dict, chunk: dict, start: int):
        below = np.flatnonzero(np.asarray(chunk["loss"]) <= target)
        if below.size == 0:
            return None
        i = int(below[0])
        return {"W": np.asarray(chunk["W"][i]), "step": np.asarray(start + i), "loss": np.asarray(chunk["loss"][i])}

    return stop


def null_projector(phi: np.ndarray) -> np.ndarray:
    """`I - P_row`: the orthogonal projector onto the null space of `phi` (numpy's rank cutoff, as theory's)."""
    _, s, Vt = np.linalg.svd(phi, full_matrices=True)
    rank = int(np.sum(s > max(phi.shape) * np.finfo(phi.dtype).eps * s[0]))
    V0 = Vt[rank:].T
    return V0 @ V0.T


def _model_config(cfg: ReproduceConfig):
    ib, mc = cfg.implicit_bias, cfg.model
    return dataclasses.replace(
        mc, init_scale=ib.init_scale or mc.init_scale, deep_init_gain=ib.deep_init_gain or mc.deep_init_gain
    )


@dataclasses.dataclass
class BiasPlan:
    feats: Features
    runs: list  # [(label, RunSpec)]
    measured: list | None = None  # per seed, `_measure` started by `prepare`


def plan(cfg: ReproduceConfig, ctx: Context) -> BiasPlan:
    ib = cfg.implicit_bias
    feats = ctx.features_for(ib.features, ib.pca_dim, ib.normalize_rows, section="implicit_bias")
    N, m = feats.phi_train.shape
    if ib.n_train > N:
        raise ConfigError(
            f"implicit_bias.n_train ({ib.n_train}) exceeds the {N} training samples of the data "
            f"(data.n_train); lower it"
        )
    dtype = dtype_of(cfg.dtype)
    runs = []
    for label, model in build_models(ib.models, m, feats.num_classes, _model_config(cfg)):
        is_delm = label == "DELM"
        runs.append(
            (
                label,
                RunSpec(
                    model,
                    "square",
                    ib.chunk,
                    ib.n_train,
                    dtype,
                    Trace(W_every_step=True, checks="velocity" if is_delm else None),
                    mutation=cfg.mutation if is_delm else None,
                    fast_compile=cfg.fast_compile,
                ),
            )
        )
    return BiasPlan(feats, runs)


def programs(p: BiasPlan) -> list[RunSpec]:
    return [spec for _, spec in p.runs]


def _measure(cfg: ReproduceConfig, p: BiasPlan, seed: int) -> tuple:
    """One seed's training subset and what its runs need before they start: the minimum-norm interpolant, the
    null-space projector, the spectrum, the initial parameters and the step size."""
    ib, feats, dtype = cfg.implicit_bias, p.feats, dtype_of(cfg.dtype)
    N, m = feats.phi_train.shape
    idx = np.sort(np.random.default_rng([cfg.seed, 4, seed]).choice(N, ib.n_train, replace=False))
    phi, Y = feats.phi_train[idx], feats.Y_train[idx]
    W_mn = np.asarray(theory.min_norm_solution(jnp.asarray(phi), jnp.asarray(Y)))
    null = null_projector(phi)
    if np.trace(null) < 0.5:
        raise ConfigError(
            f"implicit_bias.n_train ({ib.n_train}) gives training features of full column rank "
            f"{m} (seed {seed}): a unique minimiser, no implicit bias to measure; use n_train < {m}"
        )
    spectrum = spectrum_of(phi)
    delm_spec = next((spec for label, spec in p.runs if label == "DELM"), None)
    inits = {label: spec.model.init(fold(cfg.seed, 4, seed), dtype) for label, spec in p.runs}
    if delm_spec is not None:
        curvature = dynamics.curvature_operator("square", np.asarray(theory.feature_gram(jnp.asarray(phi))))
        lr, _ = dynamics.learning_rate(ib.learning_rate, delm_spec.model, inits["DELM"], curvature)
    else:  # no DELM: the rule with P = I
        lr = (
            ib.learning_rate.value
            if ib.learning_rate.rule == "fixed"
            else ib.learning_rate.scale / spectrum["lambda_max"]
        )
    return idx, W_mn, null, spectrum, inits, lr


def prepare(cfg: ReproduceConfig, ctx: Context, p: BiasPlan) -> None:
    """Start every seed's `_measure` in the background, so that they overlap the training runs before them."""
    p.measured = [compiling.background(functools.partial(_measure, cfg, p, seed)) for seed in cfg.implicit_bias.seeds]


def run(cfg: ReproduceConfig, ctx: Context, p: BiasPlan) -> ImplicitBiasResult:
    ib = cfg.implicit_bias
    feats = p.feats
    m = feats.phi_train.shape[1]
    runs, references = [], []
    for seed, job in zip(ib.seeds, p.measured or [None] * len(ib.seeds), strict=True):
        idx, W_mn, null, spectrum, inits, lr = compiling.wait(job) if job is not None else _measure(cfg, p, seed)
        phi, Y = feats.phi_train[idx], feats.Y_train[idx]
        rank = spectrum["rank"]
        mn_norm = np.linalg.norm(W_mn)
        references.append(
            BiasReference(
                seed=seed,
                rank=rank,
                learning_rate=lr,
                lambda_max=spectrum["lambda_max"],
                lambda_min_plus=spectrum["lambda_min_plus"],
                test=heldout_metrics(W_mn, feats.phi_test, feats.labels_test, feats.Y_test),
                norm=float(mn_norm),
            )
        )
        for label, spec in p.runs:
            keep = ("loss", "velocity_error") if label == "DELM" else ("loss",)
            res = run_gd(
                spec,
                inits[label],
                phi,
                Y,
                learning_rate=lr,
                steps=ib.max_steps,
                stop=_capture_at(ib.target_loss),
                stop_id=("target", ib.target_loss),
                keep=keep,
                store=ctx.store,
                key=f"{NAME}/seed{seed}/{slug(label)}",
                progress=ctx.progress,
                desc=f"[3] seed {seed} {label}",
            )
            ctx.runs_total += 1
            ctx.runs_loaded += int(res.from_checkpoint)
            if res.captured is not None:
                W, step, train_loss = res.captured["W"], int(res.captured["step"]), float(res.captured["loss"])
            else:  # never reached the target: report where it ended, and the claim below fails
                W, step, train_loss = res.W_final, res.steps, float(res.history["loss"][-1])
            W0 = res.W0
            runs.append(
                BiasRun(
                    seed=seed,
                    model=label,
                    reached=res.captured is not None,
                    step=step,
                    train_loss=train_loss,
                    learning_rate=lr,
                    test=heldout_metrics(W, feats.phi_test, feats.labels_test, feats.Y_test),
                    distance_to_min_norm=float(np.linalg.norm(W - W_mn) / mn_norm),
                    null_space_norm=float(np.linalg.norm(W @ null) / mn_norm),
                    null_space_change=float(np.linalg.norm((W - W0) @ null) / np.linalg.norm(W0 @ null)),
                    norm=float(np.linalg.norm(W) / mn_norm),
                    loss_history=res.history["loss"],
                    velocity_error=res.history["velocity_error"][:step] if "velocity_error" in res.history else None,
                )
            )
    result = ImplicitBiasResult(
        runs=runs,
        references=references,
        table=_table(runs, references),
        claims=[],
        n_train=ib.n_train,
        width=m,
        target_loss=ib.target_loss,
        seeds=list(ib.seeds),
        features=feats.info.get("features"),
        pca_dim=feats.info.get("pca_dim"),
        normalize_rows=bool(feats.info.get("normalize_rows", False)),
    )
    result.claims = claims(cfg, result)
    return result


#: the confidence level of the intervals and the significance level of the paired tests
CONFIDENCE = 0.95


def _stats(values: list) -> dict:
    """Mean, sample std, min, max and the two-sided `CONFIDENCE` t-interval of the mean over the seeds (NaN bounds
    with a single seed)."""
    from scipy import stats as sps  # a dependency of the experiments (pyproject), imported where it is used

    a = np.asarray(values, dtype=np.float64)
    n = int(a.size)
    std = float(a.std(ddof=1)) if n > 1 else 0.0
    half = float(sps.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / np.sqrt(n)) if n > 1 else float("nan")
    mean = float(a.mean())
    return {
        "mean": mean,
        "std": std,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": n,
        "ci_lo": mean - half,
        "ci_hi": mean + half,
    }


def paired_test(a: list, b: list) -> dict:
    """The paired comparison of `a - b` over seeds: the mean difference with its `CONFIDENCE` t-interval, the
    paired t-test's two-sided p-value and the Wilcoxon signed-rank test's (exact for few seeds), and `significant`
    (the paired t-test's p below `1 - CONFIDENCE`). Identical samples give p = 1 (no difference to test)."""
    from scipy import stats as sps

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    out = {**_stats(list(d)), "p_t": float("nan"), "t": float("nan"), "p_wilcoxon": float("nan")}
    if d.size < 2:
        out["significant"] = False
        return out
    if np.all(d == d[0]):
        out.update(p_t=1.0 if d[0] == 0 else 0.0, p_wilcoxon=1.0 if d[0] == 0 else float("nan"))
    else:
        with warnings.catch_warnings():  # nearly equal differences: scipy warns of cancellation; the p-value stands
            warnings.simplefilter("ignore", RuntimeWarning)
            t = sps.ttest_rel(np.asarray(a, np.float64), np.asarray(b, np.float64))
            out.update(t=float(t.statistic), p_t=float(t.pvalue))
            if np.any(d != 0):
                out["p_wilcoxon"] = float(sps.wilcoxon(d).pvalue)
    out["significant"] = bool(out["p_t"] < 1 - CONFIDENCE)
    return out


def paired_words(name: str, test: dict, *, percent: bool = False, digits: int = 3) -> str:
    """One sentence saying what `paired_test` found for a metric, and whether it is significant."""
    k, unit = (100.0, " percentage points") if percent else (1.0, "")

    def f(x: float) -> str:
        return f"{x * k:+.{digits}g}"

    level = f"{100 * (1 - CONFIDENCE):g}%"
    verdict = f"significant at the {level} level" if test["significant"] else f"not significant at the {level} level"
    return (
        f"DELM - linear {name}: {f(test['mean'])}{unit} on average over {test['n']} seeds "
        f"({100 * CONFIDENCE:g}% CI [{f(test['ci_lo'])}, {f(test['ci_hi'])}]); paired t-test p = {test['p_t']:.3g}, "
        f"Wilcoxon signed-rank p = {test['p_wilcoxon']:.3g}: {verdict}."
    )


def _table(runs: list, references: list) -> list[dict]:
    rows = []
    for label in dict.fromkeys(r.model for r in runs):
        rs = [r for r in runs if r.model == label]
        rows.append(
            {
                "model": label,
                "seeds": len(rs),
                "reached": sum(r.reached for r in rs),
                "steps": _stats([r.step for r in rs]),
                "train_loss": _stats([r.train_loss for r in rs]),
                "test_loss": _stats([r.test["square_loss"] for r in rs]),
                "test_accuracy": _stats([r.test["accuracy"] for r in rs]),
                "distance_to_min_norm": _stats([r.distance_to_min_norm for r in rs]),
                "null_space_norm": _stats([r.null_space_norm for r in rs]),
            }
        )
    rows.append(
        {
            "model": "min-norm solution (reference)",
            "seeds": len(references),
            "reached": len(references),
            "steps": None,
            "train_loss": None,
            "test_loss": _stats([r.test["square_loss"] for r in references]),
            "test_accuracy": _stats([r.test["accuracy"] for r in references]),
            "distance_to_min_norm": _stats([0.0 for _ in references]),
            "null_space_norm": _stats([0.0 for _ in references]),
        }
    )
    if any(r.model == "DELM" for r in runs) and any(r.model == "linear" for r in runs):
        by = {(r.seed, r.model): r for r in runs}
        seeds = sorted({r.seed for r in runs})

        def pair(get):
            return paired_test([get(by[s, "DELM"]) for s in seeds], [get(by[s, "linear"]) for s in seeds])

        rows.append(
            {
                "model": "DELM - linear (paired by seed)",
                "seeds": len(seeds),
                "reached": None,
                "steps": None,
                "train_loss": None,
                "test_loss": pair(lambda r: r.test["square_loss"]),
                "test_accuracy": pair(lambda r: r.test["accuracy"]),
                "distance_to_min_norm": pair(lambda r: r.distance_to_min_norm),
                "null_space_norm": None,
            }
        )
    return rows


def claims(cfg: ReproduceConfig, r: ImplicitBiasResult) -> list[Claim]:
    ib, t = cfg.implicit_bias, cfg.implicit_bias.thresholds
    runs = r.runs
    out = [
        checked(
            NAME,
            f"{NAME}/matched_loss",
            "every model reaches the matched training loss in every seed (max training loss at stop)",
            ib.target_loss,
            "<=",
            lambda: (
                finite_max([x.train_loss for x in runs]),
                f"{sum(x.reached for x in runs)}/{len(runs)} runs reached it within {ib.max_steps} steps",
            ),
        )
    ]
    linear = [x for x in runs if x.model == "linear"]
    if linear:
        out.append(
            checked(
                NAME,
                f"{NAME}/linear_null_space",
                "linear GD keeps its init's null-space component (max |(W - W_0)(I - P_row)| / |W_0 (I - P_row)|)",
                t.null_space,
                "<=",
                lambda: (finite_max([x.null_space_change for x in linear]), "GD's updates lie in phi's row space"),
            )
        )
    delm = [x for x in runs if x.model == "DELM"]
    if delm:
        out.append(
            checked(
                NAME,
                f"{NAME}/delm_velocity",
                "every DELM update moves W by -eta P_t(G_t), the preconditioned step behind its bias "
                "(max_t |DW[d_t] + eta P_t(G_t)| / |eta P_t(G_t)|)",
                t.velocity,
                "<=",
                lambda: (
                    finite_max(np.concatenate([x.velocity_error for x in delm])),
                    f"{sum(len(x.velocity_error) for x in delm)} steps over {len(delm)} seeds",
                ),
                sensitive=True,
            )
        )
    return out


__all__ = ["CONFIDENCE", "NAME", "null_projector", "paired_test", "plan", "programs", "run"]
