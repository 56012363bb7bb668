"""Checkpoints: atomic (temp file, fsync, rename), keep-last-N, full training state, safe loading.

A checkpoint holds everything a bit-exact resume needs: model and optimizer state (Sophia's ``h``
included), the step, every RNG state, metric counters, the resolved config, the data's meta and
the W&B run id. The loader position needs no state of its own: batches are a pure function of
(seed, stream, step). Files load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from engine.errors import HarnessError

FORMAT = 1
_NAME = re.compile(r"^ckpt_(\d{7,})\.pt$")


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"ckpt_{step:07d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temp files of an interrupted save are
    never matched: they end in ``.tmp``)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], directory: Path, step: int, keep_last: int) -> Path:
    """Write ``state`` atomically as ckpt_<step>.pt, then delete all but the newest ``keep_last``.

    A process killed at any point leaves either the previous set of checkpoints or the new one,
    never a truncated file under a checkpoint name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    if keep_last > 0:
        for old in list_checkpoints(directory)[:-keep_last]:
            old.unlink(missing_ok=True)
    return final


class UnreadableCheckpoint(HarnessError):
    """A checkpoint file that cannot be deserialised (truncated, corrupt, not a checkpoint)."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and sanity-check a checkpoint; any problem becomes a HarnessError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"Checkpoint {path} does not exist. Pass an existing file or a run "
                           f"directory to checkpoint.resume, or use checkpoint.resume=auto.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle with foreign objects, not a checkpoint at all
        raise UnreadableCheckpoint(
            f"Checkpoint {path} cannot be read ({type(err).__name__}: {err}). It is corrupt or not "
            f"a checkpoint of this harness; resume from an earlier one in the same directory or "
            f"start a fresh run."
        ) from err
    missing = [k for k in ("format", "step", "model", "optimizer", "model_config")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise HarnessError(f"Checkpoint {path} lacks {', '.join(missing)}: it was not written by "
                           f"this harness (or by an incompatible version).")
    if state["format"] != FORMAT:
        raise HarnessError(f"Checkpoint {path} has format {state['format']}, this harness reads "
                           f"format {FORMAT}.")
    return state


def find_resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """``None``/``""`` -> fresh start; ``auto`` -> newest checkpoint of this run dir, if any;
    a directory -> its newest checkpoint; a file -> that file."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(Path(run_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir():
        sub = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = list_checkpoints(sub)
        if not found:
            raise HarnessError(f"checkpoint.resume={resume}: no ckpt_*.pt in {sub}.")
        return found[-1]
    return path


def load_resume_checkpoint(resume: str | None, run_dir: Path,
                           warn: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its state, or ``None`` for a fresh start.

    With ``auto`` or a run directory the newest *readable* checkpoint wins: a newest file that
    cannot be read (a disk filled up or a copy cut short after the atomic save) is skipped with a
    loud warning naming it, rather than refusing a resume that an older checkpoint can serve. A file
    named explicitly must load, or the resume is refused.
    """
    path = find_resume_checkpoint(resume, run_dir)
    if path is None:
        return None
    if resume == "auto" or Path(resume).is_dir():
        candidates = list_checkpoints(path.parent)[::-1]
    else:
        candidates = [path]
    skipped: list[tuple[Path, UnreadableCheckpoint]] = []
    for candidate in candidates:
        try:
            state = load_checkpoint(candidate)
        except UnreadableCheckpoint as err:
            skipped.append((candidate, err))
            continue
        for bad, err in skipped:
            warn(f"WARNING: skipping unreadable checkpoint {bad} ({err.__cause__!r}); resuming "
                 f"from the older {candidate.name} instead. Steps after {state['step']} will be "
                 f"trained again.")
        return candidate, state
    raise skipped[0][1]


def capture_rng(device: torch.device) -> dict[str, Any]:
    """Every RNG a training step may touch (dropout, sampling), in weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *map(int, np_state[2:4]),
                  float(np_state[4])],
        "python": list(random.getstate()),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
