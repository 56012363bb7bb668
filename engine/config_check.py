"""Refuse a config the harness would misread: keys it would silently ignore, values left unset,
values of the wrong type or out of range.

Hydra itself suggests ``+optimizer.rhoo=0.1`` when ``optimizer.rhoo=0.1`` names no key, and the
``+`` form then adds the typo without complaint. The config files are the one declaration of the
keys the engine reads, so any other key means the user believes a setting is in force that is not.
Each key's value is then checked against its spec (engine/schema.py: the root sections there, an
optimizer's in its entry, a schedule's and an evaluation's in their registrations), here, once,
before anything is built or written.
"""
from __future__ import annotations

import dataclasses
import difflib
from functools import cache
from pathlib import Path
from typing import Any, Mapping

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from engine.errors import HarnessError
from engine.optimizers import declared_keys, entries
from engine.resume import flatten
from engine.schedules import SCHEDULE_SCHEMAS, SCHEDULES
from engine.schema import Choice, Spec, check_values, section_specs
from model import GPTConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _yaml_keys(path: Path) -> set[str]:
    return {k for k in yaml.safe_load(path.read_text()) or {} if k != "defaults"}


# Groups whose every option declares its own keys: optimizer=NAME reads configs/optimizer/NAME.yaml.
PER_OPTION_GROUPS = ("optimizer", "schedule")


@cache
def section_keys() -> dict[str, frozenset[str]]:
    """Every key the engine reads, by section ("" is the top level), taken from the config files
    that declare them: configs/config.yaml for its own sections, the union of a group's files for
    ``data``, GPTConfig's fields for ``model``. The keys of a :data:`PER_OPTION_GROUPS` section are
    those of the chosen option's file (:func:`option_keys`)."""
    root = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())
    keys = {"": frozenset(set(root) - {"defaults", "hydra"}
                          | {"model", "data", *PER_OPTION_GROUPS})}
    keys.update({name: frozenset(value) for name, value in root.items()
                 if isinstance(value, dict) and name != "hydra"})
    keys["data"] = frozenset().union(*(_yaml_keys(f) for f in (CONFIG_DIR / "data").glob("*.yaml")))
    keys["model"] = frozenset({"preset", "init_from", *(f.name for f in dataclasses.fields(GPTConfig))})
    return keys


# What to tell a user who left a mandatory value (``???``) unset.
_MISSING_HINTS = {
    "data.source": "data=local trains on your own text: add data.source=PATH (a .txt, .jsonl or "
                   ".parquet file, or a folder of them).",
}


def _unknown(section: str, found: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    extra = sorted(set(found) - allowed)
    if not extra:
        return
    prefix = f"{section}." if section else ""
    lines = []
    for key in extra:
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        lines.append(f"{prefix}{key}={found[key]!r}{hint}")
    raise HarnessError(
        f"Unknown config key{'s' if len(extra) > 1 else ''} {', '.join(lines)}: the harness "
        f"reads no such setting, so it would be ignored. Keys of {where}: "
        f"{', '.join(sorted(allowed))}."
    )


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` as plain containers with interpolations resolved, Hydra's own node left out."""
    out = {}
    for key in cfg:
        if key == "hydra":  # present in Hydra's own compose output; not the engine's
            continue
        try:
            node = cfg[key]
            out[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) \
                else node
        except OmegaConfBaseException as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise HarnessError(f"{key}: a value cannot be resolved ({first}).") from None
    return out


def check_config(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Raise :class:`HarnessError` for a mandatory value left unset, a key nothing reads, or a
    value its spec refuses (one line naming the key, the value and what is allowed)."""
    raw = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    missing = [key for key, value in flatten(raw).items() if value == "???"]  # unresolved: "???"
    if missing:
        key = missing[0]
        raise HarnessError(f"{key} is not set. "
                           + _MISSING_HINTS.get(key, f"Add {key}=VALUE to the command line."))
    cfg = _resolved(cfg) if isinstance(cfg, DictConfig) else \
        {k: v for k, v in cfg.items() if k != "hydra"}
    sections = section_keys()
    _unknown("", cfg, sections[""], "the top level")
    groups = [section for section in [*sections, *PER_OPTION_GROUPS] if section in cfg]
    for section in groups:
        if not isinstance(cfg[section], Mapping):
            raise HarnessError(f"{section}={cfg[section]!r} must be a group of keys "
                               f"({section}.KEY=VALUE).")
    # Which option a per-option group is decides its keys: check its name first.
    options = {group: cfg[group]["name"] for group in PER_OPTION_GROUPS
               if group in cfg and "name" in cfg[group]}
    for group, name in options.items():
        check_values({"name": name}, {"name": _name_spec(group)}, prefix=f"{group}.")
    for section in groups:
        if section in options:
            _unknown(section, cfg[section], option_keys(section, options[section]),
                     f"{section}={options[section]}")
        elif section in sections:
            _unknown(section, cfg[section], sections[section], f"the {section} group")
    # Values, once every key is known to be one something reads.
    check_values(cfg, section_specs(""))
    for section in groups:
        specs = (option_specs(section, options[section]) if section in options
                 else section_specs(section))
        check_values(cfg[section], specs, prefix=f"{section}.")


def _name_spec(group: str) -> Spec:
    return Choice(*sorted(option_names(group)))


def option_names(group: str) -> frozenset[str]:
    """The registered options of a :data:`PER_OPTION_GROUPS` group."""
    return frozenset(entries() if group == "optimizer" else SCHEDULES)


def option_specs(group: str, name: str) -> dict[str, Spec]:
    """The specs of ``<group>=<name>``'s keys: ``name`` (a registered option) and those its
    registration declares (``OptimizerEntry.schema``, ``register_schedule(schema=...)``)."""
    own = entries()[name].schema if group == "optimizer" else SCHEDULE_SCHEMAS[name]
    return {"name": _name_spec(group), **own}


def option_keys(group: str, name: str) -> frozenset[str]:
    """The keys ``<group>=<name>`` declares in configs/<group>/<name>.yaml."""
    if group == "optimizer":
        return declared_keys(name)
    return frozenset(_yaml_keys(CONFIG_DIR / group / f"{name}.yaml"))
