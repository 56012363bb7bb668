"""The training loop: micro-batched steps, evaluation and the schedule of logs and checkpoints.

Read :meth:`Trainer.train_step` for one optimizer step and :meth:`Trainer.fit` for the loop. The
parts it drives live beside it: the Hessian refresh (``engine.hessian``), the metrics record
(``engine.metrics``), checkpoints (``engine.checkpoint``) and the non-finite policy
(``engine.nonfinite``). ``engine.build`` assembles a Trainer from a config.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from engine.batching import BatchPlan
from engine.checkpoint import Checkpointer
from engine.distributed import DistEnv, StepVote, StopRequest, grad_sync
from engine.hessian import HessianRefresher
from engine.metrics import MetricsLogger, StepStats
from engine.nonfinite import NonFiniteGuard
from engine.optimizers import OptimizerSetup
from evals import DownstreamEval


@dataclass
class TrainSettings:
    """The knobs of the loop itself (the ``train`` config group, already validated)."""

    max_steps: int
    grad_clip: float
    log_interval: int
    eval_interval: int
    eval_batches: int
    eval_at_start: bool
    checkpoint_interval: int
    stop_at_step: int | None = None
    peak_flops: float | None = None  # per device; None -> MFU unknown (logged as null)
    # Also checkpoint once this many minutes of wall-clock have passed since the last checkpoint
    # (rank 0's clock decides); None or 0: off.
    checkpoint_every_minutes: float | None = None
    # Steps whose checkpoint is kept for cooldown branches (engine/branching.py), beside the
    # rotating ones.
    branch_points: frozenset[int] = frozenset()


@dataclass
class Counters:
    """Cumulative quantities carried across resumes (saved in every checkpoint)."""

    tokens_train: int = 0
    flops_train: float = 0.0
    elapsed: float = 0.0  # training wall-clock seconds, eval and checkpoint time excluded
    skipped_steps: int = 0
    rollbacks: int = 0
    data_epoch: int = 0  # bumped by a rollback so the retried steps see fresh batches


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
    checkpointer: Checkpointer
    nonfinite: NonFiniteGuard
    flops_per_token: float
    autocast: Callable[[], contextlib.AbstractContextManager]
    lr_schedule: Callable[[int], float]  # optimizer step -> multiplier on each group's base lr
    scaler: torch.amp.GradScaler | None = None
    hessian: HessianRefresher | None = None
    logger: MetricsLogger = field(default_factory=lambda: MetricsLogger([]))
    prefetch: bool = False  # on CUDA: overlap reading batches with compute
    evals: list[DownstreamEval] = field(default_factory=list)  # the eval group's, when on
    step: int = 0
    counters: Counters = field(default_factory=Counters)
    last_val_loss: float = math.nan
    # Set by engine.run while stop signals are caught; fit() then ends at the first step boundary
    # the ranks agree on after one arrives, with a checkpoint, and records the signal here.
    stop_request: StopRequest | None = None
    stopped_by: int | None = None
    clock: Callable[[], float] = time.monotonic  # the wall-clock of checkpoint.every_minutes

    def __post_init__(self) -> None:
        self.optimizer = self.optim.optimizer
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.stats = StepStats(self.env.device, self.settings.grad_clip)

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

    def is_log_step(self, step: int) -> bool:
        """Is a metrics line written after ``step`` steps have completed?"""
        return step % self.settings.log_interval == 0 or step == self.settings.max_steps

    def train_step(self, step: int) -> None:
        """Forward/backward over the accumulation micro-batches, clip, optimizer step, and the
        Hessian refresh when due. Nothing here waits on the device unless policy=skip."""
        s = self.settings
        mult = self.lr_schedule(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * mult

        accum = self.plan.accum_steps
        loss = torch.zeros((), device=self.env.device)
        for micro in range(accum):
            x, y = self.get_batch(step, micro, "train")
            # DDP all-reduces gradients only on the last micro-step.
            with grad_sync(self.model, micro == accum - 1):
                with self.autocast():
                    _, micro_loss = self.model(x, y)
                micro_loss = micro_loss / accum
                (self.scaler.scale(micro_loss) if self.scaler else micro_loss).backward()
            loss += micro_loss.detach()

        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                               s.grad_clip if s.grad_clip > 0 else math.inf)
        self.stats.observe(loss, gnorm)
        if self.nonfinite.should_skip(loss, gnorm, scaled=self.scaler is not None):
            self.optimizer.zero_grad(set_to_none=True)
            self.counters.skipped_steps += 1
            return

        self.optim.want_telemetry(self.is_log_step(step + 1))
        kwargs = self.hessian.step_kwargs() if self.hessian else {}
        if self.scaler:
            self.scaler.step(self.optimizer, **kwargs)
            self.scaler.update()
        else:
            self.optimizer.step(**kwargs)
        self.optimizer.zero_grad(set_to_none=True)

        if self.hessian is not None and self.hessian.due(step):
            self.refresh_hessian(step)

    def refresh_hessian(self, step: int) -> None:
        self.hessian.refresh(step, self.model, self.raw_model, self.optimizer, self.get_batch,
                             self.autocast)

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

    def downstream(self, step: int | None = None) -> dict[str, float]:
        """The metrics of every downstream evaluation due at ``step`` (None: all of them)."""
        record: dict[str, float] = {}
        for evaluation in self.evals:
            if step is None or evaluation.due(step, self.settings.max_steps):
                record.update(evaluation(self.raw_model, self.env.device, self.autocast,
                                         self.env.rank, self.env.world_size))
        return record

    def position(self) -> dict[str, Any]:
        """Where the run stands: step and the cumulative tokens, FLOPs and training seconds."""
        c, h = self.counters, self.hessian.cost if self.hessian else None
        return {"step": self.step, "tokens": c.tokens_train + (h.tokens if h else 0),
                "tokens_hessian": h.tokens if h else 0,
                "flops": c.flops_train + (h.flops if h else 0.0), "time/elapsed": c.elapsed}

    def fit(self) -> None:
        """Train to ``max_steps`` (or ``stop_at_step``), logging, evaluating and checkpointing.

        With a :attr:`stop_request` whose signal has arrived, the loop ends early at a step every
        rank agrees on, after checkpointing it; :attr:`stopped_by` then holds the signal.
        """
        s = self.settings
        stop = min(s.max_steps, s.stop_at_step) if s.stop_at_step else s.max_steps
        if self.hessian is not None and self.hessian.warm_start and self.step == 0:
            self.refresh_hessian(-1)
        if s.eval_at_start and self.step == 0 and (s.eval_interval > 0 or self.evals):
            record = self.position()
            if s.eval_interval > 0:
                self.last_val_loss = record["val/loss"] = self.evaluate()
            record.update(self.downstream())
            if self.env.is_main:
                self.logger.log(record)

        every_s = 60.0 * s.checkpoint_every_minutes if s.checkpoint_every_minutes else None
        # Only a run that can be signalled or checkpoints on the clock needs the per-step vote.
        vote = StepVote(self.env) if self.stop_request is not None or every_s else None
        last_save = self.clock()
        last = self.position()  # the previous log point: throughput is over the last interval
        t_mark = time.perf_counter()
        while self.step < stop:
            self.train_step(self.step)
            self.step += 1
            self.counters.tokens_train += self.plan.global_batch_tokens
            self.counters.flops_train += self.plan.global_batch_tokens * self.flops_per_token

            # An early stop (stop_at_step, a signal) checkpoints but adds no extra log or eval
            # line, so a resumed run's metrics are exactly those of an uninterrupted one.
            log_now = self.is_log_step(self.step)
            eval_now = s.eval_interval > 0 and (self.step % s.eval_interval == 0
                                                or self.step == s.max_steps)
            downstream_now = any(e.due(self.step, s.max_steps) for e in self.evals)
            kept_now = self.step in s.branch_points
            ckpt_now = (s.checkpoint_interval > 0 and self.step % s.checkpoint_interval == 0) \
                or self.step == stop
            stop_signal, timed_save = 0, False
            if vote is not None:
                due = every_s is not None and self.env.is_main \
                    and self.clock() - last_save >= every_s
                signum = self.stop_request.signum if self.stop_request else None
                stop_signal, timed_save = vote.exchange(signum or 0, due)
                if ckpt_now or due:
                    # The clock restarts as soon as a checkpoint is planned (with several ranks
                    # one step before it is written), so one due time never gives two of them.
                    last_save = self.clock()
                ckpt_now = ckpt_now or timed_save or bool(stop_signal)
            if not (log_now or eval_now or downstream_now or ckpt_now or kept_now):
                continue
            if self.env.device.type == "cuda":
                torch.cuda.synchronize(self.env.device)
            self.counters.elapsed += time.perf_counter() - t_mark
            if self.nonfinite.seen():
                self.nonfinite.recover(self)
                last, t_mark = self.position(), time.perf_counter()
                continue

            record: dict[str, Any] = {}
            if log_now:
                now = self.position()
                record.update(self.stats.record(
                    now, env=self.env, seconds=now["time/elapsed"] - last["time/elapsed"],
                    tokens=now["tokens"] - last["tokens"], flops=now["flops"] - last["flops"],
                    lr=self.optimizer.param_groups[0]["lr"], peak_flops=s.peak_flops,
                    hessian_seconds=self.hessian.cost.seconds if self.hessian else 0.0,
                    telemetry=self.optim.telemetry(), skipped_steps=self.counters.skipped_steps))
                last = now
            if eval_now:  # excluded from time/elapsed: t_mark is reset after it
                self.last_val_loss = self.evaluate()
                record.update({**self.position(), "val/loss": self.last_val_loss})
            if downstream_now:  # likewise excluded from time/elapsed
                record.update({**self.position(), **self.downstream(self.step)})
            if record and self.env.is_main:
                self.logger.log(record)
            if ckpt_now:
                self.checkpointer.save(self)
                last_save = self.clock()
            if kept_now:
                self.checkpointer.save(self, kept=True)
            t_mark = time.perf_counter()
            if stop_signal:
                self.stopped_by = stop_signal
                break
        if vote is not None:
            vote.close()
