"""The Sophia Hessian refresh schedule: when, on which batches, and at what cost.

See docs/optimizers.md#hessian-estimators-and-refresh-schedule for the rules this implements.

After the regular optimizer step of an iteration with ``step % k == k - 1`` (the official timing)
the refresher draws fresh micro-batches from the ``hessian`` stream and

- GNB (SophiaG, ``gnb``, the official estimator): samples y ~ softmax(logits), backpropagates the
  mean CE against y (averaged across micro-batches, and across ranks by DDP), optionally clips like
  the official script, then calls ``optimizer.update_hessian()``; ``bs`` for the next steps is the
  number of tokens that loss was averaged over, across all ranks.
- GNB mean of squares (SophiaG, ``gnb_msq``): the same passes and labels, but each micro-batch's
  sampled-label gradient g_j is squared on its own (no DDP all-reduce of gradients), the squares are
  summed over micro-batches and ranks (one all-reduce), and the estimate
  mean_j(tokens_j * g_j^2) goes to ``optimizer.update_hessian(estimate, bs=bs)`` with the same
  ``bs``. Unbiased for the same Gauss-Newton diagonal, with relative noise ~sqrt(2/m) instead of
  ~sqrt(2) for m micro-batches in all.
- Hutchinson (SophiaH): u * (H u) by double backward on the unwrapped model under the math
  attention backend, averaged across micro-batches and ranks, then ``update_hessian(estimates)``.

Labels and probe vectors come from a generator seeded by (seed, step, global micro-batch), so a
resumed run draws exactly the same ones, and so does a run on a different number of ranks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from engine.batching import BatchPlan
from engine.distributed import DistEnv, grad_sync
from engine.seeding import derive_seed
from model import math_attention
from sophia.hessian import gnb_loss, hutchinson


def _stream_at(step: int) -> tuple[int, str]:
    """Where the batches of the refresh after ``step`` come from. The warm-start estimate
    (``step=-1``, before any training step) draws from a stream of its own, since batch streams
    are indexed by steps >= 0."""
    return (step, "hessian") if step >= 0 else (0, "hessian-warm-start")


@dataclass
class HessianCost:
    """What the Hessian passes have cost so far; checkpointed, so it survives a resume."""

    tokens: int = 0  # tokens pushed through Hessian passes, all ranks
    flops: float = 0.0
    seconds: float = 0.0

    def state_dict(self) -> dict[str, float]:
        # The checkpoint's historical key names (they sit among the run's counters).
        return {"hessian_tokens": self.tokens, "hessian_flops": self.flops,
                "hessian_seconds": self.seconds}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.tokens = int(state.get("hessian_tokens", 0))
        self.flops = float(state.get("hessian_flops", 0.0))
        self.seconds = float(state.get("hessian_seconds", 0.0))


# Estimators of the diagonal Hessian; the two GNB ones feed SophiaG (which takes `bs`), Hutchinson
# feeds SophiaH.
ESTIMATORS = ("gnb", "gnb_msq", "hutchinson")
GNB_ESTIMATORS = ("gnb", "gnb_msq")


class HessianRefresher:
    """Runs the Hessian estimate on the schedule and keeps its cost separately."""

    def __init__(self, estimator: str, k: int, plan: BatchPlan, micro_batches: int | None,
                 env: DistEnv, seed: int, flops_per_token: float, warm_start: bool = False,
                 grad_clip: float = 0.0):
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown Hessian estimator {estimator!r}; choose one of "
                             f"{', '.join(ESTIMATORS)}")
        micro_batches = plan.accum_steps if micro_batches is None else int(micro_batches)
        if not 1 <= micro_batches <= plan.accum_steps:
            from engine.errors import HarnessError

            raise HarnessError(
                f"optimizer.hessian_micro_batches={micro_batches} must be between 1 and the "
                f"{plan.accum_steps} micro-batches of a step (null means all of them, as the "
                f"official script does)."
            )
        self.estimator, self.k, self.plan = estimator, k, plan
        self.micro_batches, self.env, self.seed = micro_batches, env, seed
        self.flops_per_token, self.warm_start, self.grad_clip = flops_per_token, warm_start, grad_clip
        self.cost = HessianCost()

    @property
    def tokens_per_refresh(self) -> int:
        """``bs`` of SophiaG: tokens the sampled-label loss is averaged over, across all ranks."""
        return self.micro_batches * self.plan.tokens_per_micro_batch * self.env.world_size

    def step_kwargs(self) -> dict[str, int]:
        """Extra arguments of the optimizer's ``step``: SophiaG's clip threshold scales with ``bs``,
        the number of tokens its estimate was averaged over; Hutchinson's needs none."""
        return {"bs": self.tokens_per_refresh} if self.estimator in GNB_ESTIMATORS else {}

    def due(self, step: int) -> bool:
        """Is a refresh due after optimizer step ``step`` (0-based)?"""
        return step % self.k == self.k - 1

    def refresh(self, step: int, model: torch.nn.Module, raw_model: torch.nn.Module,
                optimizer: torch.optim.Optimizer, get_batch: Callable, autocast) -> None:
        """Estimate the diagonal Hessian on fresh batches and fold it into the optimizer's EMA."""
        if self.env.device.type == "cuda":  # do not bill queued optimizer-step work to the Hessian
            torch.cuda.synchronize(self.env.device)
        t0 = time.perf_counter()
        if self.estimator == "gnb":
            self._gnb(step, model, optimizer, get_batch, autocast)
        elif self.estimator == "gnb_msq":
            self._gnb_msq(step, model, optimizer, get_batch, autocast)
        else:
            self._hutchinson(step, raw_model, optimizer, get_batch, autocast)
        optimizer.zero_grad(set_to_none=True)
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        tokens = self.tokens_per_refresh
        self.cost.tokens += tokens
        # A Hutchinson pass is a forward, a backward and a double backward: about 2x the GNB cost.
        # gnb_msq runs exactly gnb's forward and backward passes (its squaring is elementwise).
        self.cost.flops += tokens * self.flops_per_token * (2.0 if self.estimator == "hutchinson" else 1.0)
        self.cost.seconds += time.perf_counter() - t0

    def _generator(self, step: int, micro: int) -> torch.Generator:
        """Randomness keyed on the global micro-batch (not the rank), so N ranks x 1 micro-batch
        draw exactly what 1 process x N micro-batches draws."""
        gen = torch.Generator(device=self.env.device)
        gen.manual_seed(derive_seed(self.seed, "hessian", step, self.plan.row_start(micro, self.env.rank)))
        return gen

    def _gnb(self, step, model, optimizer, get_batch, autocast) -> None:
        batch_step, stream = _stream_at(step)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(self.micro_batches):
            x, _ = get_batch(batch_step, micro, stream)
            with grad_sync(model, micro == self.micro_batches - 1):
                with autocast():
                    logits, _ = model(x)
                loss = gnb_loss(logits, generator=self._generator(step, micro)) / self.micro_batches
                loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        optimizer.update_hessian()

    def _gnb_msq(self, step, model, optimizer, get_batch, autocast) -> None:
        """The mean of per-micro-batch GNB squares: estimate = mean_j(t * g_j^2) over the M
        micro-batches of all ranks (t tokens each), fed as ``update_hessian(estimate, bs=M * t)``.

        Each g_j is the gradient of one micro-batch's mean sampled-label loss (not divided by the
        number of micro-batches), so t * g_j^2 is one official GNB draw at batch size t; averaging
        M of them keeps the expectation (the Gauss-Newton diagonal of the mean loss) and divides
        the variance by M. The gradients are never averaged across ranks (``no_sync`` on every
        micro-batch): only the summed squares are, by one all-reduce.
        """
        batch_step, stream = _stream_at(step)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        # One flat buffer per (device, dtype) with a view per parameter, so the cross-rank sum is
        # one all-reduce per buffer (one in practice) and no copy.
        buffers, squares = _flat_zeros(params)
        seen = [False] * len(params)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(self.micro_batches):
            x, _ = get_batch(batch_step, micro, stream)
            with grad_sync(model, False):
                with autocast():
                    logits, _ = model(x)
                gnb_loss(logits, generator=self._generator(step, micro)).backward()
            with torch.no_grad():
                have = [i for i, p in enumerate(params) if p.grad is not None]
                grads = [params[i].grad for i in have]
                torch._foreach_addcmul_([squares[i] for i in have], grads, grads)
            for i in have:
                seen[i] = True
            optimizer.zero_grad(set_to_none=True)
        if self.env.is_distributed:
            for buf in buffers:
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        total_micro = self.micro_batches * self.env.world_size
        tokens = self.plan.tokens_per_micro_batch
        # estimate = mean_j(t * g_j^2) = (t / M) * sum_j g_j^2, in place in the buffers
        for buf in buffers:
            buf.mul_(tokens / total_micro)
        bs = self.tokens_per_refresh
        if self.grad_clip > 0:
            # The official clip scales g to norm <= c, i.e. its stored g^2 (the estimate / bs) to a
            # sum <= c^2. The same rule on this estimate / bs, whose sum estimates E||g||^2 of
            # the official gradient: the coefficient clip_grad_norm_ would use, squared.
            norm = torch.sqrt(sum(buf.double().sum() for buf in buffers) / bs)
            coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            for buf in buffers:
                buf.mul_(coef.square().to(buf.dtype))
        optimizer.update_hessian([sq if s else None for sq, s in zip(squares, seen)], bs=bs)

    def _hutchinson(self, step, raw_model, optimizer, get_batch, autocast) -> None:
        batch_step, stream = _stream_at(step)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        total = [torch.zeros_like(p) for p in params]
        # DDP hooks do not support double backward, so the unwrapped model is used and the
        # estimates are averaged across ranks by hand.
        with math_attention():
            for micro in range(self.micro_batches):
                x, y = get_batch(batch_step, micro, stream)
                with autocast():
                    _, loss = raw_model(x, y)
                for acc, est in zip(total, hutchinson(loss, params, generator=self._generator(step, micro))):
                    acc.add_(est, alpha=1.0 / self.micro_batches)
        if self.env.is_distributed:
            for t in total:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t.div_(self.env.world_size)
        optimizer.update_hessian(total)


def _flat_zeros(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeroed flat buffers, one per (device, dtype) of ``params``, and a view shaped like each
    parameter into its buffer (in ``params`` order)."""
    sizes: dict[tuple, int] = {}
    for p in params:
        key = (p.device, p.dtype)
        sizes[key] = sizes.get(key, 0) + p.numel()
    flat = {key: torch.zeros(n, device=key[0], dtype=key[1]) for key, n in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)
    views = []
    for p in params:
        key = (p.device, p.dtype)
        views.append(flat[key][offsets[key]:offsets[key] + p.numel()].view_as(p))
        offsets[key] += p.numel()
    return list(flat.values()), views
