"""The type and range of every config key, beside the yaml that declares the key and its default.

The yaml files stay the one declaration of which keys exist; this module says what values each
accepts, as small spec objects (``Int(min=1)``, ``Float(min=0, max=1)``, ``Bool()``,
``Choice("stop", "skip", "rollback")``, ``Optional(...)`` where null means something). The root
sections' specs are here (:data:`SECTIONS`); an optimizer declares its keys' specs in its own
entry module (``OptimizerEntry.schema``), a schedule where it is registered
(``register_schedule(name, schema=...)``) and an evaluation with its builder
(``register_eval(name, schema=...)``). :func:`engine.config_check.check_config` checks every
value against them before a run touches anything.

A refusal is one line naming the key, the bad value and what is allowed:
``train.stop_at_step=-1 must be an integer >= 1 or null (stop this invocation early at that
step).`` Values are checked as Hydra hands them over: a boolean is YAML/Hydra's true or false
(never "no" or 1), an integer is not a bool or a float, a float may be written as an integer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from engine.errors import HarnessError


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Spec:
    """What one key accepts. ``doc`` says what the key means, shown after a refusal."""

    doc: str = ""
    # Refusals read "<key>=<value> must be <what>"; a closed set reads better as "is not one of".
    verb = "must be"

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is allowed."""
        raise NotImplementedError

    def describe(self, plural: bool = False) -> str:
        """The allowed values as a noun phrase ("an integer >= 1"; plural: "integers >= 1")."""
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Spec):
    """An integer (not a bool, not a float such as 1.0), within ``[min, max]`` when given."""

    min: int | None = None
    max: int | None = None
    doc: str = field(default="", kw_only=True)

    def accepts(self, value: Any) -> bool:
        return (_is_int(value) and (self.min is None or value >= self.min)
                and (self.max is None or value <= self.max))

    def describe(self, plural: bool = False) -> str:
        noun = "integers" if plural else "an integer"
        if self.min is not None and self.max is not None:
            return f"{noun} in [{self.min}, {self.max}]"
        if self.min is not None:
            return f"{noun} >= {self.min}"
        if self.max is not None:
            return f"{noun} <= {self.max}"
        return noun


@dataclass(frozen=True)
class Float(Spec):
    """A finite real number (an integer is accepted): ``min``/``max`` are inclusive bounds,
    ``gt``/``lt`` exclusive ones. ``finite=False`` also lets inf through (never NaN)."""

    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None
    finite: bool = True
    doc: str = field(default="", kw_only=True)

    def accepts(self, value: Any) -> bool:
        if not _is_real(value) or math.isnan(value) or (self.finite and math.isinf(value)):
            return False
        return ((self.min is None or value >= self.min) and (self.max is None or value <= self.max)
                and (self.gt is None or value > self.gt) and (self.lt is None or value < self.lt))

    def describe(self, plural: bool = False) -> str:
        low = ((self.min, "[", ">=") if self.min is not None
               else (self.gt, "(", ">") if self.gt is not None else None)
        high = ((self.max, "]", "<=") if self.max is not None
                else (self.lt, ")", "<") if self.lt is not None else None)
        inf = "" if self.finite else " or inf"
        if low and high:
            return f"{'numbers' if plural else 'a number'} in {low[1]}{_number(low[0])}, " \
                   f"{_number(high[0])}{high[1]}"
        adjective = "finite " if self.finite else ""
        if self.gt == 0 and not high:
            adjective = "positive " + adjective
            low = None
        noun = f"{adjective}numbers" if plural else f"a {adjective}number"
        if low:
            return f"{noun} {low[2]} {_number(low[0])}{inf}"
        if high:
            return f"{noun} {high[2]} {_number(high[0])}{inf}"
        return noun + inf


@dataclass(frozen=True)
class Bool(Spec):
    """true or false: a YAML/Hydra boolean, never "no", "abc", 0 or 1."""

    doc: str = field(default="", kw_only=True)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self, plural: bool = False) -> str:
        return "booleans (true or false)" if plural else "true or false"


@dataclass(frozen=True)
class Str(Spec):
    """A string (a name or path); ``nonempty`` refuses ""."""

    nonempty: bool = True
    doc: str = field(default="", kw_only=True)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and (bool(value) or not self.nonempty)

    def describe(self, plural: bool = False) -> str:
        adjective = "non-empty " if self.nonempty else ""
        return f"{adjective}strings" if plural else f"a {adjective}string"


@dataclass(frozen=True, init=False)
class Choice(Spec):
    """One of a fixed set of values."""

    values: tuple[Any, ...]
    doc: str = ""
    verb = "is not"

    def __init__(self, *values: Any, doc: str = "") -> None:
        object.__setattr__(self, "values", tuple(values))
        object.__setattr__(self, "doc", doc)

    def accepts(self, value: Any) -> bool:
        # A bool equals 0/1 and a float may equal an int: compare the types too.
        return any(type(value) is type(v) and value == v for v in self.values)

    def describe(self, plural: bool = False) -> str:
        return f"{'values ' if plural else ''}one of {', '.join(map(str, self.values))}"


@dataclass(frozen=True)
class List(Spec):
    """A list (possibly empty) whose every element ``item`` accepts."""

    item: Spec
    doc: str = field(default="", kw_only=True)
    length: ClassVar[int | None] = None  # a fixed number of elements (Pair: 2)

    def accepts(self, value: Any) -> bool:
        return (isinstance(value, (list, tuple))
                and (self.length is None or len(value) == self.length)
                and all(self.item.accepts(v) for v in value))

    def describe(self, plural: bool = False) -> str:
        if self.length == 2:
            noun = "pairs [a, b]" if plural else "a pair [a, b]"
        else:
            noun = "lists" if plural else "a list"
        return f"{noun} of {self.item.describe(plural=True)}"


class Pair(List):
    """Two values, each accepted by ``item`` (betas: ``Pair(Float(min=0, lt=1))``)."""

    length = 2


@dataclass(frozen=True)
class Optional(Spec):
    """``inner`` or null; for keys whose null means something (say what in ``doc``)."""

    inner: Spec
    doc: str = field(default="", kw_only=True)

    @property
    def verb(self) -> str:  # type: ignore[override]
        return self.inner.verb

    def accepts(self, value: Any) -> bool:
        return value is None or self.inner.accepts(value)

    def describe(self, plural: bool = False) -> str:
        return f"{self.inner.describe(plural)} or null"


def refusal(key: str, value: Any, spec: Spec) -> str:
    """The one-line message refusing ``key=value``."""
    doc = spec.doc or getattr(spec, "inner", spec).doc
    return f"{key}={value!r} {spec.verb} {spec.describe()}{f' ({doc})' if doc else ''}."


def check_values(values: Mapping[str, Any], specs: Mapping[str, Spec], prefix: str = "",
                 error: type[Exception] = HarnessError) -> None:
    """Raise ``error`` for the first value of ``values`` its spec refuses; keys without a spec
    are left to the unknown-key check (engine/config_check.py)."""
    for key, value in values.items():
        spec = specs.get(key)
        if spec is not None and not spec.accepts(value):
            raise error(refusal(f"{prefix}{key}", value, spec))


def _model_section() -> dict[str, Spec]:
    from model import PRESETS

    shape = "null: the preset's"
    return {
        "preset": Choice(*sorted(PRESETS)),
        "n_layer": Optional(Int(min=1), doc=shape),
        "n_head": Optional(Int(min=1), doc=shape),
        "n_embd": Optional(Int(min=1), doc=shape),
        "vocab_size": Optional(Int(min=1), doc="null: the data's vocabulary, padded to 64"),
        "block_size": Optional(Int(min=1), doc=shape),
        "dropout": Float(min=0, lt=1),
        "bias": Bool(),
        "scale_attn_by_inverse_layer_idx": Bool(),
        "init_from": Optional(Str(), doc="a Hugging Face GPT-2 directory or hub id; null: random "
                                         "init"),
    }


def _data_section() -> dict[str, Spec]:
    from data.prepare import VAL_SPLITS
    from data.sources import TEXT_ERRORS
    from data.tokenizers import TOKENIZERS

    return {
        "name": Str(),
        "source": Optional(Str(), doc="a named source or a path; null: data.dir as prepared"),
        "tokenizer": Optional(Choice(*TOKENIZERS), doc="null: the prepared folder's"),
        "dir": Str(),
        "prepare_if_missing": Bool(),
        "val_fraction": Optional(Float(min=0, lt=1), doc="null: the prepared folder's"),
        "val_split": Choice(*VAL_SPLITS),
        "seed": Optional(Int(min=0), doc="null: the prepared folder's"),
        "split_blank_lines": Bool(),
        "text_column": Optional(Str(), doc='null: "text"'),
        "max_docs": Optional(Int(min=1), doc="the first N documents only; null: all"),
        "hf_id": Str(),
        "revision": Optional(Str(), doc="a Hugging Face revision; null: the default branch"),
        "errors": Choice(*TEXT_ERRORS, doc="text that is not UTF-8: strict refuses it, replace "
                                           "prepares it with U+FFFD"),
        "follow_symlinks": Bool(doc="read links out of a source folder"),
    }


# The root sections' keys: "" is the top level; eval's come from the evaluations' registrations.
SECTIONS: dict[str, dict[str, Spec]] = {
    "": {
        "seed": Int(min=0),
        "device": Choice("auto", "cpu", "cuda"),
        "dtype": Choice("auto", "float32", "bfloat16", "float16"),
        "compile": Bool(doc="torch.compile the model"),
    },
    "train": {
        "max_steps": Int(min=1),
        "global_batch_tokens": Int(min=1, doc="tokens per optimizer step"),
        "micro_batch_size": Int(min=1, doc="sequences per forward pass on one rank"),
        "block_size": Optional(Int(min=1), doc="null: the model's block size"),
        "grad_clip": Float(min=0, doc="0 disables clipping"),
        "warmup_steps": Int(min=0),
        "decay_steps": Optional(Int(min=1), doc="null: train.max_steps"),
        "min_lr_ratio": Float(min=0, max=1),
        "log_interval": Int(min=1),
        "eval_interval": Int(min=0, doc="0 disables evaluation"),
        "eval_batches": Int(min=0),
        "eval_at_start": Bool(),
        "on_nonfinite": Choice("stop", "skip", "rollback"),
        "max_rollbacks": Int(min=0),
        "stop_at_step": Optional(Int(min=1), doc="stop this invocation early at that step"),
        "peak_flops": Optional(Float(gt=0), doc="per-device peak FLOP/s; null: looked up"),
        "prefetch": Optional(Bool(), doc="null: on CUDA only"),
    },
    "checkpoint": {
        "interval": Int(min=0, doc="steps between checkpoints; 0: at the end only"),
        "every_minutes": Optional(Float(min=0), doc="wall-clock minutes between checkpoints; "
                                                    "0 or null: off"),
        "keep_last": Int(min=0, doc="checkpoints kept; 0 keeps all"),
        "resume": Optional(Str(), doc="auto, a run directory or a checkpoint file; null: start "
                                      "fresh"),
        "allow_config_change": Bool(),
        "branch_from": Optional(Str(), doc="a WSD parent run directory to branch from; null: "
                                           "no branch"),
    },
    "wandb": {
        "mode": Choice("online", "offline", "disabled",
                       doc="choose online, offline or disabled; offline runs sync later with "
                           "`wandb sync`"),
        "project": Str(),
        "entity": Optional(Str()),
        "group": Optional(Str(), doc="null: the sweep's name in a multirun"),
        "name": Optional(Str(), doc="null: the run directory's name"),
    },
}
SECTIONS["model"] = _model_section()
SECTIONS["data"] = _data_section()


def section_specs(section: str) -> Mapping[str, Spec]:
    """The specs of a root section's keys (``""``: the top level; ``eval``: every registered
    evaluation's keys, ``<name>_<key>``)."""
    if section == "eval":
        from evals import eval_schema

        return eval_schema()
    return SECTIONS.get(section, {})

