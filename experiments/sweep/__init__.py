"""Hyperparameter sweeps: `python -m experiments sweep --config configs/sweep_digits.yaml`.

A grid of data sets x widths x losses x models x learning rates x seeds becomes a few compiled programs run by the
library's parallel engine (`deq_jax.parallel`). The modules, in the order data flows:

    config.py    SweepConfig from YAML; choices read from `experiments.common.registry`, model kinds from
                 `experiments.common.models` (`register_model` adds a user's own model)
    grid.py      configurations, grouped by the static structure that fixes one program
    data.py      data sets, features per width, the optimum L*
    programs.py  one configuration's training run as a pure function, and its memory estimate
    run.py       `run_sweep`: groups through the engine, chunks saved as they finish, resume
    tables.py    results.csv / results.jsonl / aggregate.csv
    figures.py   one figure per (data set, width, loss)
    summary.py   sweep.json and summary.md
    cli.py       the command

Nothing is imported here, so that `--distributed` can start `jax.distributed` before anything touches JAX.
"""
