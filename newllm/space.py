"""Search spaces: a YAML file -> validated Optuna distributions, fixed settings and data options.

Schema (every key optional except ``params``)::

    num_trials: 8                      # trials to run (the CLI's --num-trials overrides)
    repeats: 1                         # runs (seeds) per trial, its replicates (--repeats overrides)
    objectives: [val_ppl]              # or [val_ppl, num_params]: multi-objective, all minimised
    params:                            # searched TrainConfig fields
      context_dim: {type: categorical, choices: [16, 32, 64]}
      num_layers:  {type: int, low: 1, high: 4}              # step: 1 by default
      dist_reg_weight: {type: float, low: 0.0, high: 0.8}
      phase1_lr_warmup: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    fixed:                             # TrainConfig fields held constant
      phase2_epochs: 5
    data:                              # DataConfig defaults for this space (CLI flags override)
      num_samples: 40
      vocab_size: 500

A key may be searched or fixed, not both. ``hidden_dim``, when neither searched nor fixed, is
``context_dim + embed_dim`` in every trial, as the residual architecture requires. Every
combination of the ranges' ends is checked against TrainConfig before a search starts, so a
dimension combination the model rejects fails up front.
"""

from __future__ import annotations

import itertools
import json
import typing
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import optuna.distributions as od
import yaml

from newllm.config import TrainConfig, field_types
from newllm.data import DataConfig

OBJECTIVES = {"val_ppl": "objective", "num_params": "num_params"}
TOP_KEYS = {"num_trials", "repeats", "objectives", "params", "fixed", "data"}
DIST_KEYS = {"int": {"type", "low", "high", "step", "log"}, "float": {"type", "low", "high", "step", "log"},
             "categorical": {"type", "choices"}}
DATA_KEYS = {f.name for f in fields(DataConfig)} - {"cache_dir"}
MAX_CORNERS = 4096
# the top-level search_spaces/ directory, installed as this package (see pyproject.toml)
BUILTIN_SPACES = "newllm.search_spaces"
# what an experiment directory keeps of its space: the space as loaded (after the command line's
# seed and data options), and its searched distributions in Optuna's JSON form
SPACE_FILE = "space.yaml"
DISTRIBUTIONS_FILE = "distributions.json"


class SpaceError(ValueError):
    """A search space that cannot be run; the message names the file and the problem."""


@dataclass(frozen=True)
class SearchSpace:
    path: str
    params: dict[str, od.BaseDistribution]
    fixed: dict[str, object]
    data: dict[str, object]
    objectives: list[str]
    num_trials: int
    repeats: int = 1  # runs of each sampled configuration, with seeds seed, seed + 1, ...

    def trial_config(self, sampled: dict) -> TrainConfig:
        """The full TrainConfig of a trial from its sampled values."""
        values = {**self.fixed, **sampled}
        if "hidden_dim" not in values:
            values["hidden_dim"] = values.get("context_dim", TrainConfig.context_dim) + \
                values.get("embed_dim", TrainConfig.embed_dim)
        return TrainConfig(**values)

    @property
    def metrics(self) -> list[str]:
        """Names of the reported metrics that Optuna minimises."""
        return [OBJECTIVES[o] for o in self.objectives]

    def to_yaml(self) -> str:
        """This space as a space file: ``parse_space`` of it gives the same space back."""
        return yaml.safe_dump({"num_trials": self.num_trials, "repeats": self.repeats, "objectives": self.objectives,
                               "params": {name: _spec(d) for name, d in self.params.items()},
                               "fixed": self.fixed, "data": self.data}, sort_keys=False, default_flow_style=None)


def builtin_spaces() -> list[str]:
    """Names of the search spaces that ship with newllm (the files in search_spaces/)."""
    return sorted(f.name.removesuffix(".yaml") for f in resources.files(BUILTIN_SPACES).iterdir()
                  if f.name.endswith(".yaml"))


def resolve_space(name: str) -> str:
    """The file that ``--space name`` means: an existing path as given, else the built-in space
    ``name`` ("laptop" or "laptop.yaml"), read from the installed package so that it works from
    a wheel as from the checkout. Any other name comes back unchanged for load_space to report."""
    if Path(name).exists():
        return name
    stem = name.removesuffix(".yaml")
    if stem in builtin_spaces():
        return str(resources.files(BUILTIN_SPACES) / f"{stem}.yaml")  # a real file: packages install as files
    return name


def _is(value, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _data_types() -> dict[str, tuple[type, ...]]:
    """DataConfig field -> the Python types its value may have (NoneType where optional)."""
    hints = typing.get_type_hints(DataConfig)
    return {name: typing.get_args(hints[name]) or (hints[name],) for name in DATA_KEYS}


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line (its own text spans several, quoting the source)."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return " ".join(str(e).split())
    return f"{', '.join(filter(None, [e.context, e.problem]))} (line {mark.line + 1}, column {mark.column + 1})"


def _distribution(name: str, spec, kind: type, where: str) -> od.BaseDistribution:
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) or spec["type"] not in DIST_KEYS:
        raise SpaceError(f"{where}: params.{name} must be a mapping with type: int, float or categorical")
    unknown = set(spec) - DIST_KEYS[spec["type"]]
    if unknown:
        raise SpaceError(f"{where}: params.{name} has unknown keys {sorted(unknown, key=str)}; "
                         f"a {spec['type']} takes {sorted(DIST_KEYS[spec['type']])}")
    if spec["type"] == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: params.{name}.choices must be a non-empty list")
        bad = [c for c in choices if not _is(c, kind)]
        if bad:
            raise SpaceError(f"{where}: params.{name} choices {bad} are not of type {kind.__name__}")
        return od.CategoricalDistribution(choices)
    if kind is not {"int": int, "float": float}[spec["type"]]:
        raise SpaceError(f"{where}: params.{name} is a {kind.__name__} setting; "
                         f"use type: {'categorical' if kind in (bool, str) else kind.__name__}")
    low, high, log = spec.get("low"), spec.get("high"), spec.get("log", False)
    if not (_is(low, kind) and _is(high, kind)):
        raise SpaceError(f"{where}: params.{name} needs numeric low and high of type {kind.__name__}, "
                         f"got low={low!r}, high={high!r}")
    if low >= high:
        raise SpaceError(f"{where}: params.{name} has an empty or inverted range: low={low} >= high={high}")
    if not isinstance(log, bool):
        raise SpaceError(f"{where}: params.{name}.log must be true or false")
    if log and low <= 0:
        raise SpaceError(f"{where}: params.{name} is log-scaled, so low must be > 0, got {low}")
    step = spec.get("step")
    if step is not None and (log or not _is(step, kind) or step <= 0):
        raise SpaceError(f"{where}: params.{name}.step must be a positive {kind.__name__} and cannot go with log")
    if kind is int:
        return od.IntDistribution(low, high, log=log, step=step or 1)
    return od.FloatDistribution(float(low), float(high), log=log, step=step)


def _spec(d: od.BaseDistribution) -> dict:
    """The schema's mapping for an Optuna distribution (the inverse of ``_distribution``)."""
    if isinstance(d, od.CategoricalDistribution):
        return {"type": "categorical", "choices": list(d.choices)}
    spec = {"type": "int" if isinstance(d, od.IntDistribution) else "float", "low": d.low, "high": d.high}
    if d.log:
        spec["log"] = True
    elif d.step not in (None, 1) or (isinstance(d, od.FloatDistribution) and d.step is not None):
        spec["step"] = d.step
    return spec


def _ends(d: od.BaseDistribution) -> list:
    if isinstance(d, od.CategoricalDistribution):
        return list(d.choices)
    return [d.low, d.high]


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space file; raise SpaceError naming any problem."""
    where = str(path)
    p = Path(path)
    if not p.is_file():
        raise SpaceError(f"search space {where!r} {'is a directory' if p.is_dir() else 'does not exist'}: give a "
                         f"YAML file or a built-in space ({', '.join(builtin_spaces())}; files in search_spaces/)")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise SpaceError(f"{where}: cannot read: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise SpaceError(f"{where}: not a YAML text file: not UTF-8 ({e.reason} at byte {e.start})") from e
    return parse_space(text, where)


def parse_space(text: str, where: str) -> SearchSpace:
    """Validate the search space in YAML ``text``, read from ``where`` (named in errors)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpaceError(f"{where}: not valid YAML: {_yaml_problem(e)}") from e
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: must be a YAML mapping with at least a 'params' key")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise SpaceError(f"{where}: unknown top-level keys {sorted(unknown, key=str)}; allowed: {sorted(TOP_KEYS)}")
    types = field_types()
    params_raw, fixed = raw.get("params"), raw.get("fixed") or {}
    if not isinstance(params_raw, dict) or not params_raw:
        raise SpaceError(f"{where}: 'params' must map at least one TrainConfig field to a distribution")
    if not isinstance(fixed, dict):
        raise SpaceError(f"{where}: 'fixed' must be a mapping of TrainConfig fields to values")
    for section, keys in (("params", params_raw), ("fixed", fixed)):
        unknown = set(keys) - set(types)
        if unknown:
            raise SpaceError(f"{where}: {section} has unknown settings {sorted(unknown, key=str)}; "
                             f"settings are the TrainConfig fields ({', '.join(types)})")
    both = set(params_raw) & set(fixed)
    if both:
        raise SpaceError(f"{where}: {sorted(both)} are both searched and fixed; keep one")
    for name, value in fixed.items():
        if not _is(value, types[name]):
            raise SpaceError(f"{where}: fixed.{name} must be of type {types[name].__name__}, got {value!r}")
    if fixed.get("skip_phase2"):
        raise SpaceError(f"{where}: fixed.skip_phase2 leaves trials without the Phase 2 objective; remove it")
    params = {name: _distribution(name, spec, types[name], where) for name, spec in params_raw.items()}

    objectives = raw.get("objectives", ["val_ppl"])
    if isinstance(objectives, str):
        objectives = [objectives]
    if not isinstance(objectives, list) or not objectives \
            or not all(isinstance(o, str) and o in OBJECTIVES for o in objectives) \
            or len(set(objectives)) != len(objectives):
        raise SpaceError(f"{where}: objectives must be a list drawn from {sorted(OBJECTIVES)}, got {objectives!r}")
    num_trials, repeats = raw.get("num_trials", 8), raw.get("repeats", 1)
    for name, value in (("num_trials", num_trials), ("repeats", repeats)):
        if not _is(value, int) or value < 1:
            raise SpaceError(f"{where}: {name} must be an integer >= 1, got {value!r}")
    data = raw.get("data") or {}
    if not isinstance(data, dict) or set(data) - DATA_KEYS:
        raise SpaceError(f"{where}: data must be a mapping with keys from {sorted(DATA_KEYS)}")
    data_types = _data_types()
    for name, value in data.items():
        kinds = data_types[name]
        if not any(value is None if kind is type(None) else _is(value, kind) for kind in kinds):
            names = " or ".join("None" if kind is type(None) else kind.__name__ for kind in kinds)
            raise SpaceError(f"{where}: data.{name} must be of type {names}, got {value!r}")
    try:
        DataConfig(**data)
    except (TypeError, ValueError) as e:
        raise SpaceError(f"{where}: data: {e}") from e

    space = SearchSpace(where, params, fixed, data, objectives, num_trials, repeats)
    corners = list(itertools.product(*(_ends(d) for d in params.values())))
    for values in corners[:MAX_CORNERS]:
        sampled = dict(zip(params, values))
        try:
            space.trial_config(sampled)
        except (TypeError, ValueError) as e:
            raise SpaceError(f"{where}: the trial {sampled} would be invalid: {e}") from e
    return space


def record_space(experiment: str, space: SearchSpace) -> None:
    """Keep ``space`` in the experiment directory, so that ``--resume`` and the analysis never
    depend on the space file's current copy."""
    from newllm.results import write_file

    header = f"# the search space of this experiment, as loaded from {space.path}\n"
    write_file(f"{experiment}/{SPACE_FILE}", (header + space.to_yaml()).encode())
    distributions = {name: json.loads(od.distribution_to_json(d)) for name, d in space.params.items()}
    write_file(f"{experiment}/{DISTRIBUTIONS_FILE}", json.dumps(distributions, indent=1).encode())


def recorded_space(experiment: str) -> SearchSpace | None:
    """The space kept in the experiment directory; None for an experiment of an earlier newllm."""
    from newllm.results import read_file

    text = read_file(f"{experiment}/{SPACE_FILE}")
    return None if text is None else parse_space(text.decode(), f"{experiment}/{SPACE_FILE}")


def recorded_distributions(experiment: str) -> dict[str, od.BaseDistribution] | None:
    """The searched distributions kept in the experiment directory, None if it has none."""
    from newllm.results import read_file

    data = read_file(f"{experiment}/{DISTRIBUTIONS_FILE}")
    if data is None:
        return None
    return {name: od.json_to_distribution(json.dumps(d)) for name, d in json.loads(data).items()}
