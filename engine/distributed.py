"""Process-group setup for torchrun (DDP): gloo on CPU, NCCL on CUDA, one process per device;
stop signals (SIGTERM, SIGINT, SIGUSR1) turned into a request the ranks agree on at a step
boundary (:class:`StopRequest`, :class:`StepVote`)."""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

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


# What a scheduler or a user sends to end a run early: SIGTERM (SLURM before preemption or at the
# time limit, `kill`; torchrun forwards it to its workers), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
# `--signal=USR1@<seconds>`). Under submitit (hydra/launcher=slurm) its own preemption signal,
# SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL names another, is added.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

# A repeat of the first signal within this many seconds is the same request arriving twice, not a
# second one: torchrun forwards the signal it receives to workers that may have received it too
# (Ctrl-C reaches the whole foreground process group, SLURM signals every process of a step).
REPEAT_WINDOW_S = 1.0


def stop_exit_code(signum: int) -> int:
    """The exit status of a run stopped by ``signum``: 128 + the signal's number, as a shell
    reports a process the signal ended (SIGTERM 143, SIGINT 130, SIGUSR1 138, SIGUSR2 140)."""
    return 128 + int(signum)


def _submitit_signal() -> int | None:
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


class StopRequest:
    """Whether a stop signal has arrived, and which: set by the signal handler, read by the
    training loop at step boundaries. The handler only records the signal (the loop finishes its
    step, checkpoints and returns); a second, distinct signal exits the process at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        """The signal's name (``SIGTERM``), or "" while none has arrived."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def handle(self, signum: int, frame: Any = None) -> None:
        """The signal handler. It writes with ``os.write``: a handler may run in the middle of
        a ``print`` to the same stream, where a buffered write would raise."""
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self._at = signum, now
            if _is_main_rank():
                _write_stderr(f"{name} received: stopping after the current step with a "
                              f"checkpoint (send another signal to exit at once, without one)")
            return
        if signum == self.signum and now - self._at < REPEAT_WINDOW_S:
            return
        if _is_main_rank():
            _write_stderr(f"{name} received again: exiting now, without a checkpoint")
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(stop_exit_code(signum))

    def hand_over(self) -> None:
        """Run the handler that was installed before ours for the signal that stopped the run, if
        it was a Python one: submitit's preemption handler requeues the job (and exits) there,
        after the checkpoint it will resume from has been written."""
        previous = self._previous.get(self.signum) if self.signum is not None else None
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While active, :data:`STOP_SIGNALS` (and submitit's preemption signal under submitit) set the
    yielded :class:`StopRequest` instead of killing the process; the previous handlers come back
    afterwards. Outside the main thread (where Python cannot install handlers) nothing changes."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    signals = [*STOP_SIGNALS]
    extra = _submitit_signal()
    if extra is not None and extra not in signals:
        signals.append(extra)
    request._previous = {s: signal.signal(s, request.handle) for s in signals}
    try:
        yield request
    finally:
        for s, handler in request._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _write_stderr(line: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode())


class StepVote:
    """Flags that a rank raises on its own (a stop signal, rank 0's checkpoint clock), turned into
    one decision that every rank takes at the same step.

    :meth:`exchange` is called by every rank once per optimizer step. With one process the flags
    are the decision. With several, the flags posted at step s are combined (max: a signal on any
    rank stops all, and every rank learns its number; only rank 0 posts a clock flag, so its clock
    decides) by an all-reduce that
    runs while step s + 1 computes, and the result is the decision at step s + 1. The one-step lag
    is what keeps this cheap: on CUDA the all-reduce of two numbers goes on the stream like any
    kernel and its result comes back to pinned host memory with an event, and the host waits on
    that event only a step later, when the device has long passed it; reading the flags at the
    step itself would be a host-device sync per step, stalling the queue of kernels that keeps
    the GPU busy. On gloo the all-reduce runs asynchronously on its worker thread.
    """

    def __init__(self, env: DistEnv):
        self.env = env
        self._cuda = env.device.type == "cuda"
        self._pending: Any = None
        if env.is_distributed and self._cuda:
            self._send = torch.zeros(2, pin_memory=True)
            self._recv = torch.zeros(2, pin_memory=True)
            self._device = torch.zeros(2, device=env.device)

    def exchange(self, stop: int, save: bool) -> tuple[int, bool]:
        """Post this rank's flags for this step: ``stop`` the number of a stop signal received
        (0: none), ``save`` whether a checkpoint is wanted. Returns the agreed (stop, save) for
        this step: the flags themselves on one process, else the combination of those posted one
        step earlier ((0, False) at the first step)."""
        if not self.env.is_distributed:
            return stop, save
        decided = self._collect()
        if self._cuda:
            # The previous step's copies have completed (_collect waited on their event), so the
            # pinned buffers are free to reuse.
            self._send[0], self._send[1] = float(stop), float(save)
            self._device.copy_(self._send, non_blocking=True)
            dist.all_reduce(self._device, op=dist.ReduceOp.MAX)
            self._recv.copy_(self._device, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = event
        else:
            flags = torch.tensor([float(stop), float(save)])
            self._pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True), flags)
        return decided

    def _collect(self) -> tuple[int, bool]:
        if self._pending is None:
            return 0, False
        if self._cuda:
            self._pending.synchronize()
            values = self._recv.tolist()
        else:
            work, flags = self._pending
            work.wait()
            values = flags.tolist()
        self._pending = None
        return int(values[0]), values[1] > 0

    def close(self) -> None:
        """Wait for the last posted all-reduce, so that no collective is left in flight."""
        if self.env.is_distributed:
            self._collect()
