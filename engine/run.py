"""One training run: checks, the trainer, resume, the run directory's files, the loop, the summary.

:func:`run` is what ``train.py`` calls inside Hydra; it returns the run's summary, whose final
validation loss Hydra sweepers (Optuna) minimise. A run stopped by a signal raises
:class:`Preempted` after its checkpoint and summary are written; one writer per run directory is
enforced by :class:`RunLock`.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import math
import os
import shlex
import signal
import socket
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, OmegaConf

from engine.branching import check_branch, decay_start, find_branch_checkpoint, inherit_metrics
from engine.build import build_trainer, resolve_dtype
from engine.checkpoint import (CheckpointWriteError, list_checkpoints, load_checkpoint,
                               load_resume_checkpoint)
from engine.config_check import check_config
from engine.console_log import tee_console
from engine.distributed import (DistEnv, broadcast_object, setup_distributed, stop_exit_code,
                                stop_on_signals, teardown_distributed)
from engine.errors import HarnessError
from engine.metrics import ConsoleSink, JsonlSink, MetricsLogger, WandbSink
from engine.resume import check_resume_config
from engine.summary import format_summary, summarize_run, write_summary


def _sweep_group(cfg: DictConfig) -> str | None:
    if cfg.wandb.group:
        return cfg.wandb.group
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.sweep.dir).name
    except Exception:  # not under Hydra (tests calling run() directly)
        pass
    return None


class Preempted(SystemExit):
    """A run stopped by a signal, after its checkpoint and summary were written: the process exits
    with 128 + the signal's number (SIGTERM 143), and rerunning the command resumes it."""

    def __init__(self, signum: int, summary: dict[str, Any]):
        super().__init__(stop_exit_code(signum))
        self.signum, self.summary = signum, summary


LOCK_FILE = ".lock"


def remove_empty_dirs(folders: Iterable[Path]) -> None:
    """Remove each of ``folders`` that holds nothing but empty directories, with those.

    For the directories an invocation created, once it knows it leaves nothing in them: whatever
    lies below one of them was made after it, so none of it predates the invocation (under
    torchrun another rank may have made the deeper ones). A file anywhere keeps it and its
    parents."""
    for folder in sorted(set(folders), key=lambda f: len(f.parts)):
        for sub, _, _ in os.walk(folder, topdown=False):
            with contextlib.suppress(OSError):  # not empty, or already gone
                os.rmdir(sub)


class RunLock:
    """One writer per run directory: an exclusive ``flock`` on ``RUN_DIR/.lock``, which holds the
    host and pid of the run that has it.

    The kernel drops the lock when its process dies, however it dies (kill -9 included), so a
    crashed run never leaves the directory locked; a lock file it leaves behind is simply taken
    over. On a filesystem without ``flock`` the run goes ahead unlocked, with a warning.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> None:
        """Take the lock, creating the run directory if needed; a held lock raises
        :class:`HarnessError` naming the directory and its holder, leaving everything as it was."""
        self._created = [f for f in (self.run_dir, *self.run_dir.parents) if not f.exists()]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                who = holder or "host and pid not yet recorded"
                raise HarnessError(
                    f"{self.run_dir} is in use by another run ({who}); one run writes to a run "
                    f"directory at a time. Wait for it to end (or stop it), or pass another "
                    f"hydra.run.dir.") from None
            except OSError as err:
                os.close(fd)
                print(f"WARNING: cannot lock {self.path} ({err.strerror}): this filesystem has "
                      f"no flock, so a second run into {self.run_dir} would not be refused.",
                      flush=True)
                return
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            # The holder we raced with removed the file on release: lock the one now there.
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock and its file, and the directories :meth:`acquire` created if they are
        still empty (a run refused by a later check leaves nothing behind)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # before unlocking: a waiter then finds no stale file
            os.close(self._fd)
            self._fd = None
        remove_empty_dirs(self._created)


def _lock_run_dir(run_dir: Path, env: DistEnv, stack: contextlib.ExitStack) -> None:
    """Rank 0 locks the run directory for the rest of the run; a refusal is raised on every
    rank."""
    refusal = None
    if env.is_main:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
            stack.callback(lock.release)
        except HarnessError as err:
            refusal = str(err)
    refusal = broadcast_object(refusal, env)
    if refusal is not None:
        raise HarnessError(refusal)


def run(cfg: DictConfig, run_dir: str | os.PathLike,
        on_start: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Train as configured; returns the run's summary (``val_loss``, ``step``, ``run_dir``, ...).

    A run stopped by a signal raises :class:`Preempted` (a ``SystemExit``) once its checkpoint
    and summary are written; a second run into a directory in use is refused (:class:`RunLock`).

    ``on_start(run_dir)`` is called on rank 0 once every check has passed, just before the run
    dir's files are written: a refused run writes nothing.
    """
    check_config(cfg)
    env = setup_distributed(cfg.device)
    logger = MetricsLogger([])
    try:
        with contextlib.ExitStack() as stack:  # the run dir's lock, then train.log's copy
            try:
                return _run(cfg, Path(run_dir), env, logger, on_start, stack)
            finally:
                logger.close()  # inside the console copy: W&B's closing lines are kept too
    finally:
        teardown_distributed()


def _run(cfg: DictConfig, run_dir: Path, env: DistEnv, logger: MetricsLogger,
         on_start: Callable[[Path], None] | None, stack: contextlib.ExitStack) -> dict[str, Any]:
    if cfg.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise HarnessError(f"wandb.mode={cfg.wandb.mode} needs the wandb package: pip install -e "
                           f"'.[wandb]', or run with wandb.mode=disabled.")
    # Rank 0's run dir wins, so every rank reads and writes the same place whatever it composed.
    run_dir = Path(broadcast_object(str(run_dir), env))
    # Before anything reads the run dir's checkpoints: what is resumed must be what no other run
    # is still writing.
    _lock_run_dir(run_dir, env, stack)
    trainer = build_trainer(cfg, run_dir, env)
    resolved = trainer.checkpointer.extra["config"]

    # Resume before touching the run dir's files: a refused (mismatched) checkpoint must leave
    # its run's config and metrics as they were. Messages wait until train.log is open.
    notes: list[str] = []
    parent: Path | None = None  # the run this one branches from, when it starts a branch
    resumed = load_resume_checkpoint(cfg.checkpoint.resume, run_dir, warn=notes.append)
    if resumed is not None:
        resume_path, state = resumed
        trainer.checkpointer.restore(trainer, state)
        changes = check_resume_config(state.get("config", {}), resolved, source=str(resume_path),
                                      allow=bool(cfg.checkpoint.get("allow_config_change")))
        notes += [f"WARNING: resuming with {key} changed from {old!r} to {new!r} "
                  f"(checkpoint.allow_config_change=true)" for key, old, new in changes]
        trainer.checkpointer.extra["wandb_id"] = state.get("wandb_id")
        notes.append(f"resumed from {resume_path} at step {trainer.step}")
    else:
        _check_fresh_start(run_dir, notes)
        if cfg.checkpoint.get("branch_from"):
            parent = _start_branch(cfg, trainer, resolved, notes)

    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(tee_console(run_dir / "train.log"))
        for note in notes:
            print(note, flush=True)
        if on_start is not None:
            on_start(run_dir)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if parent is not None:
            inherit_metrics(parent, run_dir)
        _open_sinks(cfg, run_dir, trainer, logger, resolved,
                    resumed=resumed is not None or parent is not None)
        plan = trainer.plan
        print(f"run dir {run_dir} | {trainer.optim.name} | "
              f"{trainer.raw_model.num_params() / 1e6:.2f}M params | {plan.global_batch_tokens} "
              f"tokens/step = {plan.micro_batch_size} x {plan.block_size} x {plan.accum_steps} "
              f"accum x {env.world_size} ranks | {resolve_dtype(cfg.dtype, env.device)} on "
              f"{env.device}", flush=True)
    trainer.logger = logger
    # Signals are caught from the first step to the end of the summary: until training starts a
    # signal ends the process at once (nothing new to save), and after the summary the run is
    # complete.
    with stop_on_signals() as request:
        trainer.stop_request = request
        try:
            trainer.fit()
        except (CheckpointWriteError, OSError) as err:
            _fail_on_write_error(err, run_dir, trainer, logger, env)
            raise
        if not env.is_main:
            summary = {"val_loss": None if math.isnan(trainer.last_val_loss)
                       else trainer.last_val_loss, "step": trainer.step, "run_dir": str(run_dir)}
        else:
            logger.close()  # flush metrics.jsonl before the summary reads it
            summary = summarize_run(run_dir, trainer.position(),
                                    status="preempted" if trainer.stopped_by else None)
            write_summary(run_dir, summary)
            print(format_summary(summary), flush=True)
        if trainer.stopped_by:
            if env.is_main:
                print(_preempted_line(trainer, run_dir), flush=True)
            request.hand_over()
            raise Preempted(trainer.stopped_by, summary)
    return summary


def _preempted_line(trainer, run_dir: Path) -> str:
    name = signal.Signals(trainer.stopped_by).name
    return (f"preempted by {name} at step {trainer.step}/{trainer.settings.max_steps}: "
            f"checkpoint {list_checkpoints(run_dir / 'checkpoints')[-1].name} written; resume with "
            f"`python train.py hydra.run.dir={shlex.quote(str(run_dir))}` (or the same command) "
            f"[exit {stop_exit_code(trainer.stopped_by)}]")


def _start_branch(cfg: DictConfig, trainer, resolved: dict[str, Any], notes: list[str]) -> Path:
    """Load the parent's checkpoint at this run's decay start into ``trainer`` (a cooldown
    branch, engine/branching.py); returns the parent's run directory."""
    parent = Path(cfg.checkpoint.branch_from).resolve()
    step = decay_start(resolved)
    path = find_branch_checkpoint(parent, step)
    state = load_checkpoint(path)
    changes = check_branch(state.get("config", {}), resolved, step, source=str(parent),
                           allow=bool(cfg.checkpoint.get("allow_config_change")))
    trainer.checkpointer.restore(trainer, state)
    notes += [f"WARNING: branching with {key} changed from {old!r} to {new!r} "
              f"(checkpoint.allow_config_change=true)" for key, old, new in changes]
    notes.append(f"branched from {parent} at step {step} ({path.name}), where the decay to "
                 f"step {trainer.settings.max_steps} starts")
    return parent


def _check_fresh_start(run_dir: Path, notes: list[str]) -> None:
    """A run starting from step 0 in an existing run dir: refused when the dir holds an earlier
    run's checkpoints (two runs would share one set of them); an earlier attempt's metrics,
    which no checkpoint can continue, are started anew (noted)."""
    found = list_checkpoints(run_dir / "checkpoints")
    if found:
        raise HarnessError(
            f"{run_dir} holds checkpoints of an earlier run (newest {found[-1].name}); starting "
            f"afresh there (checkpoint.resume=null) would mix two runs in one directory. Resume it "
            f"with checkpoint.resume=auto, or pass another hydra.run.dir.")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        notes.append(f"note: {metrics} holds the metrics of an earlier attempt that saved no "
                     f"checkpoint; starting it anew")


def _fail_on_write_error(err: OSError | CheckpointWriteError, run_dir: Path, trainer,
                         logger: MetricsLogger, env: DistEnv) -> None:
    """A checkpoint or metrics write that failed (a full disk): summary.json with the failure as
    its status, then a one-line :class:`HarnessError` in place of ``err``. Returns (and ``err``
    propagates as it is) for an OSError that is not about the disk."""
    if isinstance(err, CheckpointWriteError):
        status, message = err.status, str(err)
    elif err.errno in (errno.ENOSPC, errno.EDQUOT):
        found = list_checkpoints(run_dir / "checkpoints")
        resume = f"resume from {found[-1].name}" if found else "start again"
        status = "failed: disk full"
        message = (f"disk full: {err.filename or run_dir} could not be written "
                   f"({err.strerror}). Free space in {run_dir}, then rerun the same command to "
                   f"{resume}.")
    else:
        return
    if env.is_main:
        with contextlib.suppress(OSError):  # the disk may have no room left even for these
            logger.close()
        with contextlib.suppress(OSError):
            write_summary(run_dir, summarize_run(run_dir, trainer.position(), status=status))
    raise HarnessError(message) from None


def _open_sinks(cfg: DictConfig, run_dir: Path, trainer, logger: MetricsLogger,
                resolved: dict[str, Any], resumed: bool) -> None:
    """metrics.jsonl (cut back to the resumed step, or started anew), the console, and W&B when
    enabled."""
    logger.sinks.append(JsonlSink(run_dir / "metrics.jsonl",
                                  truncate_after_step=trainer.step if resumed else None,
                                  fresh=not resumed))
    logger.sinks.append(ConsoleSink(total_steps=trainer.settings.max_steps,
                                    start_step=trainer.step))
    if cfg.wandb.mode != "disabled":
        extra = trainer.checkpointer.extra
        sink = WandbSink(cfg.wandb.mode, cfg.wandb.project, cfg.wandb.entity, _sweep_group(cfg),
                         cfg.wandb.name or run_dir.name, resolved, run_dir, extra["wandb_id"])
        extra["wandb_id"] = sink.run_id
        logger.sinks.append(sink)
