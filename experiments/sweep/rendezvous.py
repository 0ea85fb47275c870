"""The processes of a `--distributed` sweep meet before `jax.distributed.initialize`, in plain Python.

Why: when a process never joins, or the coordinator cannot be reached, `jax.distributed.initialize` does not raise.
Its client ends the whole process from C++ (an absl fatal error, DEADLINE_EXCEEDED, exit status 134, a C++ stack
trace) once `initialization_timeout` has passed. So the processes first meet here, on the coordinator's own port,
before JAX's coordination service takes it: process 0 listens and waits for the other N - 1 to say hello; each
other process connects (retrying until the coordinator listens) and waits for process 0's "go". Only when all N
are present does each call `jax.distributed.initialize`. A process that is missing, a coordinator that cannot be
reached, a port that is taken, or two processes with the same id are a `UserError` (one line, exit status 2)
within `timeout_s`, and nothing was started that needs tearing down.

What stays out of reach: a process that dies between this meeting and JAX's registration (a window of well under a
second) still ends in JAX's C++ abort.
"""

from __future__ import annotations

import contextlib
import socket
import time

from experiments.common.cli import UserError

HELLO = "deq_jax-sweep-hello"
RETRY_S = 0.2


class MeetingFailed(UserError):
    """The processes of a distributed sweep did not all meet within the timeout."""


def split_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[IPv6]:PORT`) -> (host, port); a `MeetingFailed` naming --coordinator otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MeetingFailed(f"--coordinator must look like HOST:PORT (a port in 1 .. 65535); got {address!r}")
    return host.strip("[]"), int(port)


def meet(address: str, num_processes: int, process_id: int, timeout_s: float) -> None:
    """Return once all `num_processes` processes have met at `address` (process 0 listens there); `MeetingFailed`
    after `timeout_s` otherwise. One process alone has nobody to wait for."""
    host, port = split_address(address)
    if num_processes == 1:
        return
    if process_id == 0:
        _host(port, num_processes, timeout_s, address)
    else:
        _join(host, port, num_processes, process_id, timeout_s, address)


def _host(port: int, num_processes: int, timeout_s: float, address: str) -> None:
    deadline = time.monotonic() + timeout_s
    try:
        server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True, reuse_port=False)
    except (OSError, ValueError):
        try:
            server = socket.create_server(("", port))
        except OSError as err:
            raise MeetingFailed(
                f"--coordinator {address}: process 0 cannot listen on port {port} ({err.strerror or err}); "
                f"pick a free port"
            ) from None
    joined: dict[int, socket.socket] = {}
    with server, contextlib.ExitStack() as peers:
        server.settimeout(RETRY_S)
        while len(joined) < num_processes - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [str(i) for i in range(1, num_processes) if i not in joined]
                raise MeetingFailed(
                    f"--distributed: only {len(joined) + 1} of {num_processes} processes joined at {address} within "
                    f"{timeout_s:g} s (missing --process-id {', '.join(missing)}); start the same command with the "
                    f"missing --process-id, or raise --init-timeout"
                )
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            peer_id = _hello(conn, num_processes, joined, min(left, 5.0))
            if peer_id is None:
                conn.close()
            else:
                joined[peer_id] = peers.enter_context(conn)
        for conn in joined.values():  # all here: go; each closes its side first (the port's TIME_WAIT stays there)
            conn.sendall(b"go\n")
        for conn in joined.values():
            conn.settimeout(5.0)
            with contextlib.suppress(OSError):
                conn.recv(1)


def _hello(conn: socket.socket, num_processes: int, joined: dict, timeout_s: float) -> int | None:
    """The id of a process saying hello on `conn`, or None (a stranger, a mismatch: told so and dropped)."""
    conn.settimeout(timeout_s)
    try:
        words = conn.recv(256).decode("ascii", "replace").split()
    except OSError:
        return None
    if len(words) != 3 or words[0] != HELLO or not words[1].isdigit() or not words[2].isdigit():
        return None
    peer_id, peer_n = int(words[1]), int(words[2])
    problem = None
    if peer_n != num_processes:
        problem = f"process 0 has --num-processes {num_processes}, this process {peer_n}"
    elif not 0 < peer_id < num_processes:
        problem = f"--process-id must be in 1 .. {num_processes - 1} for a process other than 0; got {peer_id}"
    elif peer_id in joined:
        problem = f"another process with --process-id {peer_id} has already joined"
    if problem is not None:
        with contextlib.suppress(OSError):
            conn.sendall(f"error {problem}\n".encode())
        return None
    return peer_id


def _join(host: str, port: int, num_processes: int, process_id: int, timeout_s: float, address: str) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise MeetingFailed(
                f"--distributed: could not meet process 0 (the coordinator) at {address} within {timeout_s:g} s "
                f"({last}); start process 0 there, check --coordinator, or raise --init-timeout"
            )
        try:
            conn = socket.create_connection((host, port), timeout=min(left, 2.0))
        except OSError as err:
            last = err.strerror or str(err) or type(err).__name__
            time.sleep(min(RETRY_S, max(deadline - time.monotonic(), 0)))
            continue
        with conn:
            try:
                conn.sendall(f"{HELLO} {process_id} {num_processes}\n".encode())
                conn.settimeout(max(deadline - time.monotonic(), 0.01))
                reply = conn.recv(512).decode("ascii", "replace").strip()
            except TimeoutError:
                last = f"process 0 answered, but not all {num_processes} processes joined"
                reply = ""
            except OSError as err:
                last = err.strerror or str(err) or type(err).__name__
                reply = ""
            if reply == "go":
                return
            if reply.startswith("error "):
                raise MeetingFailed(f"--distributed: process 0 at {address} refused this process: {reply[6:]}")
            if reply:
                last = f"an unexpected answer {reply[:40]!r}"
        time.sleep(min(RETRY_S, max(deadline - time.monotonic(), 0)))


__all__ = ["MeetingFailed", "meet", "split_address"]
