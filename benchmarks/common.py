"""What the benchmarks share: the machine name, device timing, the offline default corpus, config
composition, CPU thread settings and the JSON record."""
from __future__ import annotations

import contextlib
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from omegaconf import DictConfig

# The project is installed in editable mode, so the configs sit next to the packages.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
STDLIB_CORPUS = Path("prepared/stdlib-byte")


def machine_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model name (``platform`` where /proc has none)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A callable that waits for ``device``'s queued kernels, so a wall clock read after it
    counts them (a no-op on CPU, where every op has finished when it returns)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def prepare_stdlib_corpus() -> Path:
    """The offline default corpus (this Python's stdlib sources, byte tokenizer) in
    ``prepared/stdlib-byte`` under the working directory, prepared on first use."""
    from data.prepare import prepare

    prepare("stdlib", STDLIB_CORPUS, tokenizer="byte", val_fraction=0.02, progress=False)
    return STDLIB_CORPUS


def compose_config(overrides: list[str]) -> DictConfig:
    """The project's Hydra config with ``overrides``, composed as ``train.py`` composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def config_choices(group: str) -> list[str]:
    """The options of a config group (``model``, ``optimizer``, ...), sorted."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (unchanged when None or 0), then
    restore the caller's count: tests call the scripts' ``main`` in their own process."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def command_line(module: str, argv: Sequence[Any] | None = None) -> str:
    """The command that reruns ``benchmarks.<module>`` with ``argv`` (default: this process's)."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", f"benchmarks.{module}", *map(str, args)])


def write_json(path: str | Path, result: Any) -> Path:
    """Write ``result`` as indented JSON to ``path``, creating its folder; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
