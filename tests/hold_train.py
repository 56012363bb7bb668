"""train.py with hooks for the tests of signals, locks and timed checkpoints, set by environment:

- HOLD_AT_STEP=k, HOLD_FILE=path: before optimizer step k (first attempt only), write
  ``<path>.reached`` and wait until ``path`` exists: the test acts (signals, starts a second run)
  while the run is known to be inside its loop.
- HOLD_BEFORE_TRAINING=path: the same before the trainer is built (nothing caught yet).
- FAKE_CLOCK=steps|frozen|always_due: the trainer's checkpoint clock; ``steps`` reads one
  minute per optimizer step done, ``frozen`` never moves, ``always_due`` jumps a day per call.
  FAKE_CLOCK_RANK1 gives rank 1 its own (the ranks must follow rank 0's).
"""
import os
import sys
import time
from pathlib import Path

import engine.run
from engine.trainer import Trainer

_real_step = Trainer.train_step
_real_fit = Trainer.fit
_real_build = engine.run.build_trainer


def _hold(path: str) -> None:
    Path(path + ".reached").write_text(str(os.getpid()))
    while not Path(path).exists():
        time.sleep(0.01)


def _step(self, step):
    if (os.environ.get("HOLD_FILE") and step == int(os.environ.get("HOLD_AT_STEP", "-1"))
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and self.env.is_main):
        _hold(os.environ["HOLD_FILE"])
    return _real_step(self, step)


def _clock(trainer, mode):
    if mode == "steps":
        return lambda: 60.0 * trainer.step
    if mode == "frozen":
        return lambda: 0.0
    calls = iter(range(10**9))
    return lambda: 86400.0 * next(calls)


def _fit(self):
    mode = os.environ.get("FAKE_CLOCK_RANK1" if self.env.rank == 1 else "FAKE_CLOCK")
    if mode:
        self.clock = _clock(self, mode)
    return _real_fit(self)


def _build(*args, **kwargs):
    if os.environ.get("HOLD_BEFORE_TRAINING"):
        _hold(os.environ["HOLD_BEFORE_TRAINING"])
    return _real_build(*args, **kwargs)


Trainer.train_step = _step
Trainer.fit = _fit
engine.run.build_trainer = _build

import train  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = str(Path(train.__file__))
    train.entry()
