"""Hydra entry point: ``python train.py optimizer=sophia model=gpt2-small`` or under torchrun.

Everything else lives in ``engine/``; this file only composes the config, keeps all ranks of a
torchrun job in one run directory, and turns user errors into a paragraph and a non-zero exit.
"""
from __future__ import annotations

import datetime
import math
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf


def run_name(prefix: str, branch_from: str | None = None) -> str:
    """Run-dir name that every rank of one torchrun job computes identically.

    A cooldown branch (``branch_from``, its parent run) is named after its parent,
    ``branch-<parent dir name>``: the optimizer in the command line may be the default, the
    parent's being composed only later.

    torchrun's run id (``--rdzv-id``, required for multi-node) or, for a single-node launch, the
    torchrun agent's pid: both are shared by the workers and survive an elastic restart, so a
    restarted job finds its own checkpoints. A plain ``python train.py`` gets a timestamp.
    """
    if branch_from:
        prefix = f"branch-{Path(str(branch_from)).name}"
    if "RANK" in os.environ:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        return f"{prefix}_{run_id if run_id != 'none' else f'torchrun-{os.getppid()}'}"
    return f"{datetime.datetime.now():%H-%M-%S}_{prefix}"


# Cached like Hydra's own `now`: Hydra copies the resolver cache from the sweep's config into each
# job's, so every job of a multirun resolves the one sweep dir the launcher created (uncached,
# each job computed its own timestamp and the sweep was split across several dirs).
OmegaConf.register_new_resolver("run_name", run_name, replace=True, use_cache=True)
# configs/data/local.yaml keys its folder on the source's name, as `python -m data.prepare` does.
def source_stem(source: str) -> str:
    """``book.txt`` -> ``book``; a folder keeps its whole name (``data.prepare``'s source name)."""
    path = Path(str(source))
    return path.name if path.is_dir() else path.stem


OmegaConf.register_new_resolver("source_stem", source_stem, replace=True)

if int(os.environ.get("RANK", "0")) != 0:
    # Only rank 0 writes: no .hydra/ copy and no log file from the other ranks.
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled",
                 "hydra/hydra_logging=disabled"]


# How long a worker other than rank 0 waits before exiting on an error that rank 0 reports.
REPORT_GRACE_S = 2.0

# An absolute path, so the entry point also works when imported (wrappers, tests) or run from
# another working directory.
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


def resume_base(cfg: DictConfig, overrides: list[str], run_dir: Path) -> tuple[DictConfig, list[str]]:
    """The config to run when a checkpoint will be resumed: the resumed run's own command line
    with this invocation's overrides on top (see engine/resume.py), composed afresh."""
    from hydra import compose

    from engine.checkpoint import find_resume_checkpoint
    from engine.resume import merge_overrides
    from engine.run_dir import read_overrides

    path = find_resume_checkpoint(cfg.checkpoint.resume, run_dir)
    saved = read_overrides(path.parent.parent) if path is not None else None
    if saved is None:
        return cfg, overrides
    merged = merge_overrides(saved, overrides)
    if merged == overrides:
        return cfg, overrides
    return compose(config_name="config", overrides=merged), merged


def branch_base(cfg: DictConfig, overrides: list[str], run_dir: Path) -> tuple[DictConfig, list[str]]:
    """The config of a cooldown branch that starts now (``checkpoint.branch_from=PARENT``, no
    checkpoint of its own yet): the parent's command line, less its ``schedule.horizons``, with
    this invocation's overrides on top, and the parent as an absolute path (so that resuming
    the branch from elsewhere finds it), composed afresh."""
    from hydra import compose

    from engine.checkpoint import find_resume_checkpoint
    from engine.resume import merge_overrides, override_key
    from engine.run_dir import read_overrides

    parent = cfg.checkpoint.get("branch_from")
    if not parent or find_resume_checkpoint(cfg.checkpoint.resume, run_dir) is not None:
        return cfg, overrides
    absolute = str(Path(parent).resolve()).replace("\\", "\\\\").replace("'", "\\'")
    saved = [o for o in read_overrides(Path(parent)) or []
             if override_key(o) not in ("schedule.horizons", "checkpoint.branch_from")]
    mine = [f"checkpoint.branch_from='{absolute}'"
            if override_key(o) == "checkpoint.branch_from" else o for o in overrides]
    merged = merge_overrides(saved, mine)
    return compose(config_name="config", overrides=merged), merged


def write_hydra_dir(run_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """``.hydra/`` as Hydra writes it (config, hydra, overrides), but only for a run that passed its
    checks (Hydra's own copy is switched off in configs/config.yaml: it is written before them)."""
    from hydra.core.hydra_config import HydraConfig

    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": HydraConfig.get()}), out / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), out / "overrides.yaml")


# Hydra creates the run dir, and any missing parents, before main() runs; a refused run must
# remove exactly those, wherever they are, and never a directory that was there before. Only
# watching os.mkdir from the start tells them apart: this audit hook notes every directory that
# os.mkdir is asked to make and that does not exist yet, while entry() runs main().
CREATED_DIRS: list[Path] = []
_recording = _hooked = False


def _note_mkdir(event: str, args: tuple) -> None:
    if event != "os.mkdir" or not _recording:
        return
    try:
        path, _, dir_fd = args
        if dir_fd in (None, -1) and not os.path.lexists(path):  # -1: no dir_fd given
            CREATED_DIRS.append(Path(os.path.abspath(os.fsdecode(path))))
    except Exception:  # an audit hook must never make the audited call fail
        pass


def forget_created_dirs() -> list[Path]:
    """The directories noted since the last call (the current job's), and start a new list."""
    created = list(CREATED_DIRS)
    CREATED_DIRS.clear()
    return created


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import MissingMandatoryValue

    from data.errors import DataError
    from engine.errors import HarnessError
    from engine.run import remove_empty_dirs, run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        cfg, overrides = resume_base(cfg, list(hc.overrides.task), run_dir)
        cfg, overrides = branch_base(cfg, overrides, run_dir)
        val = run(cfg, run_dir, on_start=lambda d: write_hydra_dir(d, cfg, overrides))["val_loss"]
        forget_created_dirs()
        return math.nan if val is None else val  # a sweeper wants a number: NaN marks no eval
    except (HarnessError, DataError, MissingMandatoryValue) as err:
        # Every rank of a torchrun job meets the same error: one copy is enough.
        if main_rank:
            print(f"\nerror: {err}\n", file=sys.stderr, flush=True)
        remove_empty_dirs(forget_created_dirs())  # each rank the ones it made
        if not main_rank:
            # torchrun stops every worker as soon as one exits: the others wait a little, so that
            # rank 0 (which may be a moment behind them) gets to print the error.
            time.sleep(REPORT_GRACE_S)
        sys.exit(2)
    except KeyboardInterrupt:
        # Ctrl-C before training started (once it has, engine.run turns signals into a stop
        # with a checkpoint): nothing to save.
        if main_rank:
            print("\ninterrupted before training started; nothing to save\n", file=sys.stderr,
                  flush=True)
        remove_empty_dirs(forget_created_dirs())
        sys.exit(130)


def entry() -> None:
    """`main()`, then exit; a worker of a multi-process torchrun job exits without interpreter
    finalization.

    After an elastic restart, a gloo worker on torch 2.13 sometimes aborts *after* the run has
    finished and written everything ("terminate called without an active exception" from a C++
    destructor during interpreter shutdown), and torchrun then reports the whole job as failed.
    By this point the engine has flushed metrics, checkpoints and W&B and destroyed the process
    group, so skipping finalization loses nothing.
    """
    global _recording, _hooked
    if not _hooked:  # once per process: audit hooks cannot be removed
        sys.addaudithook(_note_mkdir)
        _hooked = True
    _recording = True
    try:
        main()
        code = 0
    except SystemExit as stop:  # Hydra and our error path exit through SystemExit
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        _recording = False
    from engine.distributed import launched_by_torchrun

    if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
