"""Search spaces: a YAML file -> validated Optuna distributions, fixed settings and data options.

Schema (every key optional except ``params``)::

    num_trials: 8                      # trials to run (the CLI's --num-trials overrides)
    repeats: 1                         # runs (seeds) per trial, its replicates (--repeats overrides)
    objectives: [val_ppl]              # or [val_ppl, num_params]: multi-objective, all minimised
    points:                            # optional: configurations Optuna tries first, in order; a
      - {context_dim: 16}              # point may give some parameters, the sampler proposes the rest
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
    ablations: [no_phase1, no_dist_reg]  # optional: sibling trials, each New-LLM trial without one part
    baselines:                         # optional (or --baselines): standard LMs at matched sizes
      architectures: [lstm, gru, transformer]
      params:                          # searched by each architecture's own study
        phase2_lr: {type: float, low: 5.0e-4, high: 2.0e-2, log: true}
      fixed:                           # BASELINE_SETTINGS held constant
        context_window: 64

With baselines, each New-LLM trial is followed by one trial of each baseline architecture whose
``hidden_dim`` makes its non-embedding parameter count the New-LLM trial's within +-10%
(``newllm.baselines.size_for``). It takes the shared settings (``embed_dim``, ``num_layers``,
``phase2_*``, ``seed``) of that New-LLM trial, except those its own section searches or fixes; the
New-LLM ``params`` and ``fixed`` (Phase 1, gate, ``context_dim``...) mean nothing to it. Each
architecture gets as many trials as New-LLM, its learning rate (by default ``DEFAULT_BASELINE_PARAMS``)
proposed by its own Optuna study.

With ablations, each New-LLM trial is followed by one sibling trial per ablation: the same
configuration and seed with one part removed (``ABLATIONS``: ``no_phase1`` runs no Phase 1,
``no_dist_reg`` trains Phase 1 without the dist-reg loss). A sibling is a measurement, not a
proposal: no study proposes it or learns from it. Its Tune config is its parent's sampled values
with ``ablation`` (the ablation's name) and ``matched_trial_id`` (the parent's trial id);
``trial_config`` applies the ablation.

A key may be searched or fixed, not both. ``hidden_dim``, when neither searched nor fixed, is
``context_dim + embed_dim`` in every trial, as the residual architecture requires. Every
combination of the ranges' ends is checked against TrainConfig before a search starts, so a
dimension combination the model rejects fails up front.
"""

from __future__ import annotations

import itertools
import json
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

import optuna.distributions as od
import yaml

from newllm.baselines import size_for
from newllm.checks import INT_MAX, number_problem
from newllm.config import BASELINE_ARCHITECTURES, TrainConfig, family_fields, field_types, setting_problem
from newllm.data import DataConfig
from newllm.experiment import DISTRIBUTIONS_FILE, SPACE_FILE, damaged, recorded_json, recorded_text, write_file

OBJECTIVES = {"val_ppl": "objective", "num_params": "num_params"}
TOP_KEYS = {"num_trials", "repeats", "objectives", "params", "fixed", "data", "baselines", "points", "ablations"}
BASELINE_KEYS = {"architectures", "params", "fixed"}
# what a baselines section may search or fix: the baselines' settings except hidden_dim (the
# size matching sets it) and architecture (its own key)
BASELINE_SETTINGS = [k for k in family_fields("baseline") if k not in ("hidden_dim", "architecture")]
# the settings a baseline trial takes from the New-LLM trial it is sized to, unless its section sets them
INHERITED = ("embed_dim", "num_layers", "phase2_lr", "phase2_epochs", "phase2_batch_size", "phase2_bptt",
             "phase2_patience", "seed")
DEFAULT_BASELINE_PARAMS = {"phase2_lr": {"type": "float", "low": 5.0e-4, "high": 2.0e-2, "log": True}}
# the key of a baseline trial's config that names the New-LLM trial it was sized to, and of a
# sibling trial's that names the New-LLM trial it ablates (its parent)
MATCHED = "matched_trial_id"
# the key of a sibling trial's config that names its ablation
ABLATION = "ablation"
# each ablation: what a sibling trial changes in its parent's configuration (the one part removed)
ABLATIONS: dict[str, dict[str, object]] = {
    "no_phase1": {"phase1_max_iter": 0},    # no CVFP: the initial weights go straight to Phase 2
    "no_dist_reg": {"dist_reg_weight": 0.0},  # Phase 1's loss without the distribution regulariser
}
# what each ablation removes, in words
ABLATED = {"no_phase1": "Phase 1", "no_dist_reg": "dist-reg"}
DIST_KEYS = {"int": {"type", "low", "high", "step", "log"}, "float": {"type", "low", "high", "step", "log"},
             "categorical": {"type", "choices"}}
DATA_KEYS = {f.name for f in fields(DataConfig)} - {"cache_dir"}
MAX_CORNERS = 4096
# the top-level search_spaces/ directory, installed as this package (see pyproject.toml)
BUILTIN_SPACES = "newllm.search_spaces"
# what an experiment directory keeps of its space: the space as loaded (after the command line's
# seed and data options), and its searched distributions in Optuna's JSON form


class SpaceError(ValueError):
    """A search space that cannot be run; the message names the file and the problem."""


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping (which YAML does not allow)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice in one mapping, at any depth, is an
    error: SafeLoader keeps the last value silently, so a parameter written twice would run with
    a value nobody may have meant."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict = {}  # key -> the line it is first given on
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, whose keys a mapping may override
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key, which SafeLoader reports itself
                continue
            if first is not None:
                on = f"line {line}" if first == line else f"lines {first} and {line}"
                raise DuplicateKeyError(problem=f"the key {key!r} is given twice in one mapping, on {on}: keep one")
            lines[key] = line
        return super().construct_mapping(node, deep)


def default_baseline_params() -> dict[str, od.BaseDistribution]:
    """What a baseline searches when the space does not say: its learning rate."""
    types = field_types()
    return {name: _distribution(name, spec, types[name], "DEFAULT_BASELINE_PARAMS")
            for name, spec in DEFAULT_BASELINE_PARAMS.items()}


@dataclass(frozen=True)
class Baselines:
    """A space's baselines: the architectures, and what each one's own study searches and fixes."""

    architectures: tuple[str, ...] = BASELINE_ARCHITECTURES
    params: dict[str, od.BaseDistribution] = field(default_factory=default_baseline_params)
    fixed: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchSpace:
    """A search space as loaded and checked: searched distributions, fixed settings, data,
    objectives, points to try first, repeats and baselines."""
    path: str
    params: dict[str, od.BaseDistribution]
    fixed: dict[str, object]
    data: dict[str, object]
    objectives: list[str]
    num_trials: int
    repeats: int = 1  # runs of each sampled configuration, with seeds seed, seed + 1, ...
    baselines: Baselines | None = None
    points: tuple[dict, ...] = ()  # (partial) configurations to try first
    ablations: tuple[str, ...] = ()  # ABLATIONS: a sibling trial of each New-LLM trial per name

    def trial_config(self, sampled: dict) -> TrainConfig:
        """The full TrainConfig of a trial from its Tune config: a New-LLM trial's sampled values,
        a sibling's (``sibling_trial``: its parent's, with its ablation applied), or a baseline
        trial's settings (``baseline_trial``)."""
        own = {k: v for k, v in sampled.items() if k not in (MATCHED, ABLATION)}
        if sampled.get("architecture") in BASELINE_ARCHITECTURES:
            return TrainConfig(**own)
        values = {**self.fixed, **own}
        if "hidden_dim" not in values:
            values["hidden_dim"] = values.get("context_dim", TrainConfig.context_dim) + \
                values.get("embed_dim", TrainConfig.embed_dim)
        return TrainConfig(**(values | ABLATIONS.get(sampled.get(ABLATION), {})))

    @staticmethod
    def sibling_trial(ablation: str, parent_id: str, parent: dict) -> dict:
        """The Tune config of the ``ablation`` sibling of the New-LLM trial ``parent_id`` sampled as
        ``parent``: the same values (the seed among the fixed ones), naming its ablation and parent."""
        return {**parent, ABLATION: ablation, MATCHED: parent_id}

    def baseline_trial(self, architecture: str, matched: dict, sampled: dict, vocab_size: int) -> dict:
        """A baseline trial's settings: ``sampled`` by its study over the baselines' fixed values
        over the INHERITED settings of the New-LLM trial sampled as ``matched``, with the
        ``hidden_dim`` that brings its non-embedding count within 10% of that trial's. ValueError
        when no width does."""
        newllm = self.trial_config(matched)
        values = {k: getattr(newllm, k) for k in INHERITED} | self.baselines.fixed | sampled
        values["architecture"] = architecture
        sized = size_for(architecture, newllm.non_embedding_params(vocab_size), vocab_size, values["embed_dim"],
                         values["num_layers"], **{k: values.get(k, getattr(TrainConfig, k))
                                                  for k in ("context_window", "num_heads", "dropout")})
        return {**values, "hidden_dim": sized.hidden_dim}

    def check_baselines(self, vocab_size: int) -> None:
        """Size every baseline architecture to the ends of the New-LLM ranges (and its own),
        so that a size no baseline can match fails before the search starts (SpaceError)."""
        if self.baselines is None:
            return
        seen, own = set(), self.baselines.params
        for values in itertools.islice(itertools.product(*(_ends(d) for d in self.params.values())), MAX_CORNERS):
            matched = dict(zip(self.params, values))
            cfg = self.trial_config(matched)
            for arch, own_values in itertools.product(self.baselines.architectures,
                                                      itertools.product(*(_ends(d) for d in own.values()))):
                key = (arch, cfg.non_embedding_params(vocab_size), *(getattr(cfg, k) for k in INHERITED), own_values)
                if key in seen:
                    continue
                seen.add(key)
                try:
                    TrainConfig(**self.baseline_trial(arch, matched, dict(zip(own, own_values)), vocab_size))
                except (TypeError, ValueError) as e:
                    raise SpaceError(f"{self.path}: the {arch} baseline of the New-LLM trial {matched} would be "
                                     f"invalid: {e}") from e

    @property
    def metrics(self) -> list[str]:
        """Names of the reported metrics that Optuna minimises."""
        return [OBJECTIVES[o] for o in self.objectives]

    def to_yaml(self) -> str:
        """This space as a space file: ``parse_space`` of it gives the same space back."""
        space = {"num_trials": self.num_trials, "repeats": self.repeats, "objectives": self.objectives,
                 "params": {name: _spec(d) for name, d in self.params.items()}, "fixed": self.fixed, "data": self.data}
        if self.points:
            space["points"] = list(self.points)
        if self.ablations:
            space["ablations"] = list(self.ablations)
        if self.baselines is not None:
            space["baselines"] = {"architectures": list(self.baselines.architectures),
                                  "params": {n: _spec(d) for n, d in self.baselines.params.items()},
                                  "fixed": self.baselines.fixed}
        return yaml.safe_dump(space, sort_keys=False, default_flow_style=None)


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
    problem = _numbers_problem(spec)
    if problem:
        raise SpaceError(f"{where}: params.{name}.{problem}")
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


def _numbers_problem(spec: dict) -> str | None:
    """The first number of a distribution's mapping that no search can use, as "key problem"
    (``number_problem``: not finite, or an int beyond 2**31 - 1); None if there is none."""
    for key in ("low", "high", "step"):
        problem = number_problem(spec.get(key))
        if problem:
            return f"{key} {problem}"
    choices = spec.get("choices")
    for i, choice in enumerate(choices if isinstance(choices, list) else []):
        problem = number_problem(choice)
        if problem:
            return f"choices[{i}] {problem}"
    return None


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
        raw = yaml.load(text, Loader=UniqueKeyLoader)
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
    _check_fixed(fixed, types, f"{where}: fixed")
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
        if not _is(value, int) or not 1 <= value <= INT_MAX:
            raise SpaceError(f"{where}: {name} must be an integer in [1, {INT_MAX}] (2**31 - 1), got {value!r}")
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

    if any(a in BASELINE_ARCHITECTURES for a in [fixed.get("architecture"), *_choices(params.get("architecture"))]):
        raise SpaceError(f"{where}: params and fixed are New-LLM's; baselines ({', '.join(BASELINE_ARCHITECTURES)}) "
                         f"go in the baselines section, where they are sized to the New-LLM trials")
    baselines = parse_baselines(raw["baselines"], where, types) if "baselines" in raw else None
    points = parse_points(raw.get("points") or [], params, where)
    ablations = parse_ablations(raw.get("ablations", []), fixed, where)
    space = SearchSpace(where, params, fixed, data, objectives, num_trials, repeats, baselines, points, ablations)
    corners = list(itertools.product(*(_ends(d) for d in params.values())))
    for values in corners[:MAX_CORNERS]:
        for ablation in (None, *ablations):
            sampled = dict(zip(params, values)) | ({} if ablation is None else {ABLATION: ablation})
            try:
                space.trial_config(sampled)
            except (TypeError, ValueError) as e:
                raise SpaceError(f"{where}: the trial {sampled} would be invalid: {e}") from e
    return space


def parse_ablations(raw, fixed: dict, where: str) -> tuple[str, ...]:
    """The ablations section: a list of distinct names from ABLATIONS, each of which changes
    something (an ablation of a setting the space fixes at its ablated value would run the
    trial twice)."""
    if not isinstance(raw, list) or not all(isinstance(a, str) and a in ABLATIONS for a in raw) \
            or len(set(raw)) != len(raw):
        raise SpaceError(f"{where}: ablations must be a list of distinct names from {list(ABLATIONS)}, got {raw!r}")
    for ablation in raw:
        if all(fixed.get(k) == v for k, v in ABLATIONS[ablation].items()) or \
                (ablation == "no_dist_reg" and fixed.get("dist_reg") is False):
            raise SpaceError(f"{where}: the ablation {ablation} removes what the space's fixed settings already "
                             f"remove: its sibling trials would repeat their parents; drop it from ablations")
    return tuple(raw)


def _check_fixed(fixed: dict, types: dict[str, type], where: str) -> None:
    """Each fixed value of the right type, and a number a setting can take (``setting_problem``)."""
    for name, value in fixed.items():
        if not _is(value, types[name]):
            raise SpaceError(f"{where}.{name} must be of type {types[name].__name__}, got {value!r}")
        problem = setting_problem(name, value)
        if problem:
            raise SpaceError(f"{where}.{name} {problem}")


def _choices(d: od.BaseDistribution | None) -> list:
    return list(d.choices) if isinstance(d, od.CategoricalDistribution) else []


def parse_points(raw, params: dict[str, od.BaseDistribution], where: str) -> tuple[dict, ...]:
    """The points section: a list of mappings from searched parameters to values inside their ranges."""
    if not isinstance(raw, list) or not all(isinstance(p, dict) and p for p in raw):
        raise SpaceError(f"{where}: points must be a list of mappings from searched parameters to values")
    for i, point in enumerate(raw):
        for name, value in point.items():
            d = params.get(name)
            if d is None:
                raise SpaceError(f"{where}: points[{i}].{name} is not a searched parameter (params: {', '.join(params)})")
            inside = value in d.choices if isinstance(d, od.CategoricalDistribution) else \
                _is(value, float) and d.low <= value <= d.high
            if not inside:
                raise SpaceError(f"{where}: points[{i}].{name} = {value!r} is outside its distribution {_spec(d)}")
    return tuple(raw)


def parse_baselines(raw, where: str, types: dict[str, type]) -> Baselines:
    """The baselines section of a space (``None`` or ``{}``: every architecture, default params)."""
    raw = {} if raw is None or raw is True else raw
    if not isinstance(raw, dict) or set(raw) - BASELINE_KEYS:
        raise SpaceError(f"{where}: baselines must be a mapping with keys from {sorted(BASELINE_KEYS)}")
    architectures = raw.get("architectures", list(BASELINE_ARCHITECTURES))
    if not isinstance(architectures, list) or not architectures or len(set(architectures)) != len(architectures) \
            or not all(a in BASELINE_ARCHITECTURES for a in architectures):
        raise SpaceError(f"{where}: baselines.architectures must be a list drawn from {list(BASELINE_ARCHITECTURES)}, "
                         f"got {architectures!r}")
    params_raw, fixed = raw.get("params"), raw.get("fixed") or {}
    for section, keys in (("params", params_raw or {}), ("fixed", fixed)):
        if not isinstance(keys, dict):
            raise SpaceError(f"{where}: baselines.{section} must be a mapping")
        unknown = set(keys) - set(BASELINE_SETTINGS)
        if unknown:
            raise SpaceError(f"{where}: baselines.{section} has settings {sorted(unknown, key=str)} that a baseline "
                             f"cannot take; it takes {', '.join(BASELINE_SETTINGS)} (hidden_dim is matched to the "
                             f"New-LLM trial's size)")
    both = set(params_raw or {}) & set(fixed)
    if both:
        raise SpaceError(f"{where}: baselines: {sorted(both)} are both searched and fixed; keep one")
    _check_fixed(fixed, types, f"{where}: baselines.fixed")
    params = default_baseline_params() if params_raw is None else {
        name: _distribution(name, spec, types[name], f"{where}: baselines") for name, spec in params_raw.items()}
    return Baselines(tuple(architectures), params, fixed)


def record_space(experiment: str, space: SearchSpace) -> None:
    """Keep ``space`` in the experiment directory, so that ``--resume`` and the analysis never
    depend on the space file's current copy."""
    header = f"# the search space of this experiment, as loaded from {space.path}\n"
    write_file(f"{experiment}/{SPACE_FILE}", (header + space.to_yaml()).encode())
    distributions = {name: json.loads(od.distribution_to_json(d)) for name, d in space.params.items()}
    write_file(f"{experiment}/{DISTRIBUTIONS_FILE}", json.dumps(distributions, indent=1).encode())


def recorded_space(experiment: str) -> SearchSpace | None:
    """The space kept in the experiment directory; None if there is none (no search started there).
    SpaceError naming the file if it cannot be read or is not a valid space."""
    path = f"{experiment}/{SPACE_FILE}"
    try:
        text = recorded_text(path, "a resumed search then takes its space from --space")
    except ValueError as e:
        raise SpaceError(str(e)) from e
    return None if text is None else parse_space(text, path)


def recorded_distributions(experiment: str) -> dict[str, od.BaseDistribution] | None:
    """The searched distributions kept in the experiment directory, None if it has none.
    SpaceError naming the file if it is not what ``record_space`` writes."""
    path = f"{experiment}/{DISTRIBUTIONS_FILE}"
    without = "the report then infers the searched parameters from the trials"
    try:
        raw = recorded_json(path, without)
    except ValueError as e:
        raise SpaceError(str(e)) from e
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SpaceError(damaged(path, "not a mapping of parameters to Optuna distributions", without))
    distributions = {}
    for name, d in raw.items():
        try:
            distributions[name] = od.json_to_distribution(json.dumps(d))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SpaceError(damaged(path, f"not an Optuna distribution for {name!r} ({type(e).__name__}: {e})",
                                     without)) from e
        problem = _numbers_problem(_spec(distributions[name]))
        if problem:
            raise SpaceError(damaged(path, f"unusable for {name!r}: its {problem}", without))
    return distributions
