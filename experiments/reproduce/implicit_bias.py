"""Experiment 3: implicit bias, where the square loss has many minimisers (docs/theory.md section 6).

For each seed, `n_train < m` training samples are drawn from the training features, so `phi` (n x m) has a
null space and every `W = W_mn + V (I - P_row)` interpolates (`W_mn` = the minimum-norm solution,
`deq_jax.theory.min_norm_solution`; `P_row` = the projector on phi's row space). Every model trains by full-batch GD
from its seeded init until its training loss first falls to `target_loss` (matched training loss); at that step:
test loss and accuracy on the whole test split, the distance of W from `W_mn`, and W's null-space component
`|W (I - P_row)|`, which the data do not determine and which is exactly where the models differ. For the linear
model GD never changes that component (its gradient's rows lie in phi's row space): checked as a claim.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from deq_jax import theory

from experiments.reproduce.runs import ProgramSpec, run_gd
from experiments.reproduce.common import (Claim, Context, build_models, dtype_of, fold, heldout_metrics, make_features,
                                          slug)
from experiments.reproduce.config import ConfigError, ReproduceConfig

NAME = "implicit_bias"
NULL_SPACE_TOLERANCE = 1e-10  # rounding level of float64 GD over thousands of steps, with a wide margin


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
    return dataclasses.replace(mc, init_scale=ib.init_scale or mc.init_scale,
                               deep_init_gain=ib.deep_init_gain or mc.deep_init_gain)


def programs(cfg: ReproduceConfig, ctx: Context) -> list[ProgramSpec]:
    """The compiled programs `run` will use (for `gd_runs.precompile`), where the feature width is known ahead."""
    ib = cfg.implicit_bias
    if ib.features is None:
        width = ctx.features.phi_train.shape[1]
    elif ib.features == "pca_whiten":
        width = ib.pca_dim + int(cfg.data.add_bias)
    else:  # the number of non-constant pixels is known only after preprocessing
        return []
    return [ProgramSpec(model, "square", ib.chunk, False, ib.n_train, dtype_of(cfg.dtype))
            for _, model in build_models(ib.models, width, ctx.features.num_classes, _model_config(cfg))]


def run(cfg: ReproduceConfig, ctx: Context) -> dict:
    ib, mc = cfg.implicit_bias, _model_config(cfg)
    store, progress = ctx.store, ctx.progress
    if ib.features is None:
        feats = ctx.features
    else:
        try:
            feats = make_features(ctx.dataset, cfg.data, features=ib.features, pca_dim=ib.pca_dim,
                                  normalize_rows=ib.normalize_rows)
        except ValueError as err:  # e.g. pca_dim above the number of non-constant pixels
            raise ConfigError(f"implicit_bias.features / implicit_bias.pca_dim: {err}") from err
    dtype = dtype_of(cfg.dtype)
    N, m = feats.phi_train.shape
    k = feats.num_classes
    if ib.n_train > N:
        raise ConfigError(f"implicit_bias.n_train ({ib.n_train}) exceeds the {N} training samples of the data "
                          f"(data.n_train); lower it")
    runs, references = [], []
    for seed in ib.seeds:
        idx = np.sort(np.random.default_rng([cfg.seed, 4, seed]).choice(N, ib.n_train, replace=False))
        phi, Y = feats.phi_train[idx], feats.Y_train[idx]
        spec = {k_: float(v) for k_, v in theory.feature_spectrum(jnp.asarray(phi)).items()}
        lr = ib.learning_rate.resolve(mc.gamma, spec["lambda_max"])
        W_mn = np.asarray(theory.min_norm_solution(jnp.asarray(phi), jnp.asarray(Y)))
        null = null_projector(phi)
        if np.trace(null) < 0.5:
            raise ConfigError(f"implicit_bias.n_train ({ib.n_train}) gives training features of full column rank "
                              f"{m} (seed {seed}): a unique minimiser, no implicit bias to measure; use n_train < {m}")
        mn_norm = np.linalg.norm(W_mn)
        references.append({"seed": seed, "rank": int(spec["rank"]), "learning_rate": lr,
                           "lambda_max": spec["lambda_max"], "lambda_min_plus": spec["lambda_min_plus"],
                           "test": heldout_metrics(W_mn, feats.phi_test, feats.labels_test, feats.Y_test),
                           "norm": float(mn_norm)})
        for label, model in build_models(ib.models, m, k, mc):
            params0 = model.init(fold(cfg.seed, 4, seed), dtype)
            res = run_gd(model, "square", params0, phi.astype(dtype), Y.astype(dtype), learning_rate=lr,
                         steps=ib.max_steps, chunk=ib.chunk, stop=_capture_at(ib.target_loss), keep=("loss",),
                         store=store, key=f"{NAME}/seed{seed}/{slug(label)}", progress=progress,
                         desc=f"[3] seed {seed} {label}", u_norm=False)
            if res.captured is not None:
                W, step, train_loss = res.captured["W"], int(res.captured["step"]), float(res.captured["loss"])
            else:  # never reached the target: report where it ended, and the claim below fails
                W, step, train_loss = res.W_final, res.steps, float(res.history["loss"][-1])
            W0 = res.W0
            runs.append({
                "seed": seed, "model": label, "reached": res.captured is not None, "step": step,
                "train_loss": train_loss, "learning_rate": lr,
                "test": heldout_metrics(W, feats.phi_test, feats.labels_test, feats.Y_test),
                "distance_to_min_norm": float(np.linalg.norm(W - W_mn) / mn_norm),
                "null_space_norm": float(np.linalg.norm(W @ null) / mn_norm),
                "null_space_change": float(np.linalg.norm((W - W0) @ null) / np.linalg.norm(W0 @ null)),
                "norm": float(np.linalg.norm(W) / mn_norm),
                "loss_history": res.history["loss"],
            })
    return {"runs": runs, "references": references, "table": _table(runs, references),
            "claims": _claims(cfg, runs),
            "settings": {"n_train": ib.n_train, "width": m, "target_loss": ib.target_loss, "seeds": list(ib.seeds),
                         "features": feats.info.get("features"), "pca_dim": feats.info.get("pca_dim"),
                         "normalize_rows": bool(feats.info.get("normalize_rows", False))}}


def _stats(values: list) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def _table(runs: list, references: list) -> list[dict]:
    rows = []
    for label in dict.fromkeys(r["model"] for r in runs):
        rs = [r for r in runs if r["model"] == label]
        rows.append({"model": label, "seeds": len(rs), "reached": sum(r["reached"] for r in rs),
                     "steps": _stats([r["step"] for r in rs]),
                     "train_loss": _stats([r["train_loss"] for r in rs]),
                     "test_loss": _stats([r["test"]["square_loss"] for r in rs]),
                     "test_accuracy": _stats([r["test"]["accuracy"] for r in rs]),
                     "distance_to_min_norm": _stats([r["distance_to_min_norm"] for r in rs]),
                     "null_space_norm": _stats([r["null_space_norm"] for r in rs])})
    rows.append({"model": "min-norm solution (reference)", "seeds": len(references), "reached": len(references),
                 "steps": None, "train_loss": None,
                 "test_loss": _stats([r["test"]["square_loss"] for r in references]),
                 "test_accuracy": _stats([r["test"]["accuracy"] for r in references]),
                 "distance_to_min_norm": _stats([0.0 for _ in references]),
                 "null_space_norm": _stats([0.0 for _ in references])})
    if any(r["model"] == "DELM" for r in runs) and any(r["model"] == "linear" for r in runs):
        by = {(r["seed"], r["model"]): r for r in runs}
        seeds = sorted({r["seed"] for r in runs})
        diff_acc = [by[s, "DELM"]["test"]["accuracy"] - by[s, "linear"]["test"]["accuracy"] for s in seeds]
        diff_loss = [by[s, "DELM"]["test"]["square_loss"] - by[s, "linear"]["test"]["square_loss"] for s in seeds]
        rows.append({"model": "DELM - linear (paired by seed)", "seeds": len(seeds), "reached": None,
                     "steps": None, "train_loss": None, "test_loss": _stats(diff_loss),
                     "test_accuracy": _stats(diff_acc), "distance_to_min_norm": None, "null_space_norm": None})
    return rows


def _claims(cfg: ReproduceConfig, runs: list) -> list[Claim]:
    ib = cfg.implicit_bias
    out = [Claim(NAME, "every model reaches the matched training loss in every seed (max training loss at stop)",
                 max(r["train_loss"] for r in runs), ib.target_loss, "<=",
                 f"{sum(r['reached'] for r in runs)}/{len(runs)} runs reached it within {ib.max_steps} steps")]
    linear = [r for r in runs if r["model"] == "linear"]
    if linear:
        out.append(Claim(NAME, "linear GD keeps its init's null-space component (max |(W - W_0)(I - P_row)| / "
                               "|W_0 (I - P_row)|)",
                         max(r["null_space_change"] for r in linear), NULL_SPACE_TOLERANCE, "<=",
                         "GD's updates lie in phi's row space"))
    return out


__all__ = ["run", "null_projector", "NAME"]
