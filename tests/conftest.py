"""Test configuration: float64 is enabled for the whole session, so every test states its dtype explicitly."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
