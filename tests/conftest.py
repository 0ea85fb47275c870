"""Test configuration.

- x64: float64 is enabled for the whole session by default, so every test states its dtype explicitly. Set
  `DEQ_JAX_TEST_X64=0` to run as users run JAX by default (x64 off, float32): tests that need float64 skip with a
  reason (`helpers.requires_x64`), the others use `helpers.DTYPE` and its tolerances. Tests marked `float32` are the
  subset CI runs in that mode:  DEQ_JAX_TEST_X64=0 pytest -m float32 tests/lib
- `slow`: the exhaustive products (e.g. every solver x backward x state) are skipped unless selected with
  `-m slow` (or any -m expression naming it) or DEQ_JAX_TEST_SLOW=1; `make test` runs their covering subsets.
- Compilation dominates the suite's time: XLA's CPU compiler is asked for cheaper code generation (the problems
  are tiny, so run time does not suffer); DEQ_JAX_TEST_FAST_COMPILE=0 restores XLA's defaults.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off")


def _jaxlib_version() -> str:
    from importlib.metadata import version  # without importing jaxlib: XLA reads XLA_FLAGS once, at start-up

    return version("jaxlib")


# measured on jaxlib 0.10 only (XLA aborts on a flag it does not know, so other versions keep the defaults)
if _flag("DEQ_JAX_TEST_FAST_COMPILE", "1") and _jaxlib_version().startswith("0.10."):
    _fast = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _fast).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

X64 = _flag("DEQ_JAX_TEST_X64", "1")
jax.config.update("jax_enable_x64", X64)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: exhaustive products; run with -m slow or DEQ_JAX_TEST_SLOW=1")
    config.addinivalue_line("markers", "float32: the subset CI also runs with x64 disabled (DEQ_JAX_TEST_X64=0)")


def pytest_collection_modifyitems(config, items):
    if _flag("DEQ_JAX_TEST_SLOW", "0") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or DEQ_JAX_TEST_SLOW=1")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)
