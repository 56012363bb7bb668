"""Process-group setup for torchrun (DDP): gloo on CPU, NCCL on CUDA, one process per device."""
from __future__ import annotations

import contextlib

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.errors import HarnessError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` picks this rank's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise HarnessError(
                "device=cuda was requested but no CUDA device is visible. Run with device=cpu "
                "(or device=auto), or check CUDA_VISIBLE_DEVICES and the installed torch build."
            )
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise HarnessError(f"device={name!r} is not one of auto, cpu, cuda.")


def _export_submitit_env() -> None:
    """Under hydra-submitit-launcher (SLURM, one task per GPU) there is no torchrun: derive RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from SLURM through submitit's helper."""
    if launched_by_torchrun() or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _attempt_store(world_size: int, timeout: datetime.timedelta):
    """The torchrun agent's key-value store, namespaced by restart attempt.

    After an elastic restart, a worker that reaches rendezvous before its peers can read the
    addresses the *previous* attempt's workers published and fail with "connectFullMesh ...
    Connection refused" (seen with gloo on torch 2.13 whenever ranks restart at different
    speeds). A prefix per attempt keeps each attempt's keys apart. Returns None (plain env://)
    when torchrun does not host the store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"sophia-bench/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}",
                            store)


def setup_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Initialise the process group when launched by torchrun (or a multi-task SLURM job through
    submitit); a no-op for a single process."""
    _export_submitit_env()
    if not launched_by_torchrun():
        return DistEnv(0, 0, 1, resolve_device(device))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend=backend, timeout=timeout, rank=rank, world_size=world_size,
            store=_attempt_store(world_size, timeout),
            **({"device_id": dev} if dev.type == "cuda" else {}),
        )
    return DistEnv(rank, local_rank, world_size, dev)


def teardown_distributed() -> None:
    """Always destroy the process group, on success and on error, so NCCL does not hang or warn."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Average a tensor across ranks in place (identity for one process)."""
    if env.is_distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(env.world_size)
    return t


def broadcast_object(obj, env: DistEnv):
    """Rank 0's value of ``obj`` on every rank."""
    if not env.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def grad_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """A context in which a backward pass all-reduces the gradients across ranks (``enabled``) or
    only accumulates them locally: DDP's ``no_sync``. A model that is not DDP-wrapped never syncs,
    so the context is empty for it either way."""
    if enabled or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()
