"""The global batch, stated in tokens, turned into micro-batch rows x accumulation x ranks."""
from __future__ import annotations

from dataclasses import dataclass

from engine.errors import HarnessError


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's tokens are split across ranks and micro-steps."""

    global_batch_tokens: int
    block_size: int
    micro_batch_size: int  # rows per forward pass on one rank
    world_size: int
    accum_steps: int  # micro-steps per optimizer step on each rank

    @property
    def global_rows(self) -> int:
        return self.global_batch_tokens // self.block_size

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch_size * self.block_size

    def row_start(self, micro_step: int, rank: int) -> int:
        """First global row of (micro_step, rank): a 1-rank run with N micro-steps sees the same rows
        as an N-rank run with one, so DDP and single-process runs are comparable batch for batch."""
        return (micro_step * self.world_size + rank) * self.micro_batch_size


def plan_batches(global_batch_tokens: int, block_size: int, micro_batch_size: int,
                 world_size: int) -> BatchPlan:
    """Derive accumulation steps; refuse a batch that does not divide evenly."""
    for name, value in (("train.global_batch_tokens", global_batch_tokens),
                        ("train.block_size", block_size),
                        ("train.micro_batch_size", micro_batch_size)):
        if not isinstance(value, int) or value < 1:
            raise HarnessError(f"{name}={value!r} must be a positive integer.")
    if global_batch_tokens % block_size:
        raise HarnessError(
            f"train.global_batch_tokens={global_batch_tokens} is not a multiple of the block size "
            f"{block_size}; choose a multiple, e.g. {max(1, global_batch_tokens // block_size) * block_size}."
        )
    rows = global_batch_tokens // block_size
    per_step = micro_batch_size * world_size
    if rows % per_step:
        raise HarnessError(
            f"The global batch of {rows} sequences ({global_batch_tokens} tokens / block {block_size}) "
            f"cannot be split into micro-batches of {micro_batch_size} on {world_size} rank(s): "
            f"{rows} is not a multiple of {micro_batch_size} x {world_size} = {per_step}. Change "
            f"train.micro_batch_size, train.global_batch_tokens or the number of processes."
        )
    return BatchPlan(global_batch_tokens, block_size, micro_batch_size, world_size, rows // per_step)
