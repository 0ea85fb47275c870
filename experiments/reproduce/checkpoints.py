"""Checkpoints keyed by what a run's numbers depend on.

`run_identity` fingerprints (with `experiments.common.io.fingerprint`, the one fingerprint) everything a training
run's numbers depend on: the compiled program (`RunSpec.identity`), the learning rate, the step budget, the stop
rule, and content digests of the data and of the initial parameters. The run's checkpoint key carries it, so a
changed threshold (judged, not computed) reuses every run, a changed setting that matters never reads a stale one,
and another run's store can be read safely (`FallbackStore`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from experiments.common.io import CheckpointStore, fingerprint


class FallbackStore(CheckpointStore):
    """A store that also reads another run's checkpoints (never writes or deletes them).

    Checkpoint keys carry the fingerprint of everything a run's numbers depend on, so a key found in another
    run's store holds exactly the numbers this run would compute: a `--mutation` run reads the honest run's
    reference and baseline runs instead of recomputing them."""

    def __init__(self, root, fallback: CheckpointStore):
        super().__init__(root)
        self.fallback = fallback

    def load(self, key: str):
        hit = super().load(key)
        return hit if hit is not None else self.fallback.load(key)


_DIGESTS: dict[int, tuple[Any, str]] = {}


def digest(*arrays: Any) -> str:
    """A content hash of arrays (shape, dtype, bytes); cached per array object (which the cache keeps alive)."""
    parts = []
    for a in arrays:
        hit = _DIGESTS.get(id(a))
        if hit is None or hit[0] is not a:
            x = np.ascontiguousarray(np.asarray(a))
            h = hashlib.sha256(f"{x.shape}{x.dtype}".encode())
            h.update(x.tobytes())
            hit = (a, h.hexdigest()[:16])
            _DIGESTS[id(a)] = hit
        parts.append(hit[1])
    return "-".join(parts)


def run_identity(
    spec: Any,
    params0: Any,
    phi: Any,
    y: Any,
    learning_rate: float,
    steps: int,
    stop_id: Any,
    keep: Sequence[str],
    snapshots: bool,
) -> str:
    """The fingerprint of everything a run's numbers depend on (and nothing else)."""
    return fingerprint(
        {
            "spec": spec.identity(),
            "learning_rate": repr(float(learning_rate)),
            "steps": int(steps),
            "stop": repr(stop_id),
            "keep": sorted(keep),
            "snapshots": bool(snapshots),
            "data": digest(*jax.tree_util.tree_leaves((phi, y))),
            "params0": digest(*jax.tree_util.tree_leaves(params0)),
        }
    )
