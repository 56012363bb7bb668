"""Hydra entry point: ``python train.py optimizer=sophia model=gpt2-small`` or under torchrun.

Everything else lives in ``engine/``; this file only composes the config, keeps all ranks of a
torchrun job in one run directory, and turns user errors into a paragraph and a non-zero exit.
"""
from __future__ import annotations

import datetime
import math
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf


def run_name(prefix: str) -> str:
    """Run-dir name that every rank of one torchrun job computes identically.

    torchrun's run id (``--rdzv-id``, required for multi-node) or, for a single-node launch, the
    torchrun agent's pid: both are shared by the workers and survive an elastic restart, so a
    restarted job finds its own checkpoints. A plain ``python train.py`` gets a timestamp.
    """
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


def write_hydra_dir(run_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """``.hydra/`` as Hydra writes it (config, hydra, overrides), but only for a run that passed its
    checks (Hydra's own copy is switched off in configs/config.yaml: it is written before them)."""
    from hydra.core.hydra_config import HydraConfig

    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": HydraConfig.get()}), out / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), out / "overrides.yaml")


def remove_if_empty(run_dir: Path) -> None:
    """Drop the empty run dir Hydra made for a refused run, and its parents (``outputs/<date>``)
    up to the working directory as long as they are empty too."""
    cwd = Path.cwd().resolve()
    folder = run_dir.resolve()
    while folder != cwd and cwd in folder.parents:
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            return
        folder = folder.parent


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import MissingMandatoryValue

    from data.errors import DataError
    from engine.errors import HarnessError
    from engine.run import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        cfg, overrides = resume_base(cfg, list(hc.overrides.task), run_dir)
        val = run(cfg, run_dir, on_start=lambda d: write_hydra_dir(d, cfg, overrides))["val_loss"]
        return math.nan if val is None else val  # a sweeper wants a number: NaN marks no eval
    except (HarnessError, DataError, MissingMandatoryValue) as err:
        # Every rank of a torchrun job meets the same error: one copy is enough.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\nerror: {err}\n", file=sys.stderr, flush=True)
            remove_if_empty(run_dir)
        sys.exit(2)
    except KeyboardInterrupt:
        # Ctrl-C before training started (once it has, engine.run turns signals into a stop
        # with a checkpoint): nothing to save.
        if int(os.environ.get("RANK", "0")) == 0:
            print("\ninterrupted before training started; nothing to save\n", file=sys.stderr,
                  flush=True)
            remove_if_empty(run_dir)
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
    try:
        main()
        code = 0
    except SystemExit as stop:  # Hydra and our error path exit through SystemExit
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
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
