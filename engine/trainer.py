"""The training loop: micro-batched steps, evaluation, the Hessian schedule, logging, checkpoints.

Read :meth:`Trainer.train_step` for one optimizer step and :meth:`Trainer.fit` for the loop.
"""
from __future__ import annotations

import contextlib
import io
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from engine.batching import BatchPlan
from engine.checkpoint import capture_rng, restore_rng, save_checkpoint
from engine.distributed import DistEnv, all_reduce_mean
from engine.errors import HarnessError
from engine.hessian import HessianRefresher
from engine.lr_schedule import lr_multiplier
from engine.metrics import MetricsLogger
from engine.optimizers import OptimizerSetup

NONFINITE_POLICIES = ("stop", "skip", "rollback")


@dataclass
class TrainSettings:
    """The knobs of the loop itself (the ``train`` config group, already validated)."""

    max_steps: int
    warmup_steps: int
    decay_steps: int
    min_lr_ratio: float
    grad_clip: float
    log_interval: int
    eval_interval: int
    eval_batches: int
    eval_at_start: bool
    checkpoint_interval: int
    keep_last: int
    on_nonfinite: str = "stop"
    max_rollbacks: int = 3
    stop_at_step: int | None = None
    peak_flops: float | None = None  # per device; None -> MFU unknown (logged as null)


@dataclass
class Counters:
    """Cumulative quantities carried across resumes (saved in every checkpoint)."""

    tokens_train: int = 0
    flops_train: float = 0.0
    elapsed: float = 0.0  # training wall-clock seconds, eval and checkpoint time excluded
    clipped_steps: int = 0
    skipped_steps: int = 0
    rollbacks: int = 0
    data_epoch: int = 0  # bumped by a rollback so the retried steps see fresh batches
    hessian_tokens: int = 0
    hessian_flops: float = 0.0
    hessian_seconds: float = 0.0


@dataclass
class Trainer:
    env: DistEnv
    model: torch.nn.Module  # what forward/backward runs through: DDP and/or compiled wrapper
    raw_model: torch.nn.Module  # the plain GPT: state dicts, eval, double backward
    optim: OptimizerSetup
    plan: BatchPlan
    settings: TrainSettings
    train_loader: Any
    val_loader: Any
    logger: MetricsLogger
    run_dir: Path
    flops_per_token: float
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None = None
    hessian: HessianRefresher | None = None
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)  # config, data_meta, wandb_id
    print_fn: Callable[..., None] = print
    step: int = 0
    counters: Counters = field(default_factory=Counters)
    last_val_loss: float = math.nan
    prefetch: bool = False  # on CUDA: overlap reading batches with compute

    def __post_init__(self) -> None:
        self.optimizer = self.optim.optimizer
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        dev = self.env.device
        self._clipped = torch.zeros((), device=dev)  # on-device count: no sync per step
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        self._last_loss = torch.zeros((), device=dev)
        self._last_gnorm = torch.zeros((), device=dev)

    # ----------------------------------------------------------------------------- batches
    def get_batch(self, step: int, micro: int, stream: str):
        """Rows of this rank at (step, micro-step) of ``stream`` (train / hessian)."""
        if self.counters.data_epoch:
            stream = f"{stream}@{self.counters.data_epoch}"
        rows, rank = self.plan.micro_batch_size, self.env.rank
        batch = self.train_loader.get(step, self.plan.row_start(micro, rank), rows, stream=stream)
        if self.prefetch and stream.startswith("train"):  # read the next one while this computes
            nxt_step, nxt_micro = (step, micro + 1) if micro + 1 < self.plan.accum_steps \
                else (step + 1, 0)
            self.train_loader.prefetch(nxt_step, self.plan.row_start(nxt_micro, rank), rows, stream)
        return batch

    # -------------------------------------------------------------------------- one step
    def train_step(self, step: int) -> None:
        """Forward/backward over the accumulation micro-batches, clip, optimizer step, and the
        Hessian refresh when due. Nothing here waits on the device unless policy=skip."""
        s = self.settings
        mult = lr_multiplier(step, s.warmup_steps, s.decay_steps, s.min_lr_ratio)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * mult

        accum = self.plan.accum_steps
        loss_sum = torch.zeros((), device=self.env.device)
        for micro in range(accum):
            x, y = self.get_batch(step, micro, "train")
            last = micro == accum - 1
            # DDP all-reduces gradients only on the last micro-step.
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") \
                else self.model.no_sync()
            with sync:
                with self.autocast():
                    _, loss = self.model(x, y)
                loss = loss / accum
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.detach()

        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = s.grad_clip if s.grad_clip > 0 else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if s.grad_clip > 0:
            self._clipped += (gnorm > s.grad_clip).float()
        finite = torch.isfinite(loss_sum)
        self._nonfinite |= ~finite
        self._last_loss, self._last_gnorm = loss_sum, gnorm

        # Under fp16 an inf gradient is the GradScaler's business (it skips and lowers the scale).
        ok = finite if self.scaler else finite & torch.isfinite(gnorm)
        if s.on_nonfinite == "skip" and not bool(ok):
            # The only per-step host sync, paid only by users who ask for this policy.
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite.zero_()
            self.counters.skipped_steps += 1
            return

        if hasattr(self.optimizer, "track_update_rms"):  # MuonAdamW pays for telemetry: log steps only
            self.optimizer.track_update_rms = (step + 1) % s.log_interval == 0 or step + 1 == s.max_steps
        kwargs = {"bs": self.hessian.tokens_per_refresh} if self.optim.name == "sophia" else {}
        if self.scaler:
            self.scaler.step(self.optimizer, **kwargs)
            self.scaler.update()
        else:
            self.optimizer.step(**kwargs)
        self.optimizer.zero_grad(set_to_none=True)

        if self.hessian is not None and self.hessian.due(step):
            self.hessian.refresh(step, self.model, self.raw_model, self.optimizer,
                                 self.get_batch, self.autocast)

    # --------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over a fixed set of validation batches, the same at every eval and for any
        number of ranks (rank r takes batches r, r + world, ...)."""
        self.raw_model.eval()
        rows = self.plan.micro_batch_size
        total = torch.zeros((), device=self.env.device)
        for i in range(self.env.rank, self.settings.eval_batches, self.env.world_size):
            x, y = self.val_loader.get(i, 0, rows, stream="val")
            with self.autocast():
                _, loss = self.raw_model(x, y)
            total += loss.float()
        self.raw_model.train()
        if self.env.is_distributed:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return (total / self.settings.eval_batches).item()

    # ----------------------------------------------------------------------- accounting
    @property
    def tokens_per_step(self) -> int:
        return self.plan.global_batch_tokens

    def _sync_hessian_counters(self) -> None:
        if self.hessian is not None:
            c = self.hessian.cost
            self.counters.hessian_tokens, self.counters.hessian_flops = c.tokens, c.flops
            self.counters.hessian_seconds = c.seconds

    def position(self) -> dict[str, Any]:
        """Where the run stands: step and the cumulative tokens, FLOPs and training seconds."""
        c = self.counters
        return {"step": self.step, "tokens": c.tokens_train + c.hessian_tokens,
                "tokens_hessian": c.hessian_tokens, "flops": c.flops_train + c.hessian_flops,
                "time/elapsed": c.elapsed}

    def _memory_peak(self) -> int:
        if self.env.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.env.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def _train_record(self, dt: float, tokens: int, flops: float) -> dict[str, Any]:
        """The metrics line for the current step. Values computed on device are read here."""
        loss = all_reduce_mean(self._last_loss.clone(), self.env).item()
        gnorm = self._last_gnorm.item()
        clipped = int(self.settings.grad_clip > 0 and gnorm > self.settings.grad_clip)
        self.counters.clipped_steps = int(self._clipped.item())
        rec = {**self.position(), "train/loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
               "throughput": tokens / dt if dt > 0 else None,
               "mfu": (flops / dt / (self.settings.peak_flops * self.env.world_size)
                       if self.settings.peak_flops and dt > 0 else None),
               "grad/norm": gnorm, "grad/clipped": clipped,
               "grad/clip_rate": self.counters.clipped_steps / max(1, self.step),
               "time/hessian": self.counters.hessian_seconds, "memory/peak": self._memory_peak()}
        telemetry = getattr(self.optimizer, "telemetry", None)
        for key, value in (telemetry() if telemetry else {}).items():
            rec[_TELEMETRY_KEYS.get(key, f"optim/{key}")] = value.item()
        if self.counters.skipped_steps:
            rec["nonfinite/skipped"] = self.counters.skipped_steps
        return rec

    # ----------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        self._sync_hessian_counters()
        rng = capture_rng(self.env.device)
        if self.env.is_distributed:  # each rank's dropout stream, so every rank resumes exactly
            buf = io.BytesIO()
            torch.save(rng, buf)  # all_gather_object cannot carry tensors inside dicts on gloo
            blobs = [None] * self.env.world_size
            dist.all_gather_object(blobs, buf.getvalue())
            all_rng = [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]
        else:
            all_rng = [rng]
        return {"step": self.step, "model": self.raw_model.state_dict(),
                "rank_divergence": self._rank_divergence(),
                "model_config": dict(vars(self.raw_model.config)),
                "optimizer": self.optimizer.state_dict(), "optimizer_name": self.optim.name,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": all_rng, "counters": dict(vars(self.counters)), **self.checkpoint_extra}

    def _rank_divergence(self) -> float:
        """Largest difference between rank 0's and another rank's parameter and optimizer-state
        checksums (0.0 for one process). DDP must keep ranks identical; a non-zero value means a
        bug or a faulty device, so it is recorded in every checkpoint and warned about."""
        if not self.env.is_distributed:
            return 0.0
        tensors = [p.detach() for p in self.raw_model.parameters()]
        tensors += [v for st in self.optimizer.state.values() for v in st.values()
                    if torch.is_tensor(v) and v.dim() > 0]
        sums = torch.stack([t.double().sum() for t in tensors])
        gathered = [torch.empty_like(sums) for _ in range(self.env.world_size)]
        dist.all_gather(gathered, sums)
        divergence = max((g - gathered[0]).abs().max().item() for g in gathered)
        if divergence and self.env.is_main:
            self.print_fn(f"warning: ranks diverged (checksum difference {divergence:.3g})", flush=True)
        return divergence

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("optimizer_name") != self.optim.name:
            raise HarnessError(
                f"The checkpoint was written by a run with optimizer={state.get('optimizer_name')}, "
                f"this run uses optimizer={self.optim.name}. Resume with the same optimizer or "
                f"start a fresh run."
            )
        ours = dict(vars(self.raw_model.config))
        if state["model_config"] != ours:
            diff = {k: (state["model_config"].get(k), v) for k, v in ours.items()
                    if state["model_config"].get(k) != v}
            raise HarnessError(f"The checkpoint's model differs from this run's: {diff} "
                               f"(checkpoint, run). Resume with the same model settings.")
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.counters = Counters(**state["counters"])
        self._clipped.fill_(self.counters.clipped_steps)
        if self.hessian is not None:
            c = self.hessian.cost
            c.tokens, c.flops = self.counters.hessian_tokens, self.counters.hessian_flops
            c.seconds = self.counters.hessian_seconds
        rngs = state["rng"]
        restore_rng(rngs[self.env.rank] if len(rngs) == self.env.world_size else rngs[0],
                    self.env.device)

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes; every rank takes part in gathering RNG)."""
        if self._nonfinite_seen():
            return None  # never put a NaN model over a good checkpoint
        state = self.state_dict()
        if not self.env.is_main:
            return None
        return save_checkpoint(state, self.run_dir / "checkpoints", self.step, self.settings.keep_last)

    def _nonfinite_seen(self) -> bool:
        flag = self._nonfinite.float().clone()
        if self.env.is_distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _handle_nonfinite(self) -> None:
        """Called where a non-finite loss has been seen: stop, or roll back to the last checkpoint."""
        from engine.checkpoint import list_checkpoints, load_checkpoint

        policy = self.settings.on_nonfinite
        found = list_checkpoints(self.run_dir / "checkpoints")
        if policy == "rollback" and found and self.counters.rollbacks < self.settings.max_rollbacks:
            rollbacks, epoch = self.counters.rollbacks + 1, self.counters.data_epoch + 1
            self.load_state_dict(load_checkpoint(found[-1]))
            self.counters.rollbacks, self.counters.data_epoch = rollbacks, epoch
            self._nonfinite.zero_()
            self.print_fn(f"non-finite loss: rolled back to step {self.step} "
                          f"(rollback {rollbacks} of at most {self.settings.max_rollbacks}), "
                          f"continuing on fresh batches", flush=True)
            return
        reason = ("no checkpoint to roll back to" if policy == "rollback" and not found else
                  f"{self.counters.rollbacks} rollbacks already" if policy == "rollback" else
                  "train.on_nonfinite=stop")
        raise HarnessError(
            f"The training loss became non-finite (NaN or inf) at or before step {self.step} "
            f"({reason}). No checkpoint was written after it, so the last checkpoint is good. Lower "
            f"optimizer.lr, raise train.warmup_steps, set train.grad_clip, use bf16 instead of fp16, "
            f"or set train.on_nonfinite=rollback to retry from the last checkpoint on fresh batches."
        )

    # ----------------------------------------------------------------------------- loop
    def fit(self) -> None:
        """Train to ``max_steps`` (or ``stop_at_step``), logging, evaluating and checkpointing."""
        s = self.settings
        stop = min(s.max_steps, s.stop_at_step) if s.stop_at_step else s.max_steps
        if self.hessian is not None and self.hessian.warm_start and self.step == 0:
            self.hessian.refresh(-1, self.model, self.raw_model, self.optimizer,
                                 self.get_batch, self.autocast)
        if s.eval_at_start and self.step == 0 and s.eval_interval > 0:
            self.last_val_loss = self.evaluate()
            if self.env.is_main:
                self.logger.log({**self.position(), "val/loss": self.last_val_loss})

        last_tokens, last_flops, last_elapsed = self._totals()
        t_mark = time.perf_counter()
        while self.step < stop:
            self.train_step(self.step)
            self.step += 1
            self.counters.tokens_train += self.tokens_per_step
            self.counters.flops_train += self.tokens_per_step * self.flops_per_token
            self._sync_hessian_counters()

            # An early stop (stop_at_step) checkpoints but adds no extra log or eval line, so a
            # resumed run's metrics are exactly those of an uninterrupted one.
            log_now = self.step % s.log_interval == 0 or self.step == s.max_steps
            eval_now = s.eval_interval > 0 and (self.step % s.eval_interval == 0
                                                or self.step == s.max_steps)
            ckpt_now = (s.checkpoint_interval > 0 and self.step % s.checkpoint_interval == 0) \
                or self.step == stop
            if not (log_now or eval_now or ckpt_now):
                continue
            if self.env.device.type == "cuda":
                torch.cuda.synchronize(self.env.device)
            now = time.perf_counter()
            self.counters.elapsed += now - t_mark
            if self._nonfinite_seen():
                self._handle_nonfinite()
                last_tokens, last_flops, last_elapsed = self._totals()
                t_mark = time.perf_counter()
                continue

            record: dict[str, Any] = {}
            if log_now:
                tokens, flops, elapsed = self._totals()
                record.update(self._train_record(elapsed - last_elapsed, tokens - last_tokens,
                                                 flops - last_flops))
                last_tokens, last_flops, last_elapsed = tokens, flops, elapsed
            if eval_now:  # excluded from time/elapsed: t_mark is reset after it
                self.last_val_loss = self.evaluate()
                record.update({**self.position(), "val/loss": self.last_val_loss})
            if record and self.env.is_main:
                self.logger.log(record)
            if ckpt_now:
                self.save()
            t_mark = time.perf_counter()

    def _totals(self) -> tuple[int, float, float]:
        pos = self.position()
        return pos["tokens"], pos["flops"], pos["time/elapsed"]


# Optimizer telemetry names -> metric keys of DESIGN section 4.
_TELEMETRY_KEYS = {"clip_frac": "sophia/clip_frac", "win_rate": "sophia/win_rate",
                   "hessian_l1": "hessian/l1", "hessian_l2": "hessian/l2",
                   "update_rms": "optim/update_rms"}
