"""What the loop does when the training loss turns NaN or inf: stop, skip the step, or roll back.

The loss is checked on the device every step and read by the host only on log, eval and
checkpoint steps (``skip`` alone needs a per-step read, paid only by users who choose it). A
checkpoint is never written after a non-finite loss, so the newest one is always good.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from engine.distributed import DistEnv
from engine.errors import HarnessError

if TYPE_CHECKING:
    from engine.trainer import Trainer

POLICIES = ("stop", "skip", "rollback")


class NonFiniteGuard:
    """Watches the loss for ``train.on_nonfinite`` = stop | skip | rollback."""

    def __init__(self, policy: str, max_rollbacks: int, env: DistEnv):
        if policy not in POLICIES:
            raise HarnessError(f"train.on_nonfinite={policy!r}; choose one of {', '.join(POLICIES)}.")
        self.policy, self.max_rollbacks, self.env = policy, max_rollbacks, env
        self.flag = torch.zeros((), dtype=torch.bool, device=env.device)

    def should_skip(self, loss: torch.Tensor, gnorm: torch.Tensor, *, scaled: bool) -> bool:
        """Note this step's loss; True when the step must be dropped (policy ``skip``).

        Under fp16 an inf gradient is the GradScaler's business (``scaled``): it skips the step
        and lowers the scale itself.
        """
        finite = torch.isfinite(loss)
        self.flag |= ~finite
        if self.policy != "skip":
            return False
        ok = finite if scaled else finite & torch.isfinite(gnorm)
        if bool(ok):
            return False
        self.flag.zero_()
        return True

    def seen(self) -> bool:
        """Has any rank seen a non-finite loss since the last check? (a collective)"""
        flag = self.flag.float().clone()
        if self.env.is_distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def recover(self, trainer: Trainer) -> None:
        """Roll back to the last checkpoint (on fresh batches), or raise the error that stops."""
        latest = trainer.checkpointer.latest()
        counters = trainer.counters
        if self.policy == "rollback" and latest is not None and counters.rollbacks < self.max_rollbacks:
            rollbacks, epoch = counters.rollbacks + 1, counters.data_epoch + 1
            trainer.checkpointer.restore(trainer, latest)
            trainer.counters.rollbacks, trainer.counters.data_epoch = rollbacks, epoch
            self.flag.zero_()
            if self.env.is_main:
                print(f"non-finite loss: rolled back to step {trainer.step} (rollback {rollbacks} "
                      f"of at most {self.max_rollbacks}), continuing on fresh batches", flush=True)
            return
        reason = ("no checkpoint to roll back to" if self.policy == "rollback" and latest is None
                  else f"{counters.rollbacks} rollbacks already" if self.policy == "rollback"
                  else "train.on_nonfinite=stop")
        raise HarnessError(
            f"The training loss became non-finite (NaN or inf) at or before step {trainer.step} "
            f"({reason}). No checkpoint was written after it, so the last checkpoint is good. Lower "
            f"optimizer.lr, raise train.warmup_steps, set train.grad_clip, use bf16 instead of fp16, "
            f"or set train.on_nonfinite=rollback to retry from the last checkpoint on fresh batches."
        )
