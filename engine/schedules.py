"""Linear warmup then cosine decay to ``min_lr``: the same schedule shape for every optimizer."""
from __future__ import annotations

import math


def lr_multiplier(step: int, warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> float:
    """Multiplier on each param group's base lr at optimizer step ``step`` (0-based).

    Warmup is linear from 1/warmup to 1 so the first step is never taken at lr 0; after
    ``decay_steps`` the multiplier stays at ``min_lr_ratio`` (a fully decayed schedule, which a
    fair comparison evaluates at).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_lr_ratio)
