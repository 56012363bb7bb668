"""train.py with one injected fault, for the elastic-restart test: on the first attempt
(TORCHELASTIC_RESTART_COUNT=0) rank 1 dies abruptly before optimizer step FAULT_STEP."""
import os
import sys
from pathlib import Path

from engine.trainer import Trainer

FAULT_STEP = int(os.environ.get("FAULT_STEP", "7"))
_real_step = Trainer.train_step


def _dying_step(self, step):
    if (step == FAULT_STEP and self.env.rank == 1
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        os._exit(17)  # no cleanup, like a killed process
    return _real_step(self, step)


Trainer.train_step = _dying_step

import train  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = str(Path(train.__file__))
    train.entry()
