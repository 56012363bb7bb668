"""Refuse a config the harness would misread: keys it would silently ignore, values left unset.

Hydra itself suggests ``+optimizer.rhoo=0.1`` when ``optimizer.rhoo=0.1`` names no key, and the
``+`` form then adds the typo without complaint. The config files are the one declaration of the
keys the engine reads, so any other key means the user believes a setting is in force that is not.
"""
from __future__ import annotations

import dataclasses
import difflib
from functools import cache
from pathlib import Path
from typing import Any, Mapping

import yaml
from omegaconf import DictConfig, OmegaConf

from engine.errors import HarnessError
from engine.optimizers import declared_keys, entries
from engine.resume import flatten
from engine.schedules import SCHEDULES
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


def check_config(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Raise :class:`HarnessError` for a mandatory value left unset or a key nothing reads."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)  # "???" stays a string, nothing resolves
    missing = [key for key, value in flatten(cfg).items() if value == "???"]
    if missing:
        key = missing[0]
        raise HarnessError(f"{key} is not set. "
                           + _MISSING_HINTS.get(key, f"Add {key}=VALUE to the command line."))
    cfg = {k: v for k, v in cfg.items() if k != "hydra"}  # present in Hydra's own compose output
    sections = section_keys()
    _unknown("", cfg, sections[""], "the top level")
    for section, allowed in sections.items():
        if section and isinstance(cfg.get(section), Mapping):
            _unknown(section, cfg[section], allowed, f"the {section} group")
    for group in PER_OPTION_GROUPS:
        section = cfg.get(group)
        if isinstance(section, Mapping) and section.get("name") in option_names(group):
            name = section["name"]
            _unknown(group, section, option_keys(group, name), f"{group}={name}")


def option_names(group: str) -> frozenset[str]:
    """The registered options of a :data:`PER_OPTION_GROUPS` group."""
    return frozenset(entries() if group == "optimizer" else SCHEDULES)


def option_keys(group: str, name: str) -> frozenset[str]:
    """The keys ``<group>=<name>`` declares in configs/<group>/<name>.yaml."""
    if group == "optimizer":
        return declared_keys(name)
    return frozenset(_yaml_keys(CONFIG_DIR / group / f"{name}.yaml"))
