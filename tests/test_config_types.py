"""Every config key has a type and a range (engine/schema.py and the registrations), and
check_config refuses a value of the wrong type or out of range in one line naming the key.

The walk composes each group option once and mutates plain dicts, so it covers every key of every
section, optimizer and schedule in a few seconds."""
from __future__ import annotations

import copy
import math
from typing import Any, Iterator

import pytest
from omegaconf import OmegaConf

from engine.build import DTYPES
from engine.config_check import (PER_OPTION_GROUPS, check_config, option_keys, option_names,
                                 option_specs, section_keys)
from engine.errors import HarnessError
from engine.schema import (Bool, Choice, Float, Int, List, Optional, Pair, SECTIONS, Spec, Str,
                           check_values, refusal, section_specs)
from train_helpers import REPO, compose_cfg

ROOT_SECTIONS = sorted(s for s in section_keys() if s)


def _options(group: str) -> list[str]:
    """The group's yaml files (variants such as adamw-nanogpt included)."""
    return sorted(p.stem for p in (REPO / "configs" / group).glob("*.yaml"))


def _where(section: str) -> str:
    if section == "":
        return "engine/schema.py SECTIONS['']"
    if section == "eval":
        return "the evaluation's register_eval(schema=...)"
    return f"engine/schema.py SECTIONS[{section!r}]"


# --- (a) every declared key has a spec, and every spec a declared key -----------------------------

def test_every_declared_key_has_a_spec_and_every_spec_a_key():
    problems = []
    for section, keys in section_keys().items():
        values = set(keys) - set(section_keys()) - set(PER_OPTION_GROUPS) if section == "" else keys
        specs = set(section_specs(section))
        if values - specs:
            problems.append(f"{section or 'top level'}: no spec for {sorted(values - specs)}; "
                            f"declare it in {_where(section)}")
        if specs - values:
            problems.append(f"{section or 'top level'}: spec for undeclared {sorted(specs - values)}")
    for group in PER_OPTION_GROUPS:
        for name in sorted(option_names(group)):
            keys, specs = option_keys(group, name), set(option_specs(group, name))
            where = (f"engine/optimizers/{name}.py's OptimizerEntry(schema=...)"
                     if group == "optimizer" else f"register_schedule({name!r}, schema=...)")
            if keys - specs:
                problems.append(f"{group}={name}: no spec for {sorted(keys - specs)}; declare it in "
                                f"{where}")
            if specs - keys:
                problems.append(f"{group}={name}: spec for undeclared {sorted(specs - keys)}")
    assert not problems, "\n".join(problems)


def _yaml_defaults() -> Iterator[tuple[str, str, Any]]:
    """(section, key, default) of every root-section and data key, as the yaml files give them."""
    root = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "config.yaml"))
    for key, value in root.items():
        if isinstance(value, dict):
            if key != "hydra":
                yield from ((key, k, v) for k, v in value.items())
        elif key != "defaults":
            yield "", key, value
    for group in ("data", "model"):
        for option in _options(group):
            for key, value in OmegaConf.to_container(
                    OmegaConf.load(REPO / "configs" / group / f"{option}.yaml")).items():
                yield group, key, value


def test_null_is_accepted_only_where_the_default_is_null_or_the_key_documents_it():
    """A null-able key is one whose yaml default is null or whose spec says what null means."""
    null_default = {(s, k) for s, k, v in _yaml_defaults() if v is None}
    specs = [(s, k, spec) for s in ROOT_SECTIONS + [""] for k, spec in section_specs(s).items()]
    specs += [(g, k, spec) for g in PER_OPTION_GROUPS for n in option_names(g)
              for k, spec in option_specs(g, n).items()]
    for group in ("optimizer",):
        for option in _options(group):
            for key, value in OmegaConf.load(REPO / "configs" / group / f"{option}.yaml").items():
                if value is None:
                    null_default.add((group, key))
    wrong = [f"{s}.{k}" for s, k, spec in specs if isinstance(spec, Optional)
             and (s, k) not in null_default and "null" not in spec.doc]
    assert not wrong, f"null accepted but neither the default nor documented: {wrong}"
    refused = [f"{s}.{k}" for s, k, spec in specs
               if (s, k) in null_default and not spec.accepts(None)]
    assert not refused, f"the yaml default null is refused: {refused}"


# --- (b), (c): wrong types and out-of-range values, key by key -----------------------------------

def _wrong_types(spec: Spec) -> list[Any]:
    """Values of another type than ``spec`` takes (null too, unless it is Optional)."""
    inner = spec.inner if isinstance(spec, Optional) else spec
    values: list[Any] = [] if isinstance(spec, Optional) else [None]
    if isinstance(inner, Int):
        values += ["abc", 1.5, True]
    elif isinstance(inner, Float):
        values += ["abc", True]
    elif isinstance(inner, Bool):
        values += ["no", "abc", 0, 1]
    elif isinstance(inner, Choice):
        values += [123, True] if all(isinstance(v, str) for v in inner.values) else ["abc"]
    elif isinstance(inner, Str):
        values += [123, True]
    elif isinstance(inner, Pair):
        values += ["abc", [0.9]]
    elif isinstance(inner, List):
        values += ["abc", *[[bad] for bad in _wrong_types(inner.item) if bad is not None]]
    else:
        raise AssertionError(f"no wrong-type values for {spec!r}")
    return values


def _out_of_range(spec: Spec) -> list[Any]:
    """Values of the right type that ``spec``'s range refuses (none for an unbounded key)."""
    inner = spec.inner if isinstance(spec, Optional) else spec
    if isinstance(inner, Int):
        return [v for v in (inner.min - 1 if inner.min is not None else None,
                            inner.max + 1 if inner.max is not None else None) if v is not None]
    if isinstance(inner, Float):
        values = [math.nan] + ([math.inf] if inner.finite else [])
        values += [v for v in (inner.min - 0.5 if inner.min is not None else None,
                               inner.max + 0.5 if inner.max is not None else None,
                               inner.gt, inner.lt) if v is not None]
        return values
    if isinstance(inner, Choice):
        return ["no-such-choice"]
    if isinstance(inner, Str):
        return [""] if inner.nonempty else []
    if isinstance(inner, Pair):
        return [[bad, bad] for bad in _out_of_range(inner.item)]
    if isinstance(inner, List):
        return [[bad] for bad in _out_of_range(inner.item)]
    return []


def _cases() -> list[tuple[str, str, str]]:
    """(config variant, section, key) for every key: the root sections' on the default config,
    data keys on a data option declaring them, each optimizer's and schedule's on its own."""
    cases = [("default", s, k) for s in ["", *ROOT_SECTIONS] if s != "data"
             for k in section_specs(s)]
    for option in _options("data"):
        keys = OmegaConf.load(REPO / "configs" / "data" / f"{option}.yaml")
        cases += [(f"data={option}", "data", k) for k in keys
                  if not any(c[2] == k for c in cases if c[1] == "data")]
    for group in PER_OPTION_GROUPS:
        cases += [(f"{group}={n}", group, k) for n in sorted(option_names(group))
                  for k in option_keys(group, n)]
    return cases


@pytest.fixture(scope="module")
def bases() -> dict[str, dict[str, Any]]:
    """Each config variant of :func:`_cases`, composed once, as plain resolved containers."""
    variants = {"default": []}
    mandatory = {"local": ["data.source=x.txt"], "prepared": ["data.dir=prepared/x"]}
    variants.update({f"data={o}": [f"data={o}", *mandatory.get(o, [])] for o in _options("data")})
    for group in PER_OPTION_GROUPS:
        variants.update({f"{group}={o}": [f"{group}={o}"] for o in _options(group)})
    out = {}
    for name, overrides in variants.items():
        out[name] = OmegaConf.to_container(compose_cfg(overrides), resolve=True)
        check_config(out[name])  # every shipped default passes
    return out


@pytest.mark.parametrize("variant,section,key", _cases(),
                         ids=[f"{s or 'top'}.{k}[{v}]" for v, s, k in _cases()])
def test_a_wrong_type_or_an_out_of_range_value_is_refused_naming_the_key(variant, section, key,
                                                                          bases):
    base = bases[variant]
    if section in PER_OPTION_GROUPS:
        spec = option_specs(section, base[section]["name"])[key]
    else:
        spec = section_specs(section)[key]
    full_key = f"{section}.{key}" if section else key
    bad = [("type", v) for v in _wrong_types(spec)] + [("range", v) for v in _out_of_range(spec)]
    assert bad, full_key
    for kind, value in bad:
        cfg = copy.deepcopy(base)
        (cfg[section] if section else cfg)[key] = value
        with pytest.raises(HarnessError) as err:
            check_config(cfg)
        message = str(err.value)
        assert message.startswith(f"{full_key}={value!r} "), (kind, message)
        assert "\n" not in message, message


# --- the values accepted wrongly before the schema -------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("compile=abc", "compile='abc' must be true or false (torch.compile the model)."),
    ("compile=no", "compile='no' must be true or false (torch.compile the model)."),
    ("train.stop_at_step=-1", "train.stop_at_step=-1 must be an integer >= 1 or null (stop this "
                              "invocation early at that step)."),
    ("train.stop_at_step=0", "train.stop_at_step=0 must be an integer >= 1 or null (stop this "
                             "invocation early at that step)."),
    ("train.block_size=0", "train.block_size=0 must be an integer >= 1 or null (null: the "
                           "model's block size)."),
    ("checkpoint.interval=-1", "checkpoint.interval=-1 must be an integer >= 0 (steps between "
                               "checkpoints; 0: at the end only)."),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last=-1 must be an integer >= 0 (checkpoints "
                                "kept; 0 keeps all)."),
    ("seed=abc", "seed='abc' must be an integer >= 0."),
    ("train.max_steps=1e3", "train.max_steps=1000.0 must be an integer >= 1."),
    ("optimizer.lr=inf", "optimizer.lr=inf must be a positive finite number."),
])
def test_values_once_accepted_wrongly_are_refused(override, message):
    with pytest.raises(HarnessError) as err:
        check_config(compose_cfg([override]))
    assert str(err.value) == message


def test_an_interpolated_value_is_checked_as_resolved():
    check_config(compose_cfg(["train.decay_steps=${train.max_steps}"]))
    cfg = compose_cfg(["train.warmup_steps=0", "train.decay_steps=${train.warmup_steps}"])
    with pytest.raises(HarnessError, match=r"^train\.decay_steps=0 must be an integer >= 1"):
        check_config(cfg)


# --- the spec primitives -------------------------------------------------------------------------

def test_booleans_integers_and_floats_are_strict_about_types():
    assert Bool().accepts(True) and Bool().accepts(False)
    assert not any(Bool().accepts(v) for v in ("no", "true", 0, 1, None))
    assert Int(min=1).accepts(3) and not any(Int(min=1).accepts(v) for v in (True, 3.0, "3", 0))
    f = Float(min=0, lt=1)
    assert f.accepts(0) and f.accepts(0.5) and not any(f.accepts(v) for v in (1, True, math.nan))
    assert not Float().accepts(math.inf) and Float(finite=False).accepts(math.inf)
    assert Choice("a", "b").accepts("a") and not Choice(1, 2).accepts(True)
    assert Pair(Float()).accepts((0.9, 0.95)) and not Pair(Float()).accepts([0.9, 0.95, 0.99])
    assert Optional(Int()).accepts(None) and not Int().accepts(None)


def test_a_refusal_is_one_line_naming_the_key_the_value_and_what_is_allowed():
    spec = Optional(Int(min=1), doc="stop early")
    assert refusal("train.x", -1, spec) == "train.x=-1 must be an integer >= 1 or null (stop early)."
    assert (refusal("o.betas", [1.5, 0.9], Pair(Float(min=0, lt=1)))
            == "o.betas=[1.5, 0.9] must be a pair [a, b] of numbers in [0, 1).")
    assert refusal("w.mode", "x", Choice("a", "b")) == "w.mode='x' is not one of a, b."
    assert refusal("lr", 0, Float(gt=0)) == "lr=0 must be a positive finite number."
    assert refusal("wd", -1, Float(min=0)) == "wd=-1 must be a finite number >= 0."
    with pytest.raises(ValueError, match=r"^k=0 must be an integer >= 1\.$"):
        check_values({"k": 0, "unknown": 1}, {"k": Int(min=1)}, error=ValueError)


def test_the_dtype_choices_are_the_engines():
    assert set(SECTIONS[""]["dtype"].values) == {"auto", *DTYPES}
