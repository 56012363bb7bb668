"""What the registries share (optimizers, schedules, evaluations): a name -> entry map that refuses
a name twice, and importing every module of a package so that each registers itself."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Iterable, TypeVar

T = TypeVar("T")


def add_unique(registry: dict[str, T], kind: str, name: str, entry: T) -> T:
    """``registry[name] = entry``; a second entry under one name is a ValueError (two modules
    claiming one name would make the choice depend on import order)."""
    if name in registry:
        raise ValueError(f"{kind} {name!r} is registered twice")
    registry[name] = entry
    return entry


_IMPORTED: set[str] = set()


def import_modules(package: str, path: Iterable[str]) -> None:
    """Import every module of ``package`` (its ``__path__`` is ``path``) once."""
    if package in _IMPORTED:
        return
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")
    _IMPORTED.add(package)
