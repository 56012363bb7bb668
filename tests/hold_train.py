"""train.py with hooks for the tests of signals and locks, set by environment:

- HOLD_AT_STEP=k, HOLD_FILE=path: before optimizer step k (first attempt only), write
  ``<path>.reached`` and wait until ``path`` exists: the test acts (signals, starts a second run)
  while the run is known to be inside its loop.
- HOLD_BEFORE_TRAINING=path: the same before the trainer is built (nothing caught yet).
"""
import os
import sys
import time
from pathlib import Path

import engine.run
from engine.trainer import Trainer

_real_step = Trainer.train_step
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


def _build(*args, **kwargs):
    if os.environ.get("HOLD_BEFORE_TRAINING"):
        _hold(os.environ["HOLD_BEFORE_TRAINING"])
    return _real_build(*args, **kwargs)


Trainer.train_step = _step
engine.run.build_trainer = _build

import train  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = str(Path(train.__file__))
    train.entry()
