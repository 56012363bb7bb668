"""Checkpoints: atomic (temp file, fsync, rename), keep-last-N, full training state, safe loading.

A checkpoint holds everything a bit-exact resume needs: model and optimizer state (Sophia's ``h``
included), the step, every RNG state, metric counters, the resolved config, the data's meta and
the W&B run id. The loader position needs no state of its own: batches are a pure function of
(seed, stream, step). Files load with ``torch.load(weights_only=True)``.

The tools that use a trained model (``scripts/sample.py``, ``evaluate.py``, ``export_hf.py``) load
it with :func:`load_trained`: the GPT rebuilt in eval mode and the tokenizer it was trained with.
Every refusal, here and in resuming, is a :class:`CheckpointError`.
"""
from __future__ import annotations

import errno
import io
import os
import random
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from data.errors import DataError
from data.files import atomic_write
from data.tokenizers import Tokenizer, get_tokenizer
from engine.distributed import broadcast_object
from engine.errors import HarnessError
from engine.hessian import HessianCost
from model import GPT, GPTConfig

if TYPE_CHECKING:
    from engine.trainer import Trainer

FORMAT = 1
# Beside a run's rotating checkpoints/, the checkpoints it keeps for cooldown branches
# (engine/branching.py): never deleted by checkpoint.keep_last.
BRANCH_POINTS_DIR = "branch_points"
_NAME = re.compile(r"^ckpt_(\d{7,})\.pt$")


# data.files.atomic_write's temporary files: ".<final name>.<random>.tmp".
_TEMP_GLOB = ".ckpt_*.pt.*.tmp"


def checkpoint_path(directory: Path, step: int) -> Path:
    """``directory/ckpt_<step, 7+ digits>.pt``: the name sorts as the step."""
    return Path(directory) / f"ckpt_{step:07d}.pt"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint file named by :func:`checkpoint_path`."""
    return int(_NAME.match(Path(path).name).group(1))


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temp files of an interrupted save are
    never matched: they start with a dot and end in ``.tmp``)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


# Errors that say the filesystem has no room: a full disk, a full quota.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# torch.save's zip container adds to the storages' bytes a header and alignment per storage and
# the pickled structure; these allowances cover them with room to spare.
_CONTAINER_BYTES, _PER_STORAGE_BYTES = 64 << 10, 1 << 10


class CheckpointWriteError(HarnessError):
    """A checkpoint that could not be written (no room on the disk, an I/O error). The partial
    file has been removed and the older checkpoints kept, so the run resumes from the newest of
    them; ``status`` is the summary's status for the run ("failed: disk full")."""

    def __init__(self, message: str, status: str):
        super().__init__(message)
        self.status = status


def checkpoint_nbytes(state: Any) -> int:
    """About the bytes ``torch.save`` writes for a (nested) state dict, from above: its tensors'
    storages, each counted once as torch.save stores it once (GPT-2's tied embedding and output
    weights share one), and the container's allowance."""
    storages: dict[tuple[str, int], int] = {}

    def walk(node: Any) -> None:
        if torch.is_tensor(node):
            storage = node.untyped_storage()
            storages[(str(storage.device), storage.data_ptr())] = storage.nbytes()
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(state)
    return sum(storages.values()) + _CONTAINER_BYTES + _PER_STORAGE_BYTES * len(storages)


def _free_bytes(directory: Path) -> int | None:
    """Free bytes on the filesystem that holds (or will hold) ``directory``."""
    for folder in (directory, *directory.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


class _WriteErrors:
    """A file wrapper that keeps the OSError a write raised: torch.save reports a failed write as
    a RuntimeError about stream positions, without the errno that says the disk is full."""

    def __init__(self, file: Any):
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(state: dict[str, Any], directory: Path, step: int, keep_last: int) -> Path:
    """Write ``state`` atomically as ckpt_<step>.pt, then delete all but the newest ``keep_last``.

    A process killed at any point leaves either the previous set of checkpoints or the new one,
    never a truncated file under a checkpoint name. A process killed hard (no chance to clean up)
    can leave a temporary file; the next save removes it, since only rank 0 of the one run using
    ``directory`` writes there.

    The free space is checked first against the state's size. A checkpoint that does not fit, or
    whose write fails, raises :class:`CheckpointWriteError` naming the size and the directory;
    the partial file is removed and no older checkpoint is deleted.
    """
    directory = Path(directory)
    final = checkpoint_path(directory, step)
    needed = checkpoint_nbytes(state)
    free = _free_bytes(directory)
    if free is not None and free < needed:
        raise _write_error(step, directory, needed, OSError(errno.ENOSPC, "not enough space"),
                           free)
    writer = None
    try:
        with atomic_write(final, "wb") as f:
            writer = _WriteErrors(f)
            torch.save({"format": FORMAT, **state}, writer)
    except (OSError, RuntimeError) as err:
        cause = err if isinstance(err, OSError) else writer.error if writer else None
        if cause is None:
            raise
        raise _write_error(step, directory, needed, cause, _free_bytes(directory)) from None
    for leftover in directory.glob(_TEMP_GLOB):
        leftover.unlink(missing_ok=True)
    if keep_last > 0:
        for old in list_checkpoints(directory)[:-keep_last]:
            old.unlink(missing_ok=True)
    return final


def _write_error(step: int, directory: Path, needed: int, cause: OSError,
                 free: int | None) -> CheckpointWriteError:
    older = list_checkpoints(directory)
    resume = (f"rerun the same command to resume from {older[-1].name}" if older
              else "rerun the same command to start again")
    room = f", {_mib(free)} free" if free is not None else ""
    name = checkpoint_path(directory, step).name
    if cause.errno in _NO_SPACE:
        return CheckpointWriteError(
            f"disk full: checkpoint {name} needs about {_mib(needed)} in "
            f"{directory}{room}. Free space there (older checkpoints are kept), then {resume}.",
            status="failed: disk full")
    return CheckpointWriteError(
        f"checkpoint {name} ({_mib(needed)}) could not be written to {directory}: "
        f"{cause.strerror or cause}. Older checkpoints are kept; fix the directory, then {resume}.",
        status="failed: checkpoint not written")


class CheckpointError(HarnessError):
    """A checkpoint that cannot be used: missing, unreadable, foreign, or its model or tokenizer
    cannot be rebuilt. The message names the file and the fix."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint file that cannot be deserialised (truncated, corrupt, not a checkpoint)."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and sanity-check a checkpoint; any problem becomes a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. Pass an existing file or a run "
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
        raise CheckpointError(f"Checkpoint {path} lacks {', '.join(missing)}: it was not written "
                              f"by this harness (or by an incompatible version).")
    if state["format"] != FORMAT:
        raise CheckpointError(f"Checkpoint {path} has format {state['format']}, this harness "
                              f"reads format {FORMAT}.")
    return state


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file ``path`` stands for: ``path`` itself, or for a run directory (or its
    ``checkpoints/`` folder) its newest complete checkpoint. The tools that read a run (sample,
    evaluate, export) all take either."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint "
                              f"(RUN_DIR/checkpoints/ckpt_*.pt) or a run directory.")
    if not path.is_dir():
        return path
    found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if not found:
        raise CheckpointError(f"no checkpoint in {path}: expected {path / 'checkpoints'}/ckpt_*.pt. "
                              f"The run has not saved one yet (train.py saves every "
                              f"checkpoint.interval steps and at the end); pass another run "
                              f"directory or a .pt file.")
    return found[-1]


@dataclass
class TrainedModel:
    """A trained GPT ready for inference, and what the tools report about it."""

    path: Path  # the checkpoint file loaded
    step: int
    config: GPTConfig
    model: GPT  # eval mode, on the device asked for
    tokenizer: Tokenizer | None  # None when not asked to load it
    tokenizer_name: str | None  # the trained (or requested) tokenizer's name
    optimizer_name: str | None
    data_meta: dict[str, Any] = field(default_factory=dict)  # the training data's meta.json


def load_trained(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                 tokenizer: str | None = None, load_tokenizer: bool = True) -> TrainedModel:
    """The model of a checkpoint (a file, or a run directory for its newest checkpoint) rebuilt
    from its ``model_config`` and weights, in eval mode on ``device``, with the tokenizer its
    training data was prepared with (``data_meta["tokenizer"]``).

    ``tokenizer``: a name the user asked for (a tool's ``--tokenizer``); refused unless it is the
    trained one, and used when the checkpoint records none. ``load_tokenizer=False`` leaves
    :attr:`TrainedModel.tokenizer` None (an export only needs the name). Every problem raises
    :class:`CheckpointError`.
    """
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file. Pass a checkpoint such as "
                              f"RUN_DIR/checkpoints/ckpt_0001000.pt, or a run directory RUN_DIR.")
    try:
        state = load_checkpoint(path)
    except UnreadableCheckpoint as err:
        cause = err.__cause__
        if not zipfile.is_zipfile(path):
            # torch.save has written zip archives since torch 1.6; for anything else torch blames
            # weights_only, which misleads.
            reason = "not a torch.save archive"
        else:  # torch's own message can run to pages; its first line says enough
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            reason = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
        raise CheckpointError(f"{path} is not a checkpoint this tool can read ({reason}). Pass a "
                              f".pt file written by train.py (RUN_DIR/checkpoints/ckpt_*.pt); a "
                              f"truncated or foreign file cannot be loaded.") from None
    except CheckpointError as err:
        raise CheckpointError(f"{err} Pass a file written by train.py "
                              f"(RUN_DIR/checkpoints/ckpt_*.pt), not a bare state dict or another "
                              f"file.") from None
    try:
        config = GPTConfig.from_dict(state["model_config"])
        model = GPT(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: the checkpoint's model_config cannot build a GPT ({err}). "
                              f"The checkpoint was written by an incompatible version of the "
                              f"harness.") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the checkpoint's weights do not match its model_config "
                              f"({str(err).strip().splitlines()[0]}); the file is corrupt or was "
                              f"edited.") from None
    meta = state.get("data_meta") if isinstance(state.get("data_meta"), dict) else {}
    name = _tokenizer_name(path, meta.get("tokenizer"), tokenizer)
    tok = _load_tokenizer(path, name, config.vocab_size) if load_tokenizer else None
    return TrainedModel(path=path, step=int(state["step"]), config=config,
                        model=model.to(device).eval(), tokenizer=tok, tokenizer_name=name,
                        optimizer_name=state.get("optimizer_name"), data_meta=dict(meta))


def _tokenizer_name(path: Path, trained: str | None, requested: str | None) -> str | None:
    if requested and trained and requested != trained:
        raise CheckpointError(
            f"tokenizer mismatch: --tokenizer {requested} was given but {path} was trained on "
            f"data tokenized with {trained!r}. Decoding its ids with another tokenizer prints "
            f"garbage; drop --tokenizer (the checkpoint's own is used) or pass --tokenizer "
            f"{trained}.")
    return requested or trained


def _load_tokenizer(path: Path, name: str | None, model_vocab: int) -> Tokenizer:
    if not name:
        raise CheckpointError(
            f"{path} does not record its tokenizer (no data_meta.tokenizer), so it was not written "
            f"by train.py. Use a checkpoint written by train.py, or, where the tool takes one, pass "
            f"the tokenizer the training data was prepared with (--tokenizer gpt2 or byte).")
    try:
        tok = get_tokenizer(name)
    except DataError as err:
        raise CheckpointError(str(err)) from None
    if tok.vocab_size > model_vocab:
        raise CheckpointError(
            f"tokenizer mismatch: {name!r} has {tok.vocab_size} tokens but the model's vocabulary "
            f"has only {model_vocab}, so it cannot have been trained with it; the checkpoint's "
            f"data_meta is inconsistent or the wrong tokenizer was asked for. Use the tokenizer "
            f"the model was trained with, or a checkpoint trained on {name!r} data.")
    return tok


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
            raise CheckpointError(f"checkpoint.resume={resume}: no ckpt_*.pt in {sub}.")
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

    def save(self, trainer: Trainer, kept: bool = False) -> Path | None:
        """Checkpoint the trainer's current step; returns the file on rank 0. ``kept``: into the
        run's :data:`BRANCH_POINTS_DIR` instead, where no rotation deletes it.

        A failed write raises :class:`CheckpointWriteError` on every rank (rank 0 tells the others
        its outcome), so that the ranks stop together instead of waiting on rank 0 forever.
        """
        state = self.state(trainer)
        path, failure = None, None
        if trainer.env.is_main:
            try:
                path = (save_checkpoint(state, self.directory.parent / BRANCH_POINTS_DIR,
                                        trainer.step, keep_last=0) if kept else
                        save_checkpoint(state, self.directory, trainer.step, self.keep_last))
            except CheckpointWriteError as err:
                failure = (str(err), err.status)
        failure = broadcast_object(failure, trainer.env)
        if failure is not None:
            raise CheckpointWriteError(*failure)
        return path

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
