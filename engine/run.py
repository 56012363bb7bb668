"""Composition: a resolved config -> data, model, optimizer, Hessian schedule, sinks -> Trainer.

:func:`run` is what ``train.py`` calls inside Hydra; it returns the final validation loss so
Hydra sweepers (Optuna) can optimise it.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from engine.batching import plan_batches
from engine.checkpoint import load_resume_checkpoint
from engine.console_log import tee_console
from engine.config_check import check_config
from engine.distributed import DistEnv, broadcast_object, setup_distributed, teardown_distributed
from engine.errors import HarnessError
from engine.hessian import HessianRefresher
from engine.metrics import ConsoleSink, JsonlSink, MetricsLogger, WandbSink
from engine.optimizers import build_optimizer
from engine.resume import check_resume_config
from engine.summary import format_summary, summarize_run, write_summary
from engine.trainer import NONFINITE_POLICIES, Trainer, TrainSettings
from model import GPT, GPTConfig
from model.flops import device_peak_flops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise HarnessError(f"dtype={name!r} is not one of auto, {', '.join(DTYPES)}.")
    if name == "float16" and device.type != "cuda":
        raise HarnessError("dtype=float16 needs a CUDA device; use bfloat16 or float32 on CPU.")
    return DTYPES[name]


def autocast_factory(dtype: torch.dtype, device: torch.device):
    """A zero-argument callable returning the mixed-precision context for ``dtype`` (none for fp32)."""
    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)
    return autocast


def prepare_data(cfg: DictConfig, env: DistEnv) -> tuple[Path, dict[str, Any]]:
    """The data directory and its meta, checked against ``cfg.data`` (a folder prepared from
    another source or with other settings is refused, never trained on); rank 0 prepares a
    missing one first when ``data.prepare_if_missing``. ``data.source=null`` (data=prepared)
    takes the folder as it is."""
    from data.bins import read_meta
    from data.prepare import ensure_prepared

    d = cfg.data
    if d.source is None:
        return Path(d.dir), read_meta(d.dir)
    optional = {k: d.get(k) for k in ("hf_id", "revision", "text_column", "max_docs",
                                      "split_blank_lines")}

    def ensure(allow_prepare: bool) -> dict[str, Any]:
        return ensure_prepared(d.source, d.dir, prepare_if_missing=allow_prepare,
                               tokenizer=d.tokenizer, val_fraction=d.val_fraction, seed=d.seed,
                               **optional)

    meta = ensure(bool(d.get("prepare_if_missing", False))) if env.is_main else None
    if env.is_distributed:
        dist.barrier()
        if not env.is_main:
            meta = ensure(False)
    return Path(d.dir), meta


def build_model_config(cfg: DictConfig, data_vocab: int) -> GPTConfig:
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.model).items()
                 if k != "preset" and v is not None}
    if "vocab_size" not in overrides:
        overrides["vocab_size"] = -(-data_vocab // 64) * 64  # pad to a multiple of 64, as GPT-2
    elif overrides["vocab_size"] < data_vocab:
        raise HarnessError(
            f"model.vocab_size={overrides['vocab_size']} is smaller than the data's vocabulary "
            f"({data_vocab} ids): token ids would index past the embedding. Leave "
            f"model.vocab_size=null to follow the data, or set it >= {data_vocab}."
        )
    try:
        return GPTConfig.from_preset(cfg.model.preset, **overrides)
    except ValueError as err:
        raise HarnessError(f"Invalid model settings: {err}") from err


def train_settings(cfg: DictConfig) -> TrainSettings:
    t = cfg.train
    if t.on_nonfinite not in NONFINITE_POLICIES:
        raise HarnessError(f"train.on_nonfinite={t.on_nonfinite!r}; choose one of "
                           f"{', '.join(NONFINITE_POLICIES)}.")
    for key in ("max_steps", "log_interval"):
        if not isinstance(t[key], int) or t[key] < 1:
            raise HarnessError(f"train.{key}={t[key]!r} must be an integer >= 1.")
    for key in ("warmup_steps", "eval_interval", "eval_batches"):
        if not isinstance(t[key], int) or t[key] < 0:
            raise HarnessError(f"train.{key}={t[key]!r} must be an integer >= 0.")
    if t.grad_clip < 0:
        raise HarnessError(f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping).")
    if not 0 <= t.min_lr_ratio <= 1:
        raise HarnessError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1].")
    if t.eval_interval and t.eval_batches < 1:
        raise HarnessError("train.eval_batches must be >= 1 when train.eval_interval > 0.")
    return TrainSettings(
        max_steps=t.max_steps, warmup_steps=t.warmup_steps,
        decay_steps=t.decay_steps if t.decay_steps is not None else t.max_steps,
        min_lr_ratio=float(t.min_lr_ratio), grad_clip=float(t.grad_clip),
        log_interval=t.log_interval, eval_interval=t.eval_interval, eval_batches=t.eval_batches,
        eval_at_start=bool(t.eval_at_start), checkpoint_interval=int(cfg.checkpoint.interval),
        keep_last=int(cfg.checkpoint.keep_last), on_nonfinite=t.on_nonfinite,
        max_rollbacks=int(t.max_rollbacks), stop_at_step=t.stop_at_step,
        peak_flops=t.peak_flops,
    )


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


def run(cfg: DictConfig, run_dir: str | os.PathLike,
        on_start: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Train as configured; returns the run's summary (``val_loss``, ``step``, ``run_dir``, ...).

    ``on_start(run_dir)`` is called on rank 0 once every check has passed, just before the run
    dir's files are written: a refused run writes nothing.
    """
    check_config(cfg)
    env = setup_distributed(cfg.device)
    logger = MetricsLogger([])
    try:
        with contextlib.ExitStack() as console:
            try:
                return _run(cfg, Path(run_dir), env, logger, on_start, console)
            finally:
                logger.close()  # inside the console copy: W&B's closing lines are kept too
    finally:
        teardown_distributed()


def _run(cfg: DictConfig, run_dir: Path, env: DistEnv, logger: MetricsLogger,
         on_start: Callable[[Path], None] | None, console: contextlib.ExitStack) -> dict[str, Any]:
    from data.loader import TokenLoader

    settings = train_settings(cfg)
    if cfg.wandb.mode not in ("online", "offline", "disabled"):
        raise HarnessError(f"wandb.mode={cfg.wandb.mode!r}; choose online, offline or disabled.")
    # Rank 0's run dir wins, so every rank reads and writes the same place whatever it composed.
    run_dir = Path(broadcast_object(str(run_dir), env))
    data_dir, meta = prepare_data(cfg, env)
    model_cfg = build_model_config(cfg, int(meta["vocab_size"]))
    block = cfg.train.block_size or model_cfg.block_size
    if block > model_cfg.block_size:
        raise HarnessError(
            f"train.block_size={block} is longer than the model's block size "
            f"{model_cfg.block_size}: positions past it have no embedding. Lower train.block_size "
            f"or set model.block_size={block}."
        )
    train_loader = TokenLoader(data_dir, "train", block, seed=cfg.seed, device=env.device)
    val_loader = TokenLoader(data_dir, "val", block, seed=cfg.seed, device=env.device)
    plan = plan_batches(cfg.train.global_batch_tokens, block, cfg.train.micro_batch_size,
                        env.world_size)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    raw_model = GPT(model_cfg).to(env.device)
    dtype = resolve_dtype(cfg.dtype, env.device)
    model: torch.nn.Module = torch.compile(raw_model) if cfg.compile else raw_model
    if env.is_distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    setup = build_optimizer(OmegaConf.to_container(cfg.optimizer), raw_model, env.device)

    autocast = autocast_factory(dtype, env.device)
    flops_per_token = float(raw_model.flops_per_token())
    hessian = None
    if setup.hessian_estimator:
        hessian = HessianRefresher(
            setup.hessian_estimator, setup.hessian_interval, plan,
            cfg.optimizer.get("hessian_micro_batches"), env, cfg.seed, flops_per_token,
            warm_start=bool(cfg.optimizer.get("hessian_warm_start", False)),
            grad_clip=settings.grad_clip)
    if settings.peak_flops is None and env.device.type == "cuda":
        settings.peak_flops = device_peak_flops(env.device, dtype)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    trainer = Trainer(
        env=env, model=model, raw_model=raw_model, optim=setup, plan=plan, settings=settings,
        train_loader=train_loader, val_loader=val_loader, logger=logger, run_dir=run_dir,
        flops_per_token=flops_per_token, autocast=autocast,
        scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 else None, hessian=hessian,
        checkpoint_extra={"config": resolved, "data_meta": meta, "wandb_id": None},
        prefetch=(env.device.type == "cuda" if cfg.train.get("prefetch") is None
                  else bool(cfg.train.prefetch)),
    )
    # Resume before touching the run dir's files: a refused (mismatched) checkpoint must leave
    # its run's config and metrics as they were.
    # Messages are held until the run dir's console copy (train.log) is open.
    notes: list[str] = []
    resumed = load_resume_checkpoint(cfg.checkpoint.resume, run_dir, warn=notes.append)
    state = None
    if resumed is not None:
        resume_path, state = resumed
        trainer.load_state_dict(state)
        changes = check_resume_config(state.get("config", {}), resolved, source=str(resume_path),
                                      allow=bool(cfg.checkpoint.get("allow_config_change")))
        notes += [f"WARNING: resuming with {key} changed from {old!r} to {new!r} "
                  f"(checkpoint.allow_config_change=true)" for key, old, new in changes]
        trainer.checkpoint_extra["wandb_id"] = state.get("wandb_id")
        notes.append(f"resumed from {resume_path} at step {trainer.step}")

    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        console.enter_context(tee_console(run_dir / "train.log"))
        for note in notes:
            print(note, flush=True)
        if on_start is not None:
            on_start(run_dir)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        logger.sinks.append(JsonlSink(run_dir / "metrics.jsonl",
                                      truncate_after_step=trainer.step if state else None))
        logger.sinks.append(ConsoleSink(total_steps=settings.max_steps, start_step=trainer.step))
        if cfg.wandb.mode != "disabled":
            sink = WandbSink(cfg.wandb.mode, cfg.wandb.project, cfg.wandb.entity,
                             _sweep_group(cfg), cfg.wandb.name or run_dir.name, resolved, run_dir,
                             trainer.checkpoint_extra["wandb_id"])
            trainer.checkpoint_extra["wandb_id"] = sink.run_id
            logger.sinks.append(sink)
        print(f"run dir {run_dir} | {setup.name} | {raw_model.num_params() / 1e6:.2f}M params | "
              f"{plan.global_batch_tokens} tokens/step = {plan.micro_batch_size} x {block} x "
              f"{plan.accum_steps} accum x {env.world_size} ranks | {dtype} on {env.device}",
              flush=True)
    trainer.fit()
    if not env.is_main:
        val = trainer.last_val_loss
        return {"val_loss": None if math.isnan(val) else val, "step": trainer.step,
                "run_dir": str(run_dir)}
    logger.close()  # flush metrics.jsonl before the summary reads it
    summary = summarize_run(run_dir, trainer.position())
    write_summary(run_dir, summary)
    print(format_summary(summary), flush=True)
    return summary
