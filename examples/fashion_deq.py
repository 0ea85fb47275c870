"""A nonlinear deep equilibrium classifier on the full Fashion-MNIST, trained on a CPU.

    x (28 x 28)  -> conv 3x3/2, 32 -> relu -> conv 3x3/2, 64 -> relu -> dense 3136 -> d    (the embedding h)
    z*           =  tanh(W_c z* + U h + b)       per sample, deq_jax.TanhMap(0.9, norm="spectral") + deq_jax.solve
    logits       =  z* V + c

The equilibrium is found by Anderson acceleration (`batch_axis=0`: every sample is held to the tolerance) and
differentiated by the implicit function theorem (`Implicit("forward")`: Anderson on the backward equation too, the
fastest of the four linear solvers here, see --time-backward); training is `deq_jax.fit_minibatches` (AdamW with a
cosine schedule over 6 epochs, batches of 128, float32). `norm="spectral"` makes `|W_c|_2 ~ 0.9` (the Frobenius
default would give ~0.16 at this width: a nearly shallow layer), so the layer does real work: the iterations are
printed and plotted.

    python examples/fashion_deq.py --budget-min 15         # the full run (60,000 / 10,000 images)
    python examples/fashion_deq.py --small                 # a quick check on a few hundred images (the tests run it)
    python examples/fashion_deq.py --time-backward 20      # time a step with each implicit backward linear solver

It prints each epoch's numbers, and writes `results.json` (settings, per-epoch history, final test accuracy,
wall times, machine load) and `training.png` (learning curve, forward / backward iterations, non-converged counts)
to --out. The data come from Debian's `dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist) or
--data-dir, through the experiments' loader.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this repository's deq_jax and experiments (data loader, atomic writes) as a script

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import deq_jax  # noqa: E402
from deq_jax import minibatch  # noqa: E402
from experiments.common import io  # noqa: E402
from experiments.common.datasets import load_dataset  # noqa: E402

BACKWARDS = ("forward", "bicgstab", "gmres", "normal_cg")


# ----------------------------------------------------------------------------- the model


class FashionDEQ:
    """Conv stem -> embedding h -> equilibrium z* = tanh(W_c z* + U h + b) -> linear head."""

    def __init__(self, width: int, embed: int, tol: float, backward: str, norm: str, contraction: float):
        self.width, self.embed, self.tol = width, embed, tol
        self.layer = deq_jax.TanhMap(contraction, norm=norm)
        self.backward = deq_jax.Implicit(backward)

    def init(self, key):
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        he = lambda k, shape, fan_in: jax.random.normal(k, shape) * jnp.sqrt(2.0 / fan_in)
        return {
            "conv1": he(k1, (3, 3, 1, 32), 9),
            "b1": jnp.zeros(32),
            "conv2": he(k2, (3, 3, 32, 64), 9 * 32),
            "b2": jnp.zeros(64),
            "dense": he(k3, (7 * 7 * 64, self.embed), 7 * 7 * 64) / jnp.sqrt(2.0),
            "bd": jnp.zeros(self.embed),
            "deq": self.layer.init(k4, self.width, self.embed),
            "head": jax.random.normal(k5, (self.width, 10)) / jnp.sqrt(self.width),
            "bh": jnp.zeros(10),
        }

    def embedding(self, params, x):
        conv = lambda h, w: jax.lax.conv_general_dilated(
            h, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = x.reshape(-1, 28, 28, 1)
        h = jax.nn.relu(conv(h, params["conv1"]) + params["b1"])
        h = jax.nn.relu(conv(h, params["conv2"]) + params["b2"])
        return h.reshape(h.shape[0], -1) @ params["dense"] + params["bd"]

    def solve(self, params, x):
        h = self.embedding(params, x)
        z0 = jnp.zeros((x.shape[0], self.width), h.dtype)
        sol = deq_jax.solve(
            self.layer,
            z0,
            params["deq"],
            h,
            solver="anderson",
            backward=self.backward,
            tol=self.tol,
            maxiter=100,
            batch_axis=0,
        )
        return sol, h

    def logits(self, params, x):
        sol, h = self.solve(params, x)
        return sol.value @ params["head"] + params["bh"], sol, h

    def loss(self, params, batch):
        """`(cross-entropy, metrics)`: the solve's statistics, the samples off the tolerance, batch accuracy."""
        x, labels = batch
        logits, sol, h = self.logits(params, x)
        z = jax.lax.stop_gradient(sol.value)
        fz = self.layer(z, jax.lax.stop_gradient(params["deq"]), jax.lax.stop_gradient(h))
        per_sample = jnp.linalg.norm(fz - z, axis=1) / jnp.linalg.norm(fz, axis=1)
        metrics = {
            **minibatch.solve_metrics(sol),
            "samples_not_converged": jnp.sum(per_sample > self.tol).astype(jnp.int32),
            "train_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels),
        }
        return deq_jax.cross_entropy(logits, labels), metrics

    def evaluate(self, params, batch):
        """Per-sample test numbers: correct, the solve's iterations (batch-wide) and samples off the tolerance."""
        x, labels = batch
        logits, sol, _ = self.logits(params, x)
        ones = jnp.ones(x.shape[0])
        return {
            "accuracy": (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32),
            "loss": -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0],
            "forward_iterations": ones * sol.stats.iterations,
            "not_converged": ones * jnp.logical_not(sol.stats.converged),
        }


# ----------------------------------------------------------------------------- data


def load(small: bool, data_dir: str | None):
    ds = load_dataset("fashion_mnist", data_dir=data_dir, download=False)
    x_train, y_train, x_test, y_test = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if small:
        x_train, y_train, x_test, y_test = x_train[:384], y_train[:384], x_test[:200], y_test[:200]
    mean, std = float(x_train.mean()), float(x_train.std())  # the training set's statistics only
    norm = lambda x: ((x - mean) / std).astype(np.float32)
    return (norm(x_train), y_train.astype(np.int32)), (norm(x_test), y_test.astype(np.int32))


# ----------------------------------------------------------------------------- reporting


def figure(history: list, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(epochs, [r["loss"] for r in history], "o-", label="train loss")
    ax.plot(epochs, [r["test_loss"] for r in history], "s-", label="test loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    twin = ax.twinx()
    twin.plot(epochs, [100 * r["test_accuracy"] for r in history], "^-", color="C2", label="test accuracy")
    twin.plot(epochs, [100 * r["train_accuracy"] for r in history], "v--", color="C3", label="train accuracy")
    twin.set_ylabel("accuracy (%)")
    ax.legend(loc="center left")
    twin.legend(loc="center right")
    ax.set_title("learning curve")
    ax = axes[1]
    ax.plot(epochs, [r["forward_iterations"] for r in history], "o-", label="forward (mean per step)")
    ax.plot(epochs, [r["forward_iterations_max"] for r in history], "o:", label="forward (max)")
    if any(r["backward_iterations_max"] for r in history):
        ax.plot(epochs, [r["backward_iterations"] for r in history], "s-", label="backward (mean per step)")
        ax.plot(epochs, [r["backward_iterations_max"] for r in history], "s:", label="backward (max)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("iterations")
    ax.set_title("equilibrium solves per training step")
    ax.legend()
    ax = axes[2]
    ax.plot(epochs, [r["forward_not_converged_total"] for r in history], "o-", label="steps: forward not converged")
    ax.plot(epochs, [r["samples_not_converged_total"] for r in history], "^-", label="samples: forward not converged")
    ax.plot(epochs, [r["backward_failures_total"] for r in history], "s-", label="backward failures")
    ax.set_xlabel("epoch")
    ax.set_ylabel("count per epoch")
    ax.set_title("non-converged solves")
    ax.legend()
    fig.tight_layout()
    io.save_figure(fig, path, dpi=110)
    plt.close(fig)


def time_backward(args, train) -> int:
    """Time `args.time_backward` training steps with each implicit backward linear solver (same data, same start)."""
    x, y = train
    batches = [
        (x[i : i + args.batch_size], y[i : i + args.batch_size])
        for i in range(0, 10 * args.batch_size, args.batch_size)
    ]
    results = {}
    for name in BACKWARDS:
        model = FashionDEQ(args.width, args.embed, args.tol, name, args.norm, args.contraction)
        optimizer = optax.adam(args.lr)
        step = jax.jit(minibatch.make_minibatch_step(model.loss, optimizer))
        params = model.init(jax.random.PRNGKey(args.seed))
        opt_state = optimizer.init(params)
        start = time.perf_counter()
        params, opt_state, metrics = jax.block_until_ready(step(params, opt_state, batches[0]))
        compile_s = time.perf_counter() - start
        times, its, back = [], [], []
        for k in range(args.time_backward):
            start = time.perf_counter()
            params, opt_state, metrics = jax.block_until_ready(step(params, opt_state, batches[k % len(batches)]))
            times.append(time.perf_counter() - start)
            its.append(int(metrics["forward_iterations"]))
            back.append((int(metrics["backward_iterations"]), int(metrics["backward_failures"])))
        results[name] = {
            "median_ms": 1e3 * float(np.median(times)),
            "min_ms": 1e3 * float(np.min(times)),
            "compile_s": compile_s,
            "forward_iterations": float(np.mean(its)),
            "backward_iterations": float(np.mean([b[0] for b in back])),
            "backward_failures": int(sum(b[1] for b in back)),
        }
        r = results[name]
        print(
            f"Implicit({name!r}): median {r['median_ms']:.1f} ms, min {r['min_ms']:.1f} ms per step "
            f"(compile {compile_s:.1f} s), forward iterations {r['forward_iterations']:.1f}, backward iterations "
            f"{r['backward_iterations']:.1f} (Krylov solvers report 0), backward failures {r['backward_failures']}",
            flush=True,
        )
    print(f"load average {os.getloadavg()}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--small", action="store_true", help="a quick check: 384 training and 200 test images, 2 epochs")
    add("--epochs", type=int, default=None, help="epochs (default 6; 2 with --small)")
    add("--batch-size", type=int, default=128)
    add("--width", type=int, default=128, help="the equilibrium's width m (default 128)")
    add("--embed", type=int, default=128, help="the embedding's width d (default 128)")
    add("--lr", type=float, default=2e-3, help="Adam's peak learning rate (cosine decay to 0; default 2e-3)")
    add("--weight-decay", type=float, default=1e-4)
    add("--tol", type=float, default=1e-4, help="relative tolerance of every solve, per sample (default 1e-4)")
    add("--contraction", type=float, default=0.9)
    add("--norm", choices=("spectral", "frobenius"), default="spectral", help="TanhMap's norm (default spectral)")
    add(
        "--backward",
        choices=BACKWARDS,
        default="forward",
        help="the implicit backward's linear solver (default forward: Anderson on the backward equation, measured "
        "the fastest here with --time-backward; it also counts its iterations)",
    )
    add("--seed", type=int, default=0)
    add(
        "--budget-min",
        type=float,
        default=None,
        help="stop after the epoch after which another one would end past this many minutes of training",
    )
    add("--out", default=str(ROOT / "results" / "fashion_deq"))
    add("--data-dir", default=None, help="a folder with Fashion-MNIST's IDX files (default: the apt package's)")
    add("--time-backward", type=int, default=0, metavar="STEPS", help="only time STEPS steps per backward solver")
    args = parser.parse_args(argv)
    epochs = args.epochs or (2 if args.small else 6)
    train, test = load(args.small, args.data_dir)
    if args.time_backward:
        return time_backward(args, train)

    model = FashionDEQ(args.width, args.embed, args.tol, args.backward, args.norm, args.contraction)
    steps = epochs * minibatch.steps_per_epoch(len(train[1]), args.batch_size)
    schedule = optax.cosine_decay_schedule(args.lr, steps)
    optimizer = optax.adamw(schedule, weight_decay=args.weight_decay)
    params = model.init(jax.random.PRNGKey(args.seed))
    load_before = os.getloadavg()
    started = time.perf_counter()
    print(
        f"Fashion-MNIST: {len(train[1])} train / {len(test[1])} test images; conv stem -> d={args.embed} -> "
        f"TanhMap({args.contraction}, norm={args.norm!r}) width {args.width}, Anderson tol {args.tol:g} per sample, "
        f"Implicit({args.backward!r}); adamw lr {args.lr:g} cosine, batch {args.batch_size}, {epochs} epochs; "
        f"load {load_before[0]:.1f}",
        flush=True,
    )

    def spectral_norm(event):
        event.record["W_c_spectral_norm"] = float(
            jnp.linalg.norm(model.layer.weight(event.state.params["deq"]["W"]), 2)
        )

    def report(event):
        r = event.record
        r["elapsed_s"] = time.perf_counter() - started
        print(
            f"epoch {r['epoch']:2d}: loss {r['loss']:.4f}, train acc {100 * r['train_accuracy']:.2f}%, test acc "
            f"{100 * r['test_accuracy']:.2f}%, forward iterations {r['forward_iterations']:.1f} (max "
            f"{r['forward_iterations_max']:.0f}), backward iterations {r['backward_iterations']:.1f}, not converged: "
            f"{r['forward_not_converged_total']} steps / {r['samples_not_converged_total']} samples, backward "
            f"failures {r['backward_failures_total']}, |W_c|_2 {r['W_c_spectral_norm']:.3f}, "
            f"epoch {r['wall_s']:.0f} s, total {r['elapsed_s'] / 60:.1f} min, load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        # stop when another epoch like this one would end past the budget
        return args.budget_min is not None and r["elapsed_s"] + r["wall_s"] > 60 * args.budget_min

    result = deq_jax.fit_minibatches(
        model.loss,
        optimizer,
        params,
        train,
        batch_size=args.batch_size,
        epochs=epochs,
        key=jax.random.PRNGKey(args.seed + 1),
        callbacks=[
            minibatch.evaluation(model.evaluate, test, batch_size=500),
            spectral_norm,
            report,
        ],
    )
    wall = time.perf_counter() - started
    final = result.history[-1]
    out = pathlib.Path(args.out)
    summary = {
        "test_accuracy": final["test_accuracy"],
        "epochs_run": len(result.history),
        "stopped_by_budget": result.stopped,
        "train_wall_s": wall,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "settings": {**vars(args), "epochs": epochs},
        "versions": {"jax": jax.__version__, "optax": optax.__version__, "deq_jax": deq_jax.__version__},
        "history": result.history,
    }
    io.write_json(out / "results.json", summary)
    figure(result.history, out / "training.png")
    print(
        f"test accuracy {100 * final['test_accuracy']:.2f}% after {len(result.history)} epochs, {wall / 60:.1f} min "
        f"of training (load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}); wrote {out / 'results.json'} and "
        f"{out / 'training.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
