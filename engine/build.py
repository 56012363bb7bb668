"""Config -> a ready :class:`~engine.trainer.Trainer`: data, model, optimizer, Hessian schedule,
precision, checkpointer. ``train.py`` (through :func:`engine.run.run`), the benchmarks and the
tests all build their trainers here, so what they measure is what training runs.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from engine.batching import plan_batches
from engine.branching import branch_points
from engine.checkpoint import Checkpointer
from engine.distributed import DistEnv
from evals import build_evals
from engine.errors import HarnessError
from engine.hessian import HessianRefresher
from engine.nonfinite import NonFiniteGuard
from engine.optimizers import build_optimizer
from engine.schedules import lr_schedule
from engine.trainer import Trainer, TrainSettings
from model import GPT, GPTConfig
from model.flops import device_peak_flops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``dtype`` config value (``auto`` or a :data:`DTYPES` name, as the schema and the tools'
    argument choices allow) -> torch dtype (``auto``: bf16 on a CUDA device that has it)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
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
    # Every other key of the data group's yaml is a source option, passed through as declared.
    optional = {k: v for k, v in OmegaConf.to_container(d, resolve=True).items()
                if k not in ("name", "source", "tokenizer", "dir", "prepare_if_missing",
                             "val_fraction", "seed")}

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
    """The ``model`` group over its preset; the vocabulary follows the data unless set."""
    # preset picks the shape and init_from the starting weights; neither is a GPTConfig field.
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.model).items()
                 if k not in ("preset", "init_from") and v is not None}
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


def init_from_hf(model: GPT, source: str, cfg: DictConfig, run_dir: Path, env: DistEnv,
                 data_vocab: int) -> None:
    """``model.init_from``: load a Hugging Face GPT-2 (local directory or hub id) into ``model``
    on every rank, before compile/DDP; the checkpoint must fit the run's model settings.

    A run that will resume from its own checkpoint skips this: the resume would overwrite these
    weights anyway (run() resumes after build_trainer), and skipping it means a resumed run needs
    neither the network nor the HF directory any more.
    """
    from engine.checkpoint import find_resume_checkpoint
    from model.hf import HFConversionError, load_hf_weights

    resume = find_resume_checkpoint(cfg.checkpoint.resume, run_dir)
    if resume is not None:
        if env.is_main:
            print(f"model.init_from={source} not loaded: the run resumes from {resume}", flush=True)
        return

    def load() -> dict[str, Any]:
        try:
            return load_hf_weights(model, source, data_vocab=data_vocab)
        except HFConversionError as err:
            raise HarnessError(str(err)) from err

    # Rank 0 first, so that a hub id is downloaded once into the HF cache, not by every rank.
    info = load() if env.is_main else None
    if env.is_distributed:
        dist.barrier()
        if not env.is_main:
            info = load()
    if env.is_main:
        pad = info["padding_rows"]
        print(f"model.init_from={source}: loaded Hugging Face GPT-2 weights (vocab "
              f"{info['hf_vocab_size']}" + (f"; {pad} padding rows set to the mean embedding"
                                            if pad else "") + ")", flush=True)


def train_settings(cfg: DictConfig) -> TrainSettings:
    """The ``train`` group as the loop's settings. Each value's type and range is the config
    check's (engine/schema.py); only what depends on several keys is checked here."""
    t = cfg.train
    if t.eval_interval and t.eval_batches < 1:
        raise HarnessError("train.eval_batches must be >= 1 when train.eval_interval > 0.")
    return TrainSettings(
        max_steps=t.max_steps, grad_clip=float(t.grad_clip),
        log_interval=t.log_interval, eval_interval=t.eval_interval, eval_batches=t.eval_batches,
        eval_at_start=t.eval_at_start, checkpoint_interval=cfg.checkpoint.interval,
        stop_at_step=t.stop_at_step, peak_flops=t.peak_flops,
        checkpoint_every_minutes=cfg.checkpoint.get("every_minutes") or None,
        branch_points=branch_points(cfg),
    )


def build_trainer(cfg: DictConfig, run_dir: str | Path, env: DistEnv) -> Trainer:
    """Everything ``cfg`` describes, assembled; checkpoints go to ``run_dir/checkpoints``.

    Checks the config's values (a :class:`HarnessError` names a bad one) and the data folder
    against ``cfg.data`` (rank 0 prepares it first when allowed); writes nothing else.
    """
    from data.loader import TokenLoader

    settings = train_settings(cfg)
    data_dir, meta = prepare_data(cfg, env)
    model_cfg = build_model_config(cfg, int(meta["vocab_size"]))
    block = model_cfg.block_size if cfg.train.block_size is None else cfg.train.block_size
    if block > model_cfg.block_size:
        raise HarnessError(
            f"train.block_size={block} is longer than the model's block size "
            f"{model_cfg.block_size}: positions past it have no embedding. Lower train.block_size "
            f"or set model.block_size={block}."
        )
    plan = plan_batches(cfg.train.global_batch_tokens, block, cfg.train.micro_batch_size,
                        env.world_size)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    raw_model = GPT(model_cfg)
    if cfg.model.get("init_from"):
        init_from_hf(raw_model, str(cfg.model.init_from), cfg, Path(run_dir), env,
                     int(meta["vocab_size"]))
    raw_model = raw_model.to(env.device)
    dtype = resolve_dtype(cfg.dtype, env.device)
    model: torch.nn.Module = torch.compile(raw_model) if cfg.compile else raw_model
    if env.is_distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    setup = build_optimizer(OmegaConf.to_container(cfg.optimizer), raw_model)

    flops_per_token = float(raw_model.flops_per_token())
    hessian = None
    if setup.hessian_estimator:
        hessian = HessianRefresher(
            setup.hessian_estimator, setup.k, plan, cfg.optimizer.get("hessian_micro_batches"),
            env, cfg.seed, flops_per_token,
            warm_start=bool(cfg.optimizer.get("hessian_warm_start", False)),
            grad_clip=settings.grad_clip)
    if settings.peak_flops is None and env.device.type == "cuda":
        settings.peak_flops = device_peak_flops(env.device, dtype)

    evals = build_evals(cfg.get("eval") or {}, meta["tokenizer"], rank=env.rank,
                        world_size=env.world_size)
    extra = {"config": OmegaConf.to_container(cfg, resolve=True), "data_meta": meta,
             "wandb_id": None}
    return Trainer(
        env=env, model=model, raw_model=raw_model, optim=setup, plan=plan, settings=settings,
        train_loader=TokenLoader(data_dir, "train", block, seed=cfg.seed, device=env.device),
        val_loader=TokenLoader(data_dir, "val", block, seed=cfg.seed, device=env.device),
        checkpointer=Checkpointer(Path(run_dir) / "checkpoints", cfg.checkpoint.keep_last,
                                  extra),
        nonfinite=NonFiniteGuard(cfg.train.on_nonfinite, int(cfg.train.max_rollbacks), env),
        flops_per_token=flops_per_token, autocast=autocast_factory(dtype, env.device),
        lr_schedule=lr_schedule(cfg),
        scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 else None, hessian=hessian,
        prefetch=(env.device.type == "cuda" if cfg.train.get("prefetch") is None
                  else bool(cfg.train.prefetch)),
        evals=evals,
    )
