"""Search spaces as plain dicts keyed by dotted config paths.

A space maps a dotted ``RunConfig`` path (``"optim.lr"``) to one of:

* a Ray Tune domain (``tune.loguniform(1e-4, 3e-3)``, ``tune.choice([...])``, ...);
* a constant (sent to every trial as is);
* a **branch**: a dict ``{option: sub_space}``. The path takes one of the options
  and only the chosen option's sub-space is sampled, so each fusion strategy
  carries its own parameters (``model.fusion.cfg.heads`` exists only for
  attention).

``define_by_run(space)`` turns a space into an Optuna define-by-run function for
``OptunaSearch``; every sampled config is a flat ``{dotted.path: value}`` dict that
``apply_sampled`` writes onto the base config (paths sampled inside a branch carry
the branch in their Optuna name, ``model.fusion.cfg.dim[name=gated]``, because Optuna
keeps one distribution per name). A sampled ``model.fusion.name``
resets ``model.fusion.cfg`` first (the ``heads`` of an attention preset must not
leak into a gated trial).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

from ray import tune
from ray.tune.search.sample import Categorical, Domain, Float, Integer, LogUniform

Space = dict[str, Any]

# The fusion strategies and their own parameters; ``model.fusion.cfg`` is rebuilt
# from scratch in every trial.
_FUSION_DEFAULT: Space = {
    "early": {
        "model.fusion.cfg.hidden": tune.choice([64, 128]),
        "model.fusion.cfg.out_dim": tune.choice([32, 64]),
        "model.fusion.cfg.dropout": tune.uniform(0.0, 0.3),
    },
    "late": {
        "model.fusion.cfg.weighting": tune.choice(["mean", "learned"]),
        "model.fusion.cfg.hidden": tune.choice([32, 64]),
        "model.fusion.cfg.dropout": tune.uniform(0.0, 0.3),
    },
    "gated": {
        "model.fusion.cfg.gate": tune.choice(["sigmoid", "softmax"]),
        "model.fusion.cfg.dim": tune.choice([32, 64, 128]),
        "model.fusion.cfg.dropout": tune.uniform(0.0, 0.3),
    },
    "attention": {
        "model.fusion.cfg.dim": tune.choice([32, 64]),
        "model.fusion.cfg.heads": tune.choice([2, 4]),
        "model.fusion.cfg.use_tokens": tune.choice([True, False]),
        "model.fusion.cfg.self_layers": tune.choice([0, 1]),
        "model.fusion.cfg.dropout": tune.uniform(0.0, 0.2),
    },
}

DEFAULT_SPACE: Space = {
    "optim.lr": tune.loguniform(1e-4, 3e-3),
    "optim.weight_decay": tune.loguniform(1e-6, 1e-2),
    "model.modality_dropout": tune.uniform(0.0, 0.3),
    "model.fusion.name": _FUSION_DEFAULT,
    "model.encoders.timm_image.transfer": {
        "frozen": {},
        "bn": {},
        "partial": {"model.encoders.timm_image.trainable_stages": tune.choice([1, 2])},
    },
    "model.adversary.enabled": {
        False: {},
        True: {
            "model.adversary.lambda_max": tune.loguniform(0.1, 2.0),
            "model.adversary.gamma": tune.uniform(5.0, 15.0),
        },
    },
    "model.encoders.sgl_mlp.lambda_": tune.loguniform(1e-5, 1e-2),
    "model.encoders.sgl_mlp.alpha": tune.uniform(0.0, 1.0),
}

# Tests and smoke runs: every strategy, tiny widths, the frozen (cached) backbone.
TINY_SPACE: Space = {
    "optim.lr": tune.loguniform(1e-3, 1e-2),
    "model.modality_dropout": tune.uniform(0.0, 0.2),
    "model.fusion.name": {
        "early": {"model.fusion.cfg.hidden": 16, "model.fusion.cfg.out_dim": 16},
        "late": {"model.fusion.cfg.weighting": tune.choice(["mean", "learned"])},
        "gated": {"model.fusion.cfg.dim": 16, "model.fusion.cfg.gate": "softmax"},
        "attention": {
            "model.fusion.cfg.dim": 16,
            "model.fusion.cfg.heads": 2,
            "model.fusion.cfg.use_tokens": tune.choice([True, False]),
        },
    },
    "model.encoders.timm_image.transfer": "frozen",
    "model.adversary.enabled": {False: {}, True: {"model.adversary.lambda_max": 0.5}},
    "model.encoders.sgl_mlp.lambda_": tune.loguniform(1e-4, 1e-2),
}

SPACES: dict[str, Space] = {"default": DEFAULT_SPACE, "tiny": TINY_SPACE}


def get_space(name: str) -> Space:
    """The named space (a deep copy, safe to edit)."""
    if name not in SPACES:
        raise ValueError(f"unknown search space {name!r}; known: {sorted(SPACES)}")
    return copy.deepcopy(SPACES[name])


def define_by_run(space: Space) -> Callable[[Any], dict[str, Any]]:
    """An Optuna define-by-run function for ``OptunaSearch(space=...)``.

    Domains become ``trial.suggest_*`` calls named by their path; branches suggest
    the option first and then walk only its sub-space. Constants come back as the
    returned dict, which Ray merges into the trial's config.
    """
    _check_space(space)
    # A partial of a module function, not a closure: Tune pickles the searcher with
    # the experiment state so an interrupted sweep can resume.
    return functools.partial(_walk_space, space)


def sample_config(space: Space, trial: Any) -> dict[str, Any]:
    """Every path a trial gets: suggested values plus constants (tests, dry runs)."""
    constants = _walk(trial, space)
    return {**trial.params, **constants}


def plain_paths(sampled: dict[str, Any]) -> dict[str, Any]:
    """Sampled values by config path, without the branch scope of their Optuna names.

    Optuna needs one distribution per parameter name, so a path sampled inside a
    branch is named with its branch, e.g. ``model.fusion.cfg.dim[name=gated]``.
    """
    return {key.split("[", 1)[0]: value for key, value in sampled.items()}


def apply_sampled(base: dict[str, Any], sampled: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config dict ``base`` with the sampled dotted paths written in.

    Paths into encoders the base does not configure are ignored. A sampled
    component name (a path ending in ``.name``, e.g. ``model.fusion.name``)
    clears its sibling ``cfg`` first, so a sampled strategy never inherits another
    strategy's arguments from the preset; sampled ``cfg`` fields are then written in.
    """
    out = copy.deepcopy(base)
    sampled = {p: v for p, v in plain_paths(sampled).items() if _configured(out, p)}
    for path in sampled:
        if path.endswith(".name"):
            _set(out, path[: -len(".name")] + ".cfg", {})
    for path, value in sorted(sampled.items()):
        _set(out, path, value)
    return out


def _configured(base: dict[str, Any], path: str) -> bool:
    """False for a path into an encoder the base config does not use.

    Writing ``model.encoders.timm_image.transfer`` into an image-free base would
    add an image encoder; the space's knobs of absent encoders are dropped instead.
    """
    parts = path.split(".")
    if parts[:2] != ["model", "encoders"] or len(parts) < 4:
        return True
    return parts[2] in base.get("model", {}).get("encoders", {})


def _walk_space(space: Space, trial: Any) -> dict[str, Any]:
    return _walk(trial, space)


def _walk(trial: Any, space: Space, scope: str = "") -> dict[str, Any]:
    constants: dict[str, Any] = {}
    for path, value in space.items():
        if isinstance(value, dict):
            option = trial.suggest_categorical(path + scope, list(value))
            inner = f"{scope}[{path.rsplit('.', 1)[-1]}={option}]"
            constants.update(_walk(trial, value[option], inner))
        elif isinstance(value, Domain):
            _suggest(trial, path + scope, value)
        else:
            constants[path] = value
    return constants


def _suggest(trial: Any, path: str, domain: Domain) -> Any:
    if isinstance(domain, Categorical):
        return trial.suggest_categorical(path, list(domain.categories))
    log = isinstance(domain.get_sampler(), LogUniform)
    if isinstance(domain, Integer):
        return trial.suggest_int(path, domain.lower, domain.upper - 1, log=log)
    if isinstance(domain, Float):
        return trial.suggest_float(path, domain.lower, domain.upper, log=log)
    raise ValueError(f"search space {path!r}: unsupported domain {type(domain).__name__}")


def _check_space(space: Space, seen: frozenset[str] = frozenset()) -> None:
    """Every path appears once along any branch (two owners of one path is ambiguous)."""
    twice = seen & set(space)
    if twice:
        raise ValueError(f"search space: path(s) {sorted(twice)} set twice along one branch")
    for path, value in space.items():
        if isinstance(value, dict) and not value:
            raise ValueError(f"search space: branch {path!r} has no options")
        for sub in value.values() if isinstance(value, dict) else ():
            _check_space(sub, seen | set(space))


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"sampled path {path!r}: {part!r} is not a config section")
    node[parts[-1]] = value
