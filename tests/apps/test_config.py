"""experiments.common.config: strict YAML -> dataclass validation; and the main job's config
(experiments/reproduce/config.py)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
from helpers import ROOT

from experiments.common.config import (
    ConfigError,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_yaml,
    parse_override,
    to_dict,
)
from experiments.reproduce.config import ReproduceConfig, load_config

# the main job's configs (configs/ holds other commands' configs too, e.g. sweeps)
REPRODUCE_NAMES = (
    "digits",
    "fashion_mnist",
    "fashion_mnist_full",
    "mnist",
    "kmnist",
    "cifar10",
    "cifar100",
    "svhn",
    "tiny",
)
CONFIGS = sorted(
    [ROOT / "configs" / f"{n}.yaml" for n in REPRODUCE_NAMES if (ROOT / "configs" / f"{n}.yaml").exists()]
    + list((ROOT / "configs").glob("reproduce_*.yaml"))
)


# ------------------------------------------------------------------------------------------ experiments.common.config


@dataclasses.dataclass(frozen=True)
class Inner:
    steps: int = 100
    rate: float = 0.5
    loss: Literal["square", "cross_entropy"] = "square"
    widths: tuple[int, ...] = (4, 8)
    width: int | None = None
    flag: bool = False

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"steps must be positive; got {self.steps}")


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = Inner()


def test_defaults_nesting_and_conversion():
    cfg = from_dict(Outer, {"name": "x", "inner": {"rate": 2, "widths": [1, 2, 3], "width": 7}})
    assert cfg == Outer("x", Inner(rate=2.0, widths=(1, 2, 3), width=7))
    assert isinstance(cfg.inner.rate, float) and isinstance(cfg.inner.widths, tuple)
    assert from_dict(Outer, {"name": "y"}).inner == Inner()


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (
            {"name": "x", "inner": {"stepz": 3}},
            ["unknown key 'inner.stepz'", "did you mean 'steps'", "valid keys here"],
        ),
        ({"nme": "x"}, ["unknown key 'nme'", "did you mean 'name'"]),
        (
            {"name": "x", "inner": {"loss": "sqare"}},
            ["inner.loss", "'sqare' is not a valid choice", "did you mean 'square'", "'square', 'cross_entropy'"],
        ),
        ({"name": "x", "inner": {"steps": "ten"}}, ["inner.steps", "expected an integer", "'ten'"]),
        ({"name": "x", "inner": {"steps": 2.5}}, ["inner.steps", "expected an integer"]),
        ({"name": "x", "inner": {"steps": True}}, ["inner.steps", "expected an integer"]),
        ({"name": "x", "inner": {"rate": "fast"}}, ["inner.rate", "expected a number"]),
        ({"name": "x", "inner": {"flag": "yes"}}, ["inner.flag", "expected true or false"]),
        ({"name": "x", "inner": {"widths": 4}}, ["inner.widths", "expected a list"]),
        ({"name": "x", "inner": {"widths": [1, "a"]}}, ["inner.widths[1]", "expected an integer"]),
        ({"name": "x", "inner": {"width": "w"}}, ["inner.width", "expected int or null", "'w'"]),
        ({"name": 3}, ["name", "expected a string"]),
        ({}, ["missing required key 'name'"]),
        ({"name": "x", "inner": [1]}, ["inner", "expected a mapping"]),
        ({"name": "x", "inner": {"steps": -1}}, ["inner", "steps must be positive; got -1"]),
    ],
)
def test_errors_name_the_key(data, fragments):
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_overrides():
    assert parse_override("inner.steps=200") == (["inner", "steps"], 200)
    assert parse_override("name=a=b") == (["name"], "a=b")
    assert parse_override("inner.widths=[1, 2]") == (["inner", "widths"], [1, 2])
    data = {"name": "x", "inner": {"steps": 1}}
    out = apply_overrides(data, ["inner.steps=5", "inner.loss=cross_entropy"])
    assert out == {"name": "x", "inner": {"steps": 5, "loss": "cross_entropy"}} and data["inner"]["steps"] == 1
    cfg = from_dict(Outer, {"name": "x"}, overrides=["inner.rate=0.25", "inner.width=null"])
    assert cfg.inner.rate == 0.25 and cfg.inner.width is None
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_override("inner.steps")
    with pytest.raises(ConfigError, match="'name' is not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])
    with pytest.raises(ConfigError, match=r"inner\.stepz"):
        from_dict(Outer, {"name": "x"}, overrides=["inner.stepz=1"])


def test_yaml_round_trip(tmp_path):
    cfg = from_dict(Outer, {"name": "x", "inner": {"widths": [3]}})
    assert to_dict(cfg) == {
        "name": "x",
        "inner": {"steps": 100, "rate": 0.5, "loss": "square", "widths": [3], "width": None, "flag": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert from_dict(Outer, load_yaml(path)) == cfg
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(tmp_path / "empty.yaml") == {}


# --------------------------------------------------------------------------------------------- the main job's config


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert load_config(path, ["convergence.steps=100"]).convergence.steps == 100


def test_shipped_configs_are_complete():
    """The default configs list every key (the built-in defaults of nested sections are no surprise to a reader)."""
    expected = to_dict(ReproduceConfig())
    for name in ("digits", "fashion_mnist", "fashion_mnist_full"):
        data = load_yaml(ROOT / "configs" / f"{name}.yaml")
        assert set(data) == set(expected), (name, set(data) ^ set(expected))
        for section, keys in expected.items():
            if isinstance(keys, dict):
                assert set(data[section]) == set(keys), (name, section, set(keys) ^ set(data[section]))
        for fs in data["convergence"]["feature_sets"]:
            assert set(fs) == set(expected["convergence"]["feature_sets"][0]), (name, fs)


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("model.gamma=1.5", ["model", "gamma must lie in the open interval (0, 1)", "1.5"]),
        ("model.gama=0.5", ["unknown key 'model.gama'", "did you mean 'gamma'"]),
        ("data.dataset=mnsit", ["data.dataset", "did you mean 'mnist'", "'fashion_mnist'", "'cifar100'"]),
        ("data.features=standardize", ["data", "pca_dim applies only to features 'pca_whiten'"]),
        ("data.pca_dim=null", ["data", "pca_dim must be a positive integer"]),
        ("convergence.steps=1234", ["convergence", "steps (1234) must be a multiple of chunk (50)"]),
        (
            "convergence.feature_sets=[{losses: []}]",
            ["convergence.feature_sets[0]", ("losses must list at least one entry"), "'square', 'cross_entropy'"],
        ),
        ("convergence.feature_sets=[{models: [linear]}]", ["models must include 'delm'"]),
        (
            "convergence.feature_sets=[{features: projection}]",
            [("width must be a positive integer for features 'projection'")],
        ),
        (
            "convergence.feature_sets=[{variants: [{formulation: per_sample}, {formulation: per_sample}]}]",
            ["variants must not repeat a formulation"],
        ),
        ("convergence.feature_sets=[{variants: [{solver: newton}]}]", ["solver", "'newton' is not a valid choice"]),
        ("convergence.feature_sets=[{steps: 75}]", ["feature_sets[0].steps (75) must be a multiple of chunk (50)"]),
        ("convergence.feature_sets=[]", ["feature_sets must list at least one feature set"]),
        ("convergence.learning_rate.rule=theory", ["'theory' is not a valid choice", "'measured', 'bound', 'fixed'"]),
        ("mutation=one_stepp", ["mutation", "'one_step', 'perturbed', 'wrong_sigma' or null", "'one_stepp'"]),
        ("trust_region.features=standardize", []),
        (
            "convergence.learning_rate.rule=fixed",
            ["convergence.learning_rate", "value must be set (a positive number) when rule is 'fixed'"],
        ),
        ("convergence.learning_rate.value=0.1", ["value applies only to rule 'fixed'"]),
        ("convergence.thresholds.r2=1.5", ["convergence.thresholds", "r2 must lie in the open interval (0, 1)"]),
        ("convergence.fit_lo=0.1", ["fit_lo must be below fit_hi"]),
        ("trust_region.check_every=75", ["trust_region", "check_every (75) must be a multiple of chunk (50)"]),
        ("trust_region.a_scales=[1.0, 1.0]", ["a_scales must not repeat entries"]),
        ("implicit_bias.seeds=[]", ["implicit_bias", "seeds must list at least one entry"]),
        ("implicit_bias.init_scale=-1", ["implicit_bias", "init_scale must be a positive number"]),
        ("model.depths=[1]", ["model", "depths must be distinct integers >= 2"]),
        ("dtype=float16", ["dtype", "'float16' is not a valid choice", "'float64', 'float32'"]),
        ("name=a/b", ["name must be a non-empty file name"]),
        ("convergence.enabled=false", []),
    ],
)
def test_reproduce_config_errors(override, fragments):
    if not fragments:  # a valid override, for contrast
        load_config(ROOT / "configs" / "tiny.yaml", [override])
        return
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "tiny.yaml", [override])
    for fragment in fragments:
        assert fragment in str(info.value)


def test_all_experiments_disabled_is_an_error():
    with pytest.raises(ConfigError, match="at least one of"):
        load_config(None, ["convergence.enabled=false", "trust_region.enabled=false", "implicit_bias.enabled=false"])


def test_learning_rate_rule_and_variants():
    cfg = load_config(None)
    assert cfg.convergence.learning_rate.rule == "measured" and cfg.convergence.learning_rate.scale == 1.0
    fixed = load_config(None, ["convergence.learning_rate.rule=fixed", "convergence.learning_rate.value=0.3"])
    assert fixed.convergence.learning_rate.value == 0.3
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    variants = [v for fs in tiny.convergence.feature_sets for v in fs.variants]
    assert {v.formulation for v in variants} == {"transposed", "per_sample"}  # the library's core, both forms
    assert all(v.tol <= 1e-12 for v in variants)
