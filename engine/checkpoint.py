"""Checkpoints: atomic (temp file, fsync, rename), keep-last-N, full training state, safe loading.

A checkpoint holds everything a bit-exact resume needs: model and optimizer state (Sophia's ``h``
included), the step, every RNG state, metric counters, the resolved config, the data's meta and
the W&B run id. The loader position needs no state of its own: batches are a pure function of
(seed, stream, step). Files load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import io
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from engine.errors import HarnessError
from engine.hessian import HessianCost

if TYPE_CHECKING:
    from engine.trainer import Trainer

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


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file ``path`` stands for: ``path`` itself, or for a run directory (or its
    ``checkpoints/`` folder) its newest complete checkpoint. The tools that read a run (sample,
    evaluate, export) all take either."""
    path = Path(path)
    if not path.exists():
        raise HarnessError(f"{path} does not exist; pass a checkpoint (RUN_DIR/checkpoints/ckpt_*.pt) "
                           f"or a run directory.")
    if not path.is_dir():
        return path
    found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if not found:
        raise HarnessError(f"no checkpoint in {path}: expected {path / 'checkpoints'}/ckpt_*.pt. The "
                           f"run has not saved one yet (train.py saves every checkpoint.interval "
                           f"steps and at the end); pass another run directory or a .pt file.")
    return found[-1]


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


class Checkpointer:
    """A :class:`~engine.trainer.Trainer`'s full state in and out of ``directory``.

    ``extra`` (the resolved config, the data's meta, the W&B run id) is stored as it is. Saving is
    collective (every rank contributes its RNG state and a checksum); rank 0 writes. Restoring
    first checks that the checkpoint belongs to this run: same optimizer, same model.
    """

    def __init__(self, directory: Path, keep_last: int, extra: dict[str, Any] | None = None):
        self.directory, self.keep_last = Path(directory), keep_last
        self.extra: dict[str, Any] = dict(extra or {})

    def latest(self) -> Path | None:
        found = list_checkpoints(self.directory)
        return found[-1] if found else None

    def state(self, trainer: Trainer) -> dict[str, Any]:
        env = trainer.env
        rng = capture_rng(env.device)
        if env.is_distributed:  # each rank's dropout stream, so every rank resumes exactly
            buf = io.BytesIO()
            torch.save(rng, buf)  # all_gather_object cannot carry tensors inside dicts on gloo
            blobs = [None] * env.world_size
            dist.all_gather_object(blobs, buf.getvalue())
            all_rng = [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]
        else:
            all_rng = [rng]
        counters = {**vars(trainer.counters), "clipped_steps": trainer.stats.clipped_steps,
                    **(trainer.hessian.cost if trainer.hessian else HessianCost()).state_dict()}
        return {"step": trainer.step, "model": trainer.raw_model.state_dict(),
                "rank_divergence": rank_divergence(trainer),
                "model_config": dict(vars(trainer.raw_model.config)),
                "optimizer": trainer.optimizer.state_dict(), "optimizer_name": trainer.optim.name,
                "scaler": trainer.scaler.state_dict() if trainer.scaler else None,
                "rng": all_rng, "counters": counters, **self.extra}

    def save(self, trainer: Trainer) -> Path | None:
        """Checkpoint the trainer's current step; returns the file on rank 0."""
        state = self.state(trainer)
        if not trainer.env.is_main:
            return None
        return save_checkpoint(state, self.directory, trainer.step, self.keep_last)

    def restore(self, trainer: Trainer, source: Path | dict[str, Any]) -> None:
        """Load a checkpoint (a file or its loaded state) into ``trainer``, refusing one written by
        a run with another optimizer or model."""
        state = load_checkpoint(source) if isinstance(source, Path) else source
        name = trainer.optim.name
        if state.get("optimizer_name") != name:
            raise HarnessError(
                f"The checkpoint was written by a run with optimizer={state.get('optimizer_name')}, "
                f"this run uses optimizer={name}. Resume with the same optimizer or start a fresh "
                f"run."
            )
        ours = dict(vars(trainer.raw_model.config))
        if state["model_config"] != ours:
            diff = {k: (state["model_config"].get(k), v) for k, v in ours.items()
                    if state["model_config"].get(k) != v}
            raise HarnessError(f"The checkpoint's model differs from this run's: {diff} "
                               f"(checkpoint, run). Resume with the same model settings.")
        trainer.raw_model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if trainer.scaler and state.get("scaler"):
            trainer.scaler.load_state_dict(state["scaler"])
        trainer.step = int(state["step"])
        counters = dict(state["counters"])
        trainer.stats.clipped_steps = counters.pop("clipped_steps", 0)
        if trainer.hessian is not None:
            trainer.hessian.cost.load_state_dict(counters)
        trainer.counters = type(trainer.counters)(
            **{k: v for k, v in counters.items() if not k.startswith("hessian_")})
        rngs, env = state["rng"], trainer.env
        restore_rng(rngs[env.rank] if len(rngs) == env.world_size else rngs[0], env.device)


def rank_divergence(trainer: Trainer) -> float:
    """Largest difference between rank 0's and another rank's parameter and optimizer-state
    checksums (0.0 for one process). DDP must keep ranks identical; a non-zero value means a bug
    or a faulty device, so it is recorded in every checkpoint and warned about."""
    env = trainer.env
    if not env.is_distributed:
        return 0.0
    tensors = [p.detach() for p in trainer.raw_model.parameters()]
    tensors += [v for st in trainer.optimizer.state.values() for v in st.values()
                if torch.is_tensor(v) and v.dim() > 0]
    sums = torch.stack([t.double().sum() for t in tensors])
    gathered = [torch.empty_like(sums) for _ in range(env.world_size)]
    dist.all_gather(gathered, sums)
    divergence = max((g - gathered[0]).abs().max().item() for g in gathered)
    if divergence and env.is_main:
        print(f"warning: ranks diverged (checksum difference {divergence:.3g})", flush=True)
    return divergence


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
