"""The grid: every configuration of a sweep, grouped by the static structure that fixes one compiled program.

A configuration is (data set, width, loss, model, depth, sigma, gamma, learning rate, seed). Those that share the
data set, width, loss, model, depth and sigma form one group (`GroupKey`); within a group the seed's PRNG key, the
learning rate and gamma are traced values, so a group is one program over a configuration axis. Groups whose
programs are identical up to the data's values (two data sets of equal shapes) share the compiled program
(`experiments.sweep.run`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Iterable
from typing import NamedTuple

from experiments.common import models as model_lib
from experiments.common.cli import UserError
from experiments.sweep.config import SweepConfig


class GroupKey(NamedTuple):
    """The static structure shared by one group: what fixes shapes and the traced computation."""

    dataset: str
    width: int | None  # None: the preprocessed features as they are
    loss: str
    model: str
    depth: int | None  # kinds that take the depth axis only
    sigma: str | None  # kinds that take the sigma axis only

    @property
    def label(self) -> str:
        parts = [self.dataset, "features" if self.width is None else f"m{self.width}", self.loss, self.model]
        if self.depth is not None:
            parts.append(f"depth{self.depth}")
        if self.sigma is not None:
            parts.append(self.sigma)
        return "/".join(parts)

    @property
    def slug(self) -> str:
        """A short stable name for files (the label hashed)."""
        return hashlib.sha1(repr(tuple(self)).encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One point of the grid. `config_id` is its index in `expand_grid`'s order (stable for a given config)."""

    config_id: int
    dataset: str
    width: int | None
    loss: str
    model: str
    depth: int | None
    sigma: str | None
    gamma: float | None
    learning_rate: float
    seed: int

    @property
    def group(self) -> GroupKey:
        return GroupKey(self.dataset, self.width, self.loss, self.model, self.depth, self.sigma)


def _structures(config: SweepConfig) -> list[tuple[str, int | None, str | None, float | None]]:
    """(model, depth, sigma, gamma) for every model kind and the axes it takes, in the config's order."""
    g = config.grid
    out = []
    for model in g.models:
        axes = model_lib.KINDS[model].axes
        sigmas = g.sigmas if "sigma" in axes else (None,)
        depths = g.depths if "depth" in axes else (None,)
        gammas = g.gammas if "gamma" in axes else (None,)
        out += [(model, d, s, None if gm is None else float(gm)) for d in depths for s in sigmas for gm in gammas]
    return out


def expand_grid(config: SweepConfig) -> list[Configuration]:
    """Every configuration of the sweep, seeds innermost (a setting's seeds are adjacent)."""
    missing = [m for m in config.grid.models if m not in model_lib.KINDS]
    if missing:  # a kind registered when the config was loaded and removed since
        raise UserError(f"grid.models names unregistered model kinds: {', '.join(map(repr, missing))}")
    out: list[Configuration] = []
    for ds, width, loss, (model, depth, sigma, gamma), lr, seed in itertools.product(
        [d.key for d in config.datasets],
        config.grid.widths,
        config.grid.losses,
        _structures(config),
        config.grid.learning_rates,
        config.grid.seeds,
    ):
        out.append(Configuration(len(out), ds, width, loss, model, depth, sigma, gamma, float(lr), int(seed)))
    return out


def group_configurations(configurations: Iterable[Configuration]) -> dict[GroupKey, list[Configuration]]:
    """Configurations grouped by static structure (`GroupKey`), in order of first appearance."""
    groups: dict[GroupKey, list[Configuration]] = {}
    for c in configurations:
        groups.setdefault(c.group, []).append(c)
    return groups


__all__ = ["Configuration", "GroupKey", "expand_grid", "group_configurations"]
