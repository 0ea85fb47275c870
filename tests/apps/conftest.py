"""Fixtures shared by the applications' tests.

The data package's tests (test_datasets_*.py) use `isolated` for every test (`pytestmark`): no real cache, no
internet, no system copy of Fashion-MNIST; `server` serves files over HTTP from a temporary folder. The benchmark's
in-process command lines run under `x32` (x64 off, as in a user's process). The sweep's tests register a tanh DEQ
kind (`tanh_kind`) and assert that an invalid input compiles nothing (`no_compile`).
"""

from __future__ import annotations

import http.server
import pathlib
import threading
from collections import Counter
from collections.abc import Iterator

import jax
import pytest
from dataset_fakes import Server, free_port_url
from helpers import compile_events
from sweep_cases import TanhDEQ

from experiments.common import datasets as data
from experiments.common import models as sweep_models


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """Never touch the real cache, the internet or the system Fashion-MNIST copy unless a test asks.

    Any download a test does not point at its own server goes to a closed local port and fails at once.
    """
    monkeypatch.setenv("DEQ_JAX_DATA_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setenv("DEQ_JAX_DATA_BASE_URL", free_port_url())
    monkeypatch.setitem(data.SYSTEM_DATA_DIRS, "fashion_mnist", ())


@pytest.fixture
def server(tmp_path: pathlib.Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    requests: Counter = Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:  # http.server's name
            requests[self.path] += 1
            super().do_GET()

        def log_message(self, format: str, *args) -> None:  # http.server's signature
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield Server(root, f"http://127.0.0.1:{httpd.server_address[1]}/{{name}}/", requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_port_url() -> str:
    return free_port_url()


@pytest.fixture
def x32():
    """x64 off for an in-process run of the command line (a user's process runs JAX with its default, float32)."""
    with jax.enable_x64(False):
        yield


@pytest.fixture
def tanh_kind():
    sweep_models.register_model(
        "tanh_deq",
        sweep_models.ModelKind(lambda spec: TanhDEQ(spec.width, spec.out_dim, contraction=spec.gamma), axes=("gamma",)),
    )
    yield
    sweep_models.unregister_model("tanh_deq")


@pytest.fixture
def no_compile():
    events, stop = compile_events()
    yield
    stop()
    assert not events, f"{len(events)} XLA compilation(s) although the input is invalid"
