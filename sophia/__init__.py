"""Optimizer library: SophiaG, SophiaH, Lion (and MuonAdamW), Hessian estimators, telemetry.

Depends on torch only, so the folder can be copied into another project.
"""
from .lion import Lion
from .sophiag import SophiaG, code_to_paper_lr, paper_to_code_lr
from .sophiah import SophiaH

__all__ = ["SophiaG", "SophiaH", "Lion", "paper_to_code_lr", "code_to_paper_lr"]

try:  # written separately; keep the package importable while it is absent
    from .muon import MuonAdamW  # noqa: F401
except ModuleNotFoundError as exc:
    if exc.name != f"{__name__}.muon":  # a missing dependency inside muon.py is a real error
        raise
else:
    __all__.append("MuonAdamW")
