"""Refuse a config the harness would misread: keys it would silently ignore, values left unset.

Hydra itself suggests ``+optimizer.rhoo=0.1`` when ``optimizer.rhoo=0.1`` names no key, and the
``+`` form then adds the typo without complaint. The loop reads only the keys listed here, so any
other key means the user believes a setting is in force that is not.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from engine.errors import HarnessError
from engine.optimizers import OPTIMIZER_KEYS
from engine.resume import flatten
from model import GPTConfig

# Every key the engine reads, by section ("" is the top level). The root config (configs/config.yaml)
# and the data group's files must declare exactly these; tests/test_config_keys.py holds them together.
SECTION_KEYS: dict[str, frozenset[str]] = {
    "": frozenset({"seed", "device", "dtype", "compile", "train", "eval", "checkpoint", "wandb",
                   "model", "optimizer", "data"}),
    "train": frozenset({"max_steps", "global_batch_tokens", "micro_batch_size", "block_size",
                        "grad_clip", "warmup_steps", "decay_steps", "min_lr_ratio", "log_interval",
                        "eval_interval", "eval_batches", "eval_at_start", "on_nonfinite",
                        "max_rollbacks", "stop_at_step", "peak_flops", "prefetch"}),
    "eval": frozenset({"hellaswag_interval", "hellaswag_task_file", "hellaswag_limit",
                       "hellaswag_batch_size"}),
    "checkpoint": frozenset({"interval", "keep_last", "resume", "allow_config_change"}),
    "wandb": frozenset({"mode", "project", "entity", "group", "name"}),
    "model": frozenset({"preset", "init_from",
                        *(f.name for f in dataclasses.fields(GPTConfig))}),
    "data": frozenset({"name", "source", "tokenizer", "dir", "prepare_if_missing", "val_fraction",
                       "seed", "split_blank_lines", "hf_id", "revision", "text_column",
                       "max_docs", "val_split"}),
}

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
    _unknown("", cfg, SECTION_KEYS[""], "the top level")
    for section, allowed in SECTION_KEYS.items():
        if section and isinstance(cfg.get(section), Mapping):
            _unknown(section, cfg[section], allowed, f"the {section} group")
    optimizer = cfg.get("optimizer")
    if isinstance(optimizer, Mapping) and optimizer.get("name") in OPTIMIZER_KEYS:
        name = optimizer["name"]
        _unknown("optimizer", optimizer, OPTIMIZER_KEYS[name], f"optimizer={name}")
