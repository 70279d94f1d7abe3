"""Hydra/OmegaConf helpers shared by the entry points."""

from __future__ import annotations

import importlib
import inspect
import os
import types
import typing
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

# The configs ship inside the package (package data), so a wheel install has them too.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
ASSETS_DIR = Path(__file__).resolve().parent / "data" / "assets"


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("mmllm.unset_env"):
        # True when an environment variable is unset (wandb offline unless a key is set).
        OmegaConf.register_new_resolver("mmllm.unset_env", lambda name: not os.environ.get(name))
    if not OmegaConf.has_resolver("mmllm.asset"):
        # A data file shipped in the package (mmllm/data/assets/<name>), e.g. the SFT demo set.
        OmegaConf.register_new_resolver("mmllm.asset", lambda name: str(ASSETS_DIR / name))

    if not OmegaConf.has_resolver("mmllm.or"):
        # ${mmllm.or:<value>,<default>}: the default when the value is null (oc.select only covers
        # a missing key), e.g. the tiny model's vocabulary when the data sets none.
        OmegaConf.register_new_resolver("mmllm.or", lambda value, default: default if value is None else value)
    if not OmegaConf.has_resolver("mmllm.basename"):
        # ${mmllm.basename:<path>}: its last component, e.g. the run directory's name as the run group.
        OmegaConf.register_new_resolver(
            "mmllm.basename", lambda path: None if path is None else Path(str(path)).name)


_register_resolvers()


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def to_dtype(value: "str | torch.dtype | None") -> "torch.dtype | None":
    """``"bfloat16"``/``"bf16"``/a torch dtype/None -> torch dtype or None (clear error otherwise)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        from mmllm.errors import ConfigError  # a ValueError too

        raise ConfigError(f"unknown dtype {value!r}: expected one of {sorted(DTYPES)}",
                          fix="set the dtype option to float32 (fp32), bfloat16 (bf16) or float16 (fp16)")
    return DTYPES[value]


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain Python (what runs and checkpoints record), minus Hydra's own node."""
    keys = [k for k in cfg.keys() if k != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True, throw_on_missing=False)


def save_resolved(cfg: DictConfig, path: str | Path) -> Path:
    """Writes the resolved config as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(to_container(cfg))))
    return path


def compose_config(name: str = "train", overrides: list[str] | None = None, *,
                   output_dir: str | Path | None = None, data_dir: str | Path | None = None) -> DictConfig:
    """Composes ``conf/<name>.yaml`` as the CLI would, for notebooks and tests.

    Args:
        overrides: Hydra overrides (``["debug=tiny", "model.lm.n_layers=4"]``).
        output_dir: the run directory (``paths.output_dir``; the CLI takes it from hydra.run.dir).
        data_dir: where data caches go (``paths.data_dir``).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(name, overrides=list(overrides or []), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    if output_dir is not None and "paths" in cfg:
        cfg.paths.root_dir = str(Path(output_dir).parent)
        cfg.paths.output_dir = str(output_dir)
    if data_dir is not None and "paths" in cfg:
        cfg.paths.data_dir = str(data_dir)
    return cfg


# ------------------------------------------------------------------------------- validation
# The keyword-only typed constructors are the config schema: a composed config is checked against
# the signature of every ``_target_`` before anything runs, so a wrong type or a key that no
# target takes is reported by its config key rather than as a TypeError deep in a constructor.

def check_config(cfg: DictConfig, *, choices: dict | None = None, overrides: list[str] | None = None,
                 primary: str | None = None) -> None:
    """Raises :class:`mmllm.errors.ConfigError` for a value of the wrong type or a key no target takes.

    Args:
        cfg: the composed config (interpolations unresolved are fine; they are skipped).
        choices: the config group choices (``hydra.runtime.choices``), to name which groups
            set a key that the selected target does not take.
        overrides: the command-line overrides (to tell a typo from a group conflict).
        primary: name of the primary config (``train``); its plain (non-``_target_``) keys given
            on the command line must keep the type of their default.
    """
    tree = OmegaConf.to_container(cfg, resolve=False)
    tree.pop("hydra", None)
    for path, node in _target_nodes(tree, ""):
        _check_target(path, node, choices=dict(choices or {}), overrides=list(overrides or []),
                      primary=primary)
    if primary is not None:
        _check_plain_overrides(tree, primary, list(overrides or []))


def _target_nodes(node, path: str):
    """``(dotted path, dict)`` of every node with a ``_target_``, depth first."""
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield path, node
        for key, value in node.items():
            yield from _target_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _target_nodes(value, f"{path}[{i}]")


def _signature(target: str):
    """``(parameters, type hints, takes **kwargs)`` of a ``_target_``, or None if unknown."""
    mod, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(mod), name)
        sig = inspect.signature(obj)
    except Exception:  # noqa: BLE001 - Hydra reports an unimportable target itself
        return None
    try:
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # noqa: BLE001 - unresolvable annotations: check names only
        hints = {}
    kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return sig.parameters, hints, kwargs


def _is_placeholder(value) -> bool:
    return isinstance(value, str) and (value == "???" or "${" in value)


def _check_target(path: str, node: dict, *, choices: dict, overrides: list[str],
                  primary: str | None) -> None:
    from mmllm.errors import ConfigError

    found = _signature(node["_target_"])
    if found is None:
        return
    params, hints, takes_kwargs = found
    for key, value in node.items():
        if str(key).startswith("_"):
            continue
        full = f"{path}.{key}" if path else str(key)
        if key not in params:
            if not takes_kwargs:
                raise _unknown_key_error(full, node["_target_"], list(params), choices, overrides,
                                         primary)
            continue
        if key not in hints or _is_placeholder(value) or isinstance(value, (dict, list)):
            continue
        if _accepts(hints[key], value) is False:
            default = params[key].default
            example = "" if default is params[key].empty else f", e.g. {full}={default!r} (the default)"
            raise ConfigError(f"{full}={value!r} ({type(value).__name__}): {node['_target_']} expects "
                              f"{_type_name(hints[key])} for {key!r}",
                              fix=f"give {full} a value of type {_type_name(hints[key])}{example}")


def _accepts(annotation, value) -> bool | None:
    """Whether a YAML scalar fits ``annotation``: True, False, or None (cannot tell)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        results = [_accepts(a, value) for a in typing.get_args(annotation)]
        return True if True in results else (False if all(r is False for r in results) else None)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return None  # classes, containers, callables: Hydra may build them; not checked here


def _type_name(annotation) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _group_sets(group: str, option: str, key: str) -> bool:
    """Whether ``conf/<group>/<option>.yaml`` sets the dotted ``key`` (honours ``@package``)."""
    path = Path(CONF_DIR) / group / f"{option}.yaml"
    if not path.is_file():
        return False
    text = path.read_text()
    package = group.replace("/", ".")
    for line in text.splitlines()[:5]:
        if line.strip().startswith("# @package"):
            package = line.split("@package", 1)[1].strip()
            package = "" if package == "_global_" else package.replace("_group_", group.replace("/", "."))
    node = OmegaConf.load(path) if text.strip() else OmegaConf.create({})
    return _select(node, package, key)


def _select(node, package: str, key: str) -> bool:
    if package:
        if not key.startswith(package + "."):
            return False
        key = key[len(package) + 1:]
    found = OmegaConf.select(node, key, default="__absent__", throw_on_missing=False,
                             throw_on_resolution_failure=False)
    return not (isinstance(found, str) and found == "__absent__")


def _unknown_key_error(full: str, target: str, accepted: list[str], choices: dict, overrides: list[str],
                       primary: str | None):
    from mmllm.errors import ConfigError

    node_path, _, key = full.rpartition(".")
    owner_group = node_path.replace(".", "/")
    owner = f"{owner_group}={choices[owner_group]}" if choices.get(owner_group) else node_path or "the config"
    setters = [f"{g}={o}" for g, o in choices.items()
               if o and not g.startswith("hydra") and g != owner_group and _group_sets(g, str(o), full)]
    if primary and _group_sets("", primary, full):
        setters.insert(0, f"{primary}.yaml")
    typed = [o for o in overrides if o.lstrip("+").split("=", 1)[0] == full]
    args = ", ".join(a for a in accepted if a not in ("self", "args", "kwargs"))
    if setters and not typed:
        return ConfigError(
            f"config groups conflict: {', '.join(setters)} sets {full}, but {owner} ({target}) takes "
            f"no argument {key!r}",
            fix=", ".join([f"leave out {s}" for s in setters if "=" in s]
                          + [f"choose another {owner_group} group", f"or drop the key with ~{full}"]))
    return ConfigError(f"{full}: {target} takes no argument {key!r} (it takes: {args})",
                       fix=f"check the spelling of {key!r}, or remove {full} from the overrides/config")


def _check_plain_overrides(tree: dict, primary: str, overrides: list[str]) -> None:
    """Command-line values of plain keys of ``conf/<primary>.yaml`` keep their default's type."""
    from mmllm.errors import ConfigError

    path = Path(CONF_DIR) / f"{primary}.yaml"
    if not path.is_file():
        return
    defaults = OmegaConf.load(path)
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or key.startswith(("+", "~", "hydra")) or "/" in key:
            continue
        # The raw file is not composed: an interpolated default (run_dir: ${paths...}) stays
        # unresolved and has no type to check against.
        default = OmegaConf.select(defaults, key, default=None, throw_on_missing=False,
                                   throw_on_resolution_failure=False)
        value = OmegaConf.select(OmegaConf.create(tree), key, default=None, throw_on_missing=False,
                                 throw_on_resolution_failure=False)
        fits = _accepts(type(default), value) if isinstance(default, (bool, int, float)) else None
        if value is not None and fits is False:
            raise ConfigError(f"{key}={value!r} ({type(value).__name__}): expected "
                              f"{type(default).__name__} (the default is {default!r})",
                              fix=f"give {key} a value of type {type(default).__name__}, e.g. "
                                  f"{key}={default!r}")
